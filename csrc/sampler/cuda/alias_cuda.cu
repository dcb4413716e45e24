// CUDA kernels of bnao::alias_draw and bnao::alias_table.
//
// The draw runs the same alias::draw_one as the CPU kernel (sampler/alias.h),
// so the i-th draw of a stream is the same index on every device. The table is
// built on the CPU and copied: Vose's build is sequential, takes milliseconds
// even for 1e7 items, and building it once on the host makes CPU and CUDA
// tables bit-identical.
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

#include "sampler/alias.h"
#include "sampler/alias_checks.h"

namespace bnao {
namespace {

// Each thread handles kDrawsPerThread draws per grid-stride step, spaced by the
// block size so that neighbouring threads write neighbouring int64s (coalesced
// stores); the random table reads are single 8-byte loads through the
// read-only cache.
constexpr int kThreads = 256;
constexpr int kDrawsPerThread = 4;

__global__ void __launch_bounds__(kThreads)
    alias_draw_kernel(const unsigned long long* __restrict__ table, uint64_t n, uint64_t seed, uint64_t offset,
                      int64_t num_draws, int64_t* __restrict__ out, unsigned long long* __restrict__ first_bad) {
  const int64_t tile = static_cast<int64_t>(kThreads) * kDrawsPerThread;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * tile;
  for (int64_t start = static_cast<int64_t>(blockIdx.x) * tile; start < num_draws; start += stride) {
#pragma unroll
    for (int k = 0; k < kDrawsPerThread; ++k) {
      const int64_t i = start + static_cast<int64_t>(k) * kThreads + threadIdx.x;
      if (i < num_draws) {
        const alias::Philox4 r = alias::philox_for_draw(seed, offset + static_cast<uint64_t>(i));
        const uint64_t column = alias::draw_column(r, n);
        const uint64_t packed = __ldg(table + column);
        const uint64_t alias_index = alias::column_alias(packed);
        const bool keep = r.v[2] < alias::column_threshold(packed);
        if (!keep && alias_index >= n) {
          // A forged table: never return an index outside the pool; the host raises.
          atomicMin(first_bad, static_cast<unsigned long long>(column));
          out[i] = static_cast<int64_t>(column);
        } else {
          out[i] = keep ? static_cast<int64_t>(column) : static_cast<int64_t>(alias_index);
        }
      }
    }
  }
}

at::Tensor alias_draw_cuda(const at::Tensor& table, int64_t num_draws, int64_t seed, int64_t offset) {
  check_alias_draw_args(table, num_draws, offset);
  const c10::cuda::CUDAGuard guard(table.device());
  const at::Tensor t = table.contiguous();
  at::Tensor out = at::empty({num_draws}, t.options());
  if (num_draws == 0) return out;

  const int64_t tile = static_cast<int64_t>(kThreads) * kDrawsPerThread;
  const int64_t tiles = (num_draws + tile - 1) / tile;
  // Enough resident blocks to fill the GPU; the grid-stride loop covers the rest.
  // (ATen/cuda/CUDAContext.h would give the properties but drags in cuSPARSE
  // and cuBLAS headers, which a CUDA toolkit for compiling need not have.)
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, table.device().index()));
  const int64_t max_blocks = static_cast<int64_t>(sms) * 16;
  const unsigned blocks = static_cast<unsigned>(std::min<int64_t>(tiles, max_blocks));
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(table.device().index()).stream();
  // Smallest column with an out-of-range alias that a draw hit (all bits set: none). Reading it
  // back costs one synchronisation per call, the price of raising on a forged table.
  at::Tensor first_bad = at::empty({1}, t.options());
  auto* first_bad_ptr = reinterpret_cast<unsigned long long*>(first_bad.data_ptr<int64_t>());
  C10_CUDA_CHECK(cudaMemsetAsync(first_bad_ptr, 0xff, sizeof(unsigned long long), stream));
  alias_draw_kernel<<<blocks, kThreads, 0, stream>>>(
      reinterpret_cast<const unsigned long long*>(t.data_ptr<int64_t>()), static_cast<uint64_t>(t.numel()),
      static_cast<uint64_t>(seed), static_cast<uint64_t>(offset), num_draws, out.data_ptr<int64_t>(), first_bad_ptr);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  unsigned long long bad = 0;
  C10_CUDA_CHECK(cudaMemcpyAsync(&bad, first_bad_ptr, sizeof(bad), cudaMemcpyDeviceToHost, stream));
  C10_CUDA_CHECK(cudaStreamSynchronize(stream));
  TORCH_CHECK(bad == ~0ull, "bnao::alias_draw: table column ", bad, " aliases an item outside the table's ",
              t.numel(), " items; the table was not built by bnao::alias_table (rebuild it from the weights)");
  return out;
}

at::Tensor alias_table_cuda(const at::Tensor& weights) {
  // Route through the dispatcher to the CPU kernel: one build, one set of checks.
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("bnao::alias_table", "")
                             .typed<at::Tensor(const at::Tensor&)>();
  const at::Tensor table = op.call(weights.to(at::kCPU));
  return table.to(weights.device());
}

}  // namespace

TORCH_LIBRARY_IMPL(bnao, CUDA, m) {
  m.impl("alias_table", &alias_table_cuda);
  m.impl("alias_draw", &alias_draw_cuda);
}

}  // namespace bnao
