// CUDA kernel of bnao::gather_augment: one output pixel (all its channels) per thread, grid-stride, so the
// index arithmetic runs once per pixel; the body is data/augment.h, the checks data/augment_ops.h.
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <optional>

#include "data/augment.h"
#include "data/augment_ops.h"

namespace bnao {
namespace data {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 65535;

__global__ void __launch_bounds__(kThreads) gather_augment_kernel(const AugmentArgs a, int64_t images) {
  const int64_t plane = a.height * a.width, count = a.batch * plane;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t pixel = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; pixel < count;
       pixel += stride) {
    // The host cannot read device indices without a sync: out-of-range rows stop the kernel here.
    CUDA_KERNEL_ASSERT(valid_row(a, images, pixel / plane) &&
                       "bnao::gather_augment: an index or crop/flip parameter is out of range");
    augment_pixel(a, pixel);
  }
}

at::Tensor gather_augment_cuda(const at::Tensor& data, const at::Tensor& index,
                               const std::optional<at::Tensor>& params, int64_t height, int64_t width, int64_t pad,
                               int64_t cutout, const at::Tensor& scale, const at::Tensor& shift) {
  const c10::cuda::CUDAGuard guard(data.device());
  at::Tensor out;
  const AugmentArgs a = augment_args(data, index, params, height, width, pad, cutout, scale, shift, &out);
  const int64_t count = a.batch * a.height * a.width;  // pixels
  if (count == 0) return out;
  const unsigned blocks = static_cast<unsigned>(std::min<int64_t>((count + kThreads - 1) / kThreads, kMaxBlocks));
  gather_augment_kernel<<<blocks, kThreads, 0, c10::cuda::getCurrentCUDAStream(data.device().index()).stream()>>>(
      a, data.size(0));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(bnao, CUDA, m) { m.impl("gather_augment", &gather_augment_cuda); }

}  // namespace data
}  // namespace bnao
