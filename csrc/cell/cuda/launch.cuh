// The CUDA launch layer shared by the fused-cell kernels (branch_round_cuda.cu, node_ops_cuda.cu): the block
// size, the grid of a grid-stride loop, deterministic block reductions (one value, or K values per thread),
// and the kernel of multi-sum reductions (reduce_many_kernel). Kept in one place so every kernel of the
// fused cells launches and reduces the same way.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "cell/reduction_split.h"

namespace bnao {
namespace cell {

// kThreads (threads per block) is in cell/reduction_split.h, with the split of reductions over blocks.
// Grid-stride loops cover any size; up to this many blocks (an H100 holds 132 SMs x 8 blocks of 256
// threads at a time), so the loop's stride is large and a big launch needs few passes.
constexpr int64_t kMaxBlocks = 65535;

// Blocks of a grid-stride loop over `items` (0 for none: the caller skips the launch).
inline unsigned grid_blocks(int64_t items) {
  return static_cast<unsigned>(std::min<int64_t>((items + kThreads - 1) / kThreads, kMaxBlocks));
}

// Sum of one value per thread of a block of kThreads threads (every launch here uses kThreads), valid
// in thread 0. A shared-memory tree of fixed shape, so the same inputs give the same bits on every run. Every thread of the block must call it; it
// may be called several times in a row (the first barrier keeps a previous call's readers safe).
template <typename Acc>
__device__ Acc block_sum(Acc value) {
  __shared__ Acc partial[kThreads];
  __syncthreads();
  partial[threadIdx.x] = value;
  __syncthreads();
  for (int width = kThreads / 2; width > 0; width /= 2) {
    if (threadIdx.x < width) partial[threadIdx.x] += partial[threadIdx.x + width];
    __syncthreads();
  }
  return partial[0];
}

// Sums of K values per thread over a block of kThreads threads, valid in thread 0's `values`. A fixed order
// (a warp shuffle tree, then the warps' sums added in warp order), so the same inputs give the same bits on
// every run. Every thread of the block must call it; it may be called several times in a row.
template <typename Acc, int K>
__device__ void block_sum_many(Acc* values) {
  constexpr int kWarps = kThreads / 32;
  __shared__ Acc warp_sums[kWarps][K];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
#pragma unroll
  for (int k = 0; k < K; ++k) {
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) values[k] += __shfl_down_sync(0xffffffffu, values[k], offset);
  }
  __syncthreads();  // a previous call's reader (thread 0) is done with warp_sums
  if (lane == 0) {
#pragma unroll
    for (int k = 0; k < K; ++k) warp_sums[warp][k] = values[k];
  }
  __syncthreads();
  if (threadIdx.x == 0) {
#pragma unroll
    for (int k = 0; k < K; ++k) {
      Acc total = warp_sums[0][k];
      for (int w = 1; w < kWarps; ++w) total += warp_sums[w][k];
      values[k] = total;
    }
  }
}

// Partial sums of a split reduction: stream-ordered scratch from the caching allocator on `device` (the
// current stream's; capturable, and freed once the kernels that read it are queued, which is safe in stream
// order).
template <typename Acc>
at::Tensor reduction_scratch(c10::Device device, int64_t numel) {
  return at::empty({numel}, at::TensorOptions().dtype(c10::CppTypeToScalarType<Acc>::value).device(device));
}

// One block per output of a multi-sum reduction (Reduction::kSums sums per output, e.g. a tile of weights; an
// output index may also encode a chunk of the terms, as the branch rounds' tiles do):
// thread t's strided partial sums (reduction.partial_sums(o, t, kThreads, sums)), then a fixed-order block tree
// (block_sum_many), handed to reduction.finish in thread 0.
template <typename Acc, typename Reduction>
__global__ void __launch_bounds__(kThreads) reduce_many_kernel(const Reduction reduction) {
  Acc sums[Reduction::kSums];
  reduction.partial_sums(static_cast<int64_t>(blockIdx.x), threadIdx.x, blockDim.x, sums);
  block_sum_many<Acc, Reduction::kSums>(sums);
  if (threadIdx.x == 0) reduction.finish(static_cast<int64_t>(blockIdx.x), sums);
}

}  // namespace cell
}  // namespace bnao
