// Host side of bnao::gather_augment shared by the CPU and CUDA kernels: one argument check (the same
// inputs refused with the same messages on every device), the output, and the kernel arguments.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <optional>

#include "data/augment.h"

namespace bnao {
namespace data {

inline void check_on(const char* name, const at::Tensor& t, const at::Tensor& data, at::ScalarType dtype) {
  TORCH_CHECK(t.scalar_type() == dtype, "bnao::gather_augment: ", name, " must be ", dtype, ", got ",
              t.scalar_type());
  TORCH_CHECK(t.device() == data.device(), "bnao::gather_augment: ", name, " is on ", t.device(),
              " but data is on ", data.device(), "; move every argument to one device");
  TORCH_CHECK(t.is_contiguous(), "bnao::gather_augment: ", name, " must be contiguous; call .contiguous() first");
}

// Checks every argument and returns the kernel arguments, with `out` allocated ([batch, H, W, C] float32).
inline AugmentArgs augment_args(const at::Tensor& data, const at::Tensor& index, const std::optional<at::Tensor>& params,
                                int64_t height, int64_t width, int64_t pad, int64_t cutout, const at::Tensor& scale,
                                const at::Tensor& shift, at::Tensor* out) {
  check_on("data", data, data, at::kByte);
  TORCH_CHECK(data.dim() == 3, "bnao::gather_augment: data must be uint8 [images, pixels, channels] "
              "(bnao.data.augment.pad_images), got shape ", data.sizes());
  TORCH_CHECK(height > 0 && width > 0 && pad >= 0 && cutout >= 0, "bnao::gather_augment: height and width must "
              "be > 0 and pad and cutout >= 0, got ", height, ", ", width, ", ", pad, ", ", cutout);
  const bool augment = params.has_value() && params->defined();
  TORCH_CHECK(augment || pad == 0, "bnao::gather_augment: without params the images are read unpadded, but pad is ",
              pad, "; pass pad=0 (or the crop parameters)");
  const int64_t padded_pixels = (height + 2 * pad) * (width + 2 * pad);
  TORCH_CHECK(data.size(1) == padded_pixels, "bnao::gather_augment: data holds ", data.size(1), " pixels per image, "
              "but ", height, "x", width, " images padded by ", pad, " have ", padded_pixels);
  check_on("index", index, data, at::kLong);
  TORCH_CHECK(index.dim() == 1, "bnao::gather_augment: index must be 1-D, got shape ", index.sizes());
  const int64_t batch = index.size(0), channels = data.size(2);
  if (augment) {
    check_on("params", *params, data, at::kLong);
    TORCH_CHECK(params->dim() == 2 && params->size(0) == batch && params->size(1) == kNumParams,
                "bnao::gather_augment: params must be [", batch, ", ", static_cast<int>(kNumParams),
                "] (bnao.data.augment.sample_params), got shape ", params->sizes());
  }
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor&>{"scale", scale}, {"shift", shift}}) {
    check_on(name, t, data, at::kFloat);
    TORCH_CHECK(t.dim() == 1 && t.size(0) == channels, "bnao::gather_augment: ", name, " must be [", channels,
                "] (one value per channel), got shape ", t.sizes());
  }
  *out = at::empty({batch, height, width, channels}, data.options().dtype(at::kFloat));
  AugmentArgs a{};
  a.data = data.data_ptr<uint8_t>();
  a.index = index.data_ptr<int64_t>();
  a.params = augment ? params->data_ptr<int64_t>() : nullptr;
  a.scale = scale.data_ptr<float>();
  a.shift = shift.data_ptr<float>();
  a.out = out->data_ptr<float>();
  a.batch = batch;
  a.height = height;
  a.width = width;
  a.channels = channels;
  a.pad = pad;
  a.padded_pixels = padded_pixels;
  a.cutout = augment ? cutout : 0;
  return a;
}

// Whether the index and params values of output image b are in range (images of the dataset; crop offsets in
// [-pad, pad]; flip 0 or 1): reads outside the dataset otherwise. The CPU kernel checks it on the host,
// the CUDA kernel asserts it on the device.
BNAO_DATA_HD bool valid_row(const AugmentArgs& a, int64_t images, int64_t b) {
  const int64_t image = a.index[b];
  if (image < 0 || image >= images) return false;
  if (a.params == nullptr) return true;
  const int64_t* p = a.params + b * kNumParams;
  return p[kDy] >= -a.pad && p[kDy] <= a.pad && p[kDx] >= -a.pad && p[kDx] <= a.pad &&
         (p[kFlip] == 0 || p[kFlip] == 1);
}

}  // namespace data
}  // namespace bnao
