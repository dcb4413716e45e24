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
    TORCH_CHECK(valid_row(a, data.size(0), b), "bnao::gather_augment: row ", b, " reads image ", a.index[b],
                a.params ? " with crop/flip parameters" : "", " outside the ", data.size(0), " images of data",
                a.params ? " or outside [-pad, pad] / {0, 1}" : "", "; pass indices in [0, images) and "
                "bnao.data.augment.sample_params parameters");
  }
  const int64_t pixels = a.batch * a.height * a.width;
  const int64_t grain = std::max<int64_t>(1, kGrainValues / std::max<int64_t>(1, a.channels));
  at::parallel_for(0, pixels, grain, [&](int64_t begin, int64_t end) {
    for (int64_t pixel = begin; pixel < end; ++pixel) {
      const PixelSource source = pixel_source(a, pixel);
      float* out = a.out + pixel * a.channels;
      for (int64_t c = 0; c < a.channels; ++c) out[c] = channel_value(a, source, c);
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(bnao, CPU, m) { m.impl("gather_augment", &gather_augment_cpu); }

}  // namespace data
}  // namespace bnao
