// CUDA kernels of bnao::gather_rows, bnao::node_output, bnao::update_slot_stats and
// bnao::combine (and their backwards): the host side of cell/node_ops_host.h and
// cell/combine_ops.h on a grid. This
// file is only the launch layer. Nothing here reads device data on the host (no
// synchronisation, static launch shapes), so the ops can be captured in a CUDA
// graph; index bounds are asserted on the device by the work items instead of
// checked on the host as the CPU backend does, and the unique-rows precondition
// of gather_rows' backward and update_slot_stats is the caller's.
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>
#include <vector>

#include "cell/combine_ops.h"
#include "cell/cuda/launch.cuh"
#include "cell/node_ops_host.h"

namespace bnao {
namespace cell {
namespace {

template <typename Item>
__global__ void __launch_bounds__(kThreads) for_each_kernel(const Item item, int64_t count) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < count; e += stride) item(e);
}

// Block (output, chunk) of a two-sum reduction split over gridDim.y chunks (cell/reduction_split.h): thread t
// adds the terms chunk * kThreads + t, + chunks * kThreads, ...; the block adds the threads' sums with two
// fixed-shape trees. With one chunk the block finishes the output itself; otherwise it writes the pair to
// partial[(output * chunks + chunk) * 2 + {0, 1}] for finish_pair_chunks_kernel.
template <typename Acc, typename Reduction>
__global__ void __launch_bounds__(kThreads) reduce_pair_chunk_kernel(const Reduction reduction, Acc* partial) {
  const int64_t output = blockIdx.x, chunk = blockIdx.y, chunks = gridDim.y;
  Acc first, second;
  reduction.partial(output, chunk * kThreads + threadIdx.x, chunks * kThreads, &first, &second);
  first = block_sum(first);
  second = block_sum(second);
  if (threadIdx.x != 0) return;
  if (chunks == 1) {
    reduction.finish(output, first, second);
  } else {
    partial[(output * chunks + chunk) * 2] = first;
    partial[(output * chunks + chunk) * 2 + 1] = second;
  }
}

// The second pass of a split two-sum reduction: one thread per output adds its chunks in chunk order.
template <typename Acc, typename Reduction>
__global__ void __launch_bounds__(kThreads)
    finish_pair_chunks_kernel(const Reduction reduction, const Acc* partial, int64_t outputs, int64_t chunks) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t output = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; output < outputs;
       output += stride) {
    const Acc* pairs = partial + output * chunks * 2;
    Acc first = pairs[0], second = pairs[1];
    for (int64_t chunk = 1; chunk < chunks; ++chunk) {
      first += pairs[chunk * 2];
      second += pairs[chunk * 2 + 1];
    }
    reduction.finish(output, first, second);
  }
}

struct CudaLauncher {
  cudaStream_t stream;
  c10::Device device;

  template <typename Item>
  void for_each(int64_t count, const Item& item) const {
    if (count == 0) return;
    for_each_kernel<Item><<<grid_blocks(count), kThreads, 0, stream>>>(item, count);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  // Blocks in the grid's x dimension, one per output (at most 2^31 - 1).
  static unsigned reduction_blocks(int64_t outputs) {
    TORCH_CHECK(outputs <= std::numeric_limits<int32_t>::max(), "bnao: ", outputs,
                " reduction outputs exceed the CUDA grid's limit of 2^31 - 1 blocks");
    return static_cast<unsigned>(outputs);
  }

  template <typename Acc, typename Reduction>
  void reduce_many(int64_t outputs, const Reduction& reduction) const {
    if (outputs == 0) return;
    reduce_many_kernel<Acc, Reduction><<<reduction_blocks(outputs), kThreads, 0, stream>>>(reduction);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  // Outputs split over reduction_chunks(outputs, reduction.terms()) blocks each, then a second pass.
  template <typename Acc, typename Reduction>
  void reduce_pairs(int64_t outputs, const Reduction& reduction) const {
    if (outputs == 0) return;
    const int64_t chunks = reduction_chunks(outputs, reduction.terms());
    const dim3 grid(reduction_blocks(outputs), static_cast<unsigned>(chunks));
    if (chunks == 1) {
      reduce_pair_chunk_kernel<Acc, Reduction><<<grid, kThreads, 0, stream>>>(reduction, nullptr);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      return;
    }
    const at::Tensor partial = reduction_scratch<Acc>(device, outputs * chunks * 2);
    reduce_pair_chunk_kernel<Acc, Reduction><<<grid, kThreads, 0, stream>>>(reduction, partial.data_ptr<Acc>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    finish_pair_chunks_kernel<Acc, Reduction><<<grid_blocks(outputs), kThreads, 0, stream>>>(
        reduction, partial.data_ptr<Acc>(), outputs, chunks);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

// Launches on the current stream of the arguments' device, with that device current.
struct CudaBackend {
  static constexpr bool is_cuda = true;
  static c10::cuda::CUDAGuard guard(const at::Tensor& like) { return c10::cuda::CUDAGuard(like.device()); }
  static CudaLauncher launcher(const at::Tensor& like) {
    return CudaLauncher{c10::cuda::getCurrentCUDAStream(like.device().index()).stream(), like.device()};
  }
  // Index values stay on the device (reading them would synchronise): the work items assert bounds.
  static void check_gather_indices(const char*, const at::Tensor&, const at::Tensor&, const std::vector<int64_t>&) {}
  static void check_slot_rows(const at::Tensor&, int64_t) {}
};

}  // namespace

TORCH_LIBRARY_IMPL(bnao, CUDA, m) {
  BNAO_REGISTER_NODE_OPS(m, CudaBackend);
  BNAO_REGISTER_COMBINE(m, CudaBackend);
}

}  // namespace cell
}  // namespace bnao
