// CUDA kernels of bnao::branch_round and bnao::branch_round_backward: the
// bodies of cell/branch_round.h run on a grid. This file is only the launch
// layer: grid-stride loops for the elementwise bodies and for the channel-tile
// bodies (for_each_tiled), and for the reductions blocks of (output or tile,
// chunk) with fixed trees, then (for several chunks, and always for the tile
// reductions) a second pass adding the chunks in a fixed order
// (cell/reduction_split.h), so results are deterministic and need no atomics. The branch code stays on the device; nothing here reads it
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
#include <new>

#include "cell/branch_round.h"
#include "cell/branch_round_ops.h"
#include "cell/launch_groups.h"
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

// Register caps of the rows kernels, without spills in float and bfloat16 (sm_90, ptxas -v; float64, the tests'
// type, spills up to 72 bytes): 3 blocks an SM (85 registers a thread) for the bodies that take several columns
// a thread (the depthwise groups; GradTotalAndRecompute takes 122 uncapped, for its max-pool and gradient paths
// beside the group's sums), 4 (64 registers) for the others (a minimum of one block let NormInputGrad take 112).
template <typename Body>
constexpr int kRowBlocksPerSm = Body::kColumnsPerThread > 1 ? 3 : 4;

// Whole rows per block (cell/launch_groups.h): the block's first `rows_per_block` threads decode one row each
// (Body::row) into shared memory, then thread t runs the Body::kColumnsPerThread columns of group t % threads
// of row t / threads (Body::run_group). The same values as for_each_kernel's Body::run per element.
template <typename Body, typename T>
__global__ void __launch_bounds__(kThreads, kRowBlocksPerSm<Body>)
    for_each_rows_kernel(int64_t rows, int columns, int rows_per_block, const RoundArgs<T> args) {
  using Row = typename Body::Row;
  constexpr int kPerThread = Body::kColumnsPerThread;
  __shared__ __align__(16) unsigned char storage[kMaxGroupRows * sizeof(Row)];
  Row* decoded = reinterpret_cast<Row*>(storage);
  const int threads = static_cast<int>(row_threads(columns, kPerThread));
  const int local_row = static_cast<int>(threadIdx.x) / threads;
  const int first_column = (static_cast<int>(threadIdx.x) - local_row * threads) * kPerThread;
  const int count = min(kPerThread, columns - first_column);
  const int64_t step = static_cast<int64_t>(gridDim.x) * rows_per_block;
  // `first` depends on the block only, so every thread reaches the barriers the same number of times.
  for (int64_t first = static_cast<int64_t>(blockIdx.x) * rows_per_block; first < rows; first += step) {
    if (static_cast<int>(threadIdx.x) < rows_per_block && first + threadIdx.x < rows)
      new (&decoded[threadIdx.x]) Row(Body::row(args, first + threadIdx.x));
    __syncthreads();
    if (local_row < rows_per_block && first + local_row < rows) {
      if constexpr (kPerThread == 1) {
        Body::run(args, decoded[local_row], first_column);  // (a loop of unknown count would cost registers)
      } else {
        Body::run_group(args, decoded[local_row], first_column, count);
      }
    }
    __syncthreads();  // the next group's decoding overwrites the rows
  }
}

// One work item of a channel-tile body (round_tiles.h, e.g. BranchForwardTiles) per thread, grid-stride.
template <typename Tiles, typename T>
__global__ void __launch_bounds__(kThreads) for_each_item_kernel(int64_t count, const RoundArgs<T> args) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < count; e += stride)
    Tiles::run(args, e);
}

// A channel-tile body's items in blocks of kThreads consecutive items (cell/launch_groups.h), each (b, n, tile)
// plane the block touches decoded once (Tiles::plane) into shared memory, then one item per thread
// (Tiles::run_pixel). Register cap (65,536 / (3 x 256) = 85 a thread): 3 blocks an SM instead of 2 (the tile
// bodies take 106 registers uncapped, for their pooling and factorized-reduce paths), without spills (sm_90,
// ptxas -v); at 4 blocks the forward tiles spill.
constexpr int kPlaneBlocksPerSm = 3;

template <typename Tiles, typename T>
__global__ void __launch_bounds__(kThreads, kPlaneBlocksPerSm)
    for_each_plane_kernel(int64_t count, int64_t pixels, const RoundArgs<T> args) {
  using Plane = typename Tiles::Plane;
  __shared__ __align__(16) unsigned char storage[kMaxGroupPlanes * sizeof(Plane)];
  Plane* decoded = reinterpret_cast<Plane*>(storage);
  const int64_t step = static_cast<int64_t>(gridDim.x) * kThreads;
  // `start` depends on the block only, so every thread reaches the barriers the same number of times.
  for (int64_t start = static_cast<int64_t>(blockIdx.x) * kThreads; start < count; start += step) {
    const PlaneGroup group = plane_group(start, count, pixels);
    if (static_cast<int>(threadIdx.x) < group.planes)
      new (&decoded[threadIdx.x]) Plane(Tiles::plane(args, group.first_plane + threadIdx.x));
    __syncthreads();
    const int64_t e = start + threadIdx.x;
    if (e < count) {
      const int64_t p = e / pixels;
      Tiles::run_pixel(args, decoded[p - group.first_plane], e - p * pixels);
    }
    __syncthreads();  // the next group's decoding overwrites the planes
  }
}

// Block (output, chunk) of Term's reduction split over `chunks` chunks (cell/reduction_split.h): thread t adds
// the terms chunk * kThreads + t, + chunks * kThreads, ... of the flattened (n, i, j) range, and the block adds
// the threads' sums with a fixed-shape tree. With one chunk the block finishes the output itself; otherwise it
// writes partial[output * chunks + chunk] for the chunk pass (finish_output).
template <typename Term, typename T, typename Acc>
__device__ void reduce_chunk_block(const RoundArgs<T>& args, int64_t output, int64_t chunk, int64_t chunks,
                                   Acc* partial) {
  const auto ctx = Term::prepare(args, output);
  // ctx.active is uniform over the block, so every thread reaches the barriers of block_sum.
  Acc sum = ctx.active ? strided_term_sum<Term, Acc>(args, ctx, chunk * kThreads + threadIdx.x, chunks * kThreads)
                       : Acc(0);
  sum = block_sum(sum);
  if (threadIdx.x != 0) return;
  if (chunks == 1) {
    Term::finish(args, ctx, sum);
  } else {
    partial[output * chunks + chunk] = sum;
  }
}

template <typename Term, typename T, typename Acc>
__global__ void __launch_bounds__(kThreads) reduce_chunk_kernel(const RoundArgs<T> args, Acc* partial) {
  reduce_chunk_block<Term, T, Acc>(args, blockIdx.x, blockIdx.y, gridDim.y, partial);
}

// Two independent reductions of `outputs` outputs each (so with the same chunks) in one launch: blocks
// x < outputs are First's output x, the others Second's output x - outputs (uniform over a block).
template <typename First, typename Second, typename T, typename Acc>
__global__ void __launch_bounds__(kThreads) reduce_chunk_two_kernel(const RoundArgs<T> args, Acc* first_partial,
                                                                    Acc* second_partial, int64_t outputs) {
  const int64_t x = blockIdx.x;
  if (x < outputs) {
    reduce_chunk_block<First, T, Acc>(args, x, blockIdx.y, gridDim.y, first_partial);
  } else {
    reduce_chunk_block<Second, T, Acc>(args, x - outputs, blockIdx.y, gridDim.y, second_partial);
  }
}

// The chunk pass of one output: its chunks added in chunk order, then Term::finish.
template <typename Term, typename T, typename Acc>
__device__ void finish_output(const RoundArgs<T>& args, const Acc* partial, int64_t output, int64_t chunks) {
  Acc sum = partial[output * chunks];
  for (int64_t chunk = 1; chunk < chunks; ++chunk) sum += partial[output * chunks + chunk];
  Term::finish(args, Term::prepare(args, output), sum);
}

// The second pass of a split reduction: one thread per output.
template <typename Term, typename T, typename Acc>
__global__ void __launch_bounds__(kThreads)
    finish_chunks_kernel(const RoundArgs<T> args, const Acc* partial, int64_t outputs, int64_t chunks) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t output = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; output < outputs;
       output += stride)
    finish_output<Term, T, Acc>(args, partial, output, chunks);
}

// The second pass of two split reductions in one launch: First's outputs, then Second's.
template <typename First, typename Second, typename T, typename Acc>
__global__ void __launch_bounds__(kThreads)
    finish_chunks_two_kernel(const RoundArgs<T> args, const Acc* first_partial, int64_t first_outputs,
                             int64_t first_chunks, const Acc* second_partial, int64_t second_outputs,
                             int64_t second_chunks) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t output = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
       output < first_outputs + second_outputs; output += stride) {
    if (output < first_outputs) {
      finish_output<First, T, Acc>(args, first_partial, output, first_chunks);
    } else {
      finish_output<Second, T, Acc>(args, second_partial, output - first_outputs, second_chunks);
    }
  }
}

struct CudaLauncher {
  cudaStream_t stream;
  c10::Device device;

  template <template <typename> class Body, typename T>
  void for_each(int64_t rows, int64_t columns, const RoundArgs<T>& a) const {
    const int64_t count = rows * columns;
    if (count == 0) return;
    const int per_block = group_rows(row_threads(columns, Body<T>::kColumnsPerThread));
    if (per_block > 0) {
      const int64_t blocks = std::min<int64_t>((rows + per_block - 1) / per_block, kMaxBlocks);
      for_each_rows_kernel<Body<T>, T><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
          rows, static_cast<int>(columns), per_block, a);
    } else {
      for_each_kernel<Body<T>, T><<<grid_blocks(count), kThreads, 0, stream>>>(rows, columns, a);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  // Body's elements, computed by its channel-tile form (kChannelTile channels of a pixel per thread).
  template <template <typename> class Body, template <typename> class Tiles, typename T>
  void for_each_tiled(int64_t, int64_t, const RoundArgs<T>& a) const {
    const int64_t count = channel_tile_items(a), pixels = a.height * a.width;
    if (count == 0) return;
    if (pixels >= kMinPlanePixels) {
      for_each_plane_kernel<Tiles<T>, T><<<grid_blocks(count), kThreads, 0, stream>>>(count, pixels, a);
    } else {
      for_each_item_kernel<Tiles<T>, T><<<grid_blocks(count), kThreads, 0, stream>>>(count, a);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  template <template <typename> class Term, typename T>
  void reduce(int64_t outputs, const RoundArgs<T>& a) const {
    using Acc = at::acc_type<T, /*is_cuda=*/true>;
    if (outputs == 0) return;
    const int64_t chunks = reduction_chunks(outputs, a.batch * a.height * a.width);
    // outputs <= 2 * C * max(C, 49): far below the grid's x limit (2^31 - 1); chunks <= 64.
    const dim3 grid(static_cast<unsigned>(outputs), static_cast<unsigned>(chunks));
    if (chunks == 1) {
      reduce_chunk_kernel<Term<T>, T, Acc><<<grid, kThreads, 0, stream>>>(a, nullptr);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      return;
    }
    const at::Tensor partial = reduction_scratch<Acc>(device, outputs * chunks);
    reduce_chunk_kernel<Term<T>, T, Acc><<<grid, kThreads, 0, stream>>>(a, partial.data_ptr<Acc>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    finish_chunks_kernel<Term<T>, T, Acc><<<grid_blocks(outputs), kThreads, 0, stream>>>(
        a, partial.data_ptr<Acc>(), outputs, chunks);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  // First's and Second's outputs (`outputs` each; independent reductions over the same terms) in one launch,
  // and (when split) one chunk pass: the same sums as reduce<First> then reduce<Second>, two launches fewer.
  template <template <typename> class First, template <typename> class Second, typename T>
  void reduce_two(int64_t outputs, const RoundArgs<T>& a) const {
    using Acc = at::acc_type<T, /*is_cuda=*/true>;
    if (outputs == 0) return;
    const int64_t chunks = reduction_chunks(outputs, a.batch * a.height * a.width);
    const dim3 grid(static_cast<unsigned>(2 * outputs), static_cast<unsigned>(chunks));
    if (chunks == 1) {
      reduce_chunk_two_kernel<First<T>, Second<T>, T, Acc><<<grid, kThreads, 0, stream>>>(a, nullptr, nullptr, outputs);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      return;
    }
    const at::Tensor partial = reduction_scratch<Acc>(device, 2 * outputs * chunks);
    Acc* first = partial.data_ptr<Acc>();
    Acc* second = first + outputs * chunks;
    reduce_chunk_two_kernel<First<T>, Second<T>, T, Acc><<<grid, kThreads, 0, stream>>>(a, first, second, outputs);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    finish_chunks_two_kernel<First<T>, Second<T>, T, Acc><<<grid_blocks(2 * outputs), kThreads, 0, stream>>>(
        a, first, outputs, chunks, second, outputs, chunks);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  // Two reduce_tiled's (independent reductions over the same terms, e.g. the pointwise and the depthwise weight
  // gradients) with one chunk pass for both: each output's sums as in its own reduce_tiled, one launch fewer.
  // The multi-sum passes stay two launches: in one kernel the depthwise tiles (128 registers a thread) would run
  // at the pointwise tiles' occupancy (159 registers: one 256-thread block per SM instead of two).
  template <template <typename> class FirstTerm, template <typename, typename> class FirstTiles,
            template <typename> class SecondTerm, template <typename, typename> class SecondTiles, typename T>
  void reduce_tiled_two(int64_t first_outputs, int64_t second_outputs, const RoundArgs<T>& a) const {
    using Acc = at::acc_type<T, /*is_cuda=*/true>;
    using First = FirstTiles<T, Acc>;
    using Second = SecondTiles<T, Acc>;
    if (first_outputs == 0 || second_outputs == 0) {
      reduce_tiled<FirstTerm, FirstTiles, T>(first_outputs, a);
      reduce_tiled<SecondTerm, SecondTiles, T>(second_outputs, a);
      return;
    }
    const int64_t terms = a.batch * a.height * a.width;
    check_covered(first_outputs, First::covered_outputs(a));
    check_covered(second_outputs, Second::covered_outputs(a));
    const int64_t first_chunks = reduction_chunks(First::tiles(a), terms);
    const int64_t second_chunks = reduction_chunks(Second::tiles(a), terms);
    const at::Tensor partial =
        reduction_scratch<Acc>(device, first_outputs * first_chunks + second_outputs * second_chunks);
    Acc* first_partial = partial.data_ptr<Acc>();
    Acc* second_partial = first_partial + first_outputs * first_chunks;
    const First first{a, first_partial, first_chunks};
    const Second second{a, second_partial, second_chunks};
    // tiles * chunks <= 2 * C * 64 blocks each: far below the grid's x limit.
    reduce_many_kernel<Acc, First><<<static_cast<unsigned>(First::tiles(a) * first_chunks), kThreads, 0, stream>>>(
        first);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    reduce_many_kernel<Acc, Second><<<static_cast<unsigned>(Second::tiles(a) * second_chunks), kThreads, 0,
                                      stream>>>(second);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    finish_chunks_two_kernel<FirstTerm<T>, SecondTerm<T>, T, Acc>
        <<<grid_blocks(first_outputs + second_outputs), kThreads, 0, stream>>>(
            a, first_partial, first_outputs, first_chunks, second_partial, second_outputs, second_chunks);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  // Every output's partials must be written by the tiles: the scratch is uninitialised.
  static void check_covered(int64_t outputs, int64_t covered) {
    TORCH_INTERNAL_ASSERT(outputs == covered, "bnao: reduce_tiled of ", outputs, " outputs, but the tiles cover ",
                          covered);
  }

  // Term's outputs through the multi-sum reduction Tiles (round_tiles.h, e.g. GradDwTiles): one block per
  // (tile, chunk) writes its chunk's sums of all the tile's outputs, then the second pass adds each output's
  // chunks in order and calls Term::finish.
  template <template <typename> class Term, template <typename, typename> class Tiles, typename T>
  void reduce_tiled(int64_t outputs, const RoundArgs<T>& a) const {
    using Acc = at::acc_type<T, /*is_cuda=*/true>;
    if (outputs == 0) return;
    check_covered(outputs, Tiles<T, Acc>::covered_outputs(a));
    const int64_t tiles = Tiles<T, Acc>::tiles(a);
    const int64_t chunks = reduction_chunks(tiles, a.batch * a.height * a.width);
    const at::Tensor partial = reduction_scratch<Acc>(device, outputs * chunks);
    const Tiles<T, Acc> reduction{a, partial.data_ptr<Acc>(), chunks};
    // tiles * chunks <= 2 * C * 64: far below the grid's x limit.
    reduce_many_kernel<Acc, Tiles<T, Acc>><<<static_cast<unsigned>(tiles * chunks), kThreads, 0, stream>>>(reduction);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    finish_chunks_kernel<Term<T>, T, Acc><<<grid_blocks(outputs), kThreads, 0, stream>>>(
        a, partial.data_ptr<Acc>(), outputs, chunks);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

// The CUDA backend of the kernels of cell/branch_round_ops.h: launches on the current stream of the
// activations' device, with that device current.
struct CudaBackend {
  static c10::cuda::CUDAGuard guard(const at::Tensor& like) { return c10::cuda::CUDAGuard(like.device()); }
  static CudaLauncher launcher(const at::Tensor& like) {
    return CudaLauncher{c10::cuda::getCurrentCUDAStream(like.device().index()).stream(), like.device()};
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(bnao, CUDA, m) { BNAO_REGISTER_BRANCH_ROUND(m, CudaBackend); }

}  // namespace cell
}  // namespace bnao
