// CPU kernel of bnao::gather_augment (the body is data/augment.h, the checks data/augment_ops.h).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <optional>

#include "data/augment.h"
#include "data/augment_ops.h"

namespace bnao {
namespace data {
namespace {

// Output values per task of at::parallel_for: a task must outweigh a fork/join (a few microseconds).
constexpr int64_t kGrainValues = 32768;

at::Tensor gather_augment_cpu(const at::Tensor& data, const at::Tensor& index, const std::optional<at::Tensor>& params,
                              int64_t height, int64_t width, int64_t pad, int64_t cutout, const at::Tensor& scale,
                              const at::Tensor& shift) {
  at::Tensor out;
  const AugmentArgs a = augment_args(data, index, params, height, width, pad, cutout, scale, shift, &out);
  for (int64_t b = 0; b < a.batch; ++b) {
    if (valid_row(a, data.size(0), b)) continue;
    TORCH_CHECK(a.index[b] >= 0 && a.index[b] < data.size(0), "bnao::gather_augment: index[", b, "] = ",
                a.index[b], " is not an image of data (", data.size(0), " images); pass indices in [0, images)");
    const int64_t* p = a.params + b * kNumParams;
    TORCH_CHECK(p[kFlip] == 0 || p[kFlip] == 1, "bnao::gather_augment: params[", b, "] has flip ", p[kFlip],
                "; it must be 0 or 1 (bnao.data.augment.sample_params)");
    TORCH_CHECK(false, "bnao::gather_augment: params[", b, "] has crop offsets (", p[kDy], ", ", p[kDx],
                ") outside [-pad, pad] = [", -a.pad, ", ", a.pad, "] (bnao.data.augment.sample_params)");
  }
  const int64_t pixels = a.batch * a.height * a.width;
  const int64_t grain = std::max<int64_t>(1, kGrainValues / std::max<int64_t>(1, a.channels));
  at::parallel_for(0, pixels, grain, [&](int64_t begin, int64_t end) {
    for (int64_t pixel = begin; pixel < end; ++pixel) augment_pixel(a, pixel);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(bnao, CPU, m) { m.impl("gather_augment", &gather_augment_cpu); }

}  // namespace data
}  // namespace bnao
