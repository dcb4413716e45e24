// CUDA kernels of bnao::branch_round and bnao::branch_round_backward: the
// bodies of cell/branch_round.h run on a grid. This file is only the launch
// layer: a grid-stride loop for the elementwise bodies and one block per
// output for the reductions (a fixed tree, so results are deterministic and
// need no atomics). The branch code stays on the device; nothing here reads it
// on the host, so the launches are the same for every arch (graph-capturable).
#include <ATen/AccumulateType.h>
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

#include "cell/branch_round.h"
#include "cell/branch_round_ops.h"
#include "cell/cuda/launch.cuh"

namespace bnao {
namespace cell {
namespace {

// One element per thread: thread `index` runs column index % columns of row index / columns.
template <typename Body, typename T>
__global__ void __launch_bounds__(kThreads)
    for_each_kernel(int64_t rows, int64_t columns, const RoundArgs<T> args) {
  const int64_t count = rows * columns;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t index = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; index < count; index += stride) {
    const int64_t row = index / columns;
    Body::run(args, Body::row(args, row), index - row * columns);
  }
}

// One block per output; thread t adds the terms k = t, t + kThreads, ... of the flattened
// (n, i, j) range, then the block adds the partial sums.
template <typename Term, typename T>
__global__ void __launch_bounds__(kThreads) reduce_kernel(const RoundArgs<T> args) {
  using Acc = at::acc_type<T, /*is_cuda=*/true>;
  const auto ctx = Term::prepare(args, static_cast<int64_t>(blockIdx.x));
  const int64_t plane = args.height * args.width, length = args.batch * plane;
  Acc sum = Acc(0);
  // ctx.active is uniform over the block, so every thread reaches the barriers of block_sum.
  if (ctx.active) {
    for (int64_t k = threadIdx.x; k < length; k += kThreads) {
      const int64_t n = k / plane, pixel = k - n * plane, i = pixel / args.width;
      sum += static_cast<Acc>(Term::term(args, ctx, n, i, pixel - i * args.width));
    }
  }
  sum = block_sum(sum);
  if (threadIdx.x == 0) Term::finish(args, ctx, sum);
}

struct CudaLauncher {
  cudaStream_t stream;

  template <template <typename> class Body, typename T>
  void for_each(int64_t rows, int64_t columns, const RoundArgs<T>& a) const {
    const int64_t count = rows * columns;
    if (count == 0) return;
    for_each_kernel<Body<T>, T><<<grid_blocks(count), kThreads, 0, stream>>>(rows, columns, a);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  template <template <typename> class Term, typename T>
  void reduce(int64_t outputs, const RoundArgs<T>& a) const {
    if (outputs == 0) return;
    // outputs <= 2 * C * max(C, 49): far below the grid's x limit (2^31 - 1).
    reduce_kernel<Term<T>, T><<<static_cast<unsigned>(outputs), kThreads, 0, stream>>>(a);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

// The CUDA backend of the kernels of cell/branch_round_ops.h: launches on the current stream of the
// activations' device, with that device current.
struct CudaBackend {
  static c10::cuda::CUDAGuard guard(const at::Tensor& like) { return c10::cuda::CUDAGuard(like.device()); }
  static CudaLauncher launcher(const at::Tensor& like) {
    return CudaLauncher{c10::cuda::getCurrentCUDAStream(like.device().index()).stream()};
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(bnao, CUDA, m) { BNAO_REGISTER_BRANCH_ROUND(m, CudaBackend); }

}  // namespace cell
}  // namespace bnao
