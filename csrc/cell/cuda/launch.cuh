// The CUDA launch layer shared by the fused-cell kernels (branch_round_cuda.cu,
// node_ops_cuda.cu): the block size, the grid of a grid-stride loop, and a
// deterministic block reduction. Kept in one place so every kernel of the
// fused cells launches and reduces the same way.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

namespace bnao {
namespace cell {

constexpr int kThreads = 256;
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

}  // namespace cell
}  // namespace bnao
