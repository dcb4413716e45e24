// CUDA kernels of bnao::gather_rows, bnao::node_output and
// bnao::update_slot_stats (and their backwards): a thin launch layer over the
// shared bodies of cell/node_ops.h. Nothing here reads device data on the host
// (no synchronisation, static launch shapes), so the ops can be captured in a
// CUDA graph; index bounds are asserted on the device instead of checked on the
// host as the CPU kernels do, and the unique-rows precondition of gather_rows'
// backward and update_slot_stats is the caller's (the CPU kernels check it).
#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/macros/Macros.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <tuple>
#include <vector>

#include "cell/node_args.h"
#include "cell/node_ops.h"

namespace bnao {
namespace cell {
namespace {

constexpr int kThreads = 256;
// Grid-stride loops cover any size; this many blocks fill an H100 several times over.
constexpr int64_t kMaxBlocks = 4096;

unsigned blocks_for(int64_t items) {
  return static_cast<unsigned>(std::min<int64_t>((items + kThreads - 1) / kThreads, kMaxBlocks));
}

cudaStream_t current_stream(const at::Tensor& t) { return c10::cuda::getCurrentCUDAStream(t.device().index()).stream(); }

template <typename Ptr>
__device__ __forceinline__ void assert_gather_index(int64_t e, const StackTable<Ptr>& table, const GatherShape& shape,
                                                    const int64_t* select, const int64_t* rows) {
  const int64_t r = e / shape.inner;
  const int64_t s = select[r];
  CUDA_KERNEL_ASSERT(s < table.num_stacks && "bnao::gather_rows: select names a stack that does not exist");
  CUDA_KERNEL_ASSERT((s < 0 || (rows[r] >= 0 && rows[r] < table.rows[s])) &&
                     "bnao::gather_rows: a row is outside its stack");
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    gather_rows_kernel(StackTable<const scalar_t*> table, GatherShape shape, const int64_t* __restrict__ select,
                       const int64_t* __restrict__ rows, scalar_t* __restrict__ out, int64_t numel) {
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < numel;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    assert_gather_index(e, table, shape, select, rows);
    gather_rows_item(e, table, shape, select, rows, out);
  }
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    gather_rows_backward_kernel(StackTable<scalar_t*> grads, GatherShape shape, const int64_t* __restrict__ select,
                                const int64_t* __restrict__ rows, const scalar_t* __restrict__ grad, int64_t numel) {
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < numel;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    assert_gather_index(e, grads, shape, select, rows);
    gather_rows_backward_item(e, grads, shape, select, rows, grad);
  }
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    node_output_kernel(NodeArgs<scalar_t> args, scalar_t* __restrict__ out, int64_t numel) {
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < numel;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    node_output_item(e, args, out);
  }
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    node_output_grad_pre_kernel(NodeArgs<scalar_t> args, const scalar_t* __restrict__ grad,
                                scalar_t* __restrict__ grad_pre, int64_t numel) {
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < numel;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    node_output_grad_pre_item(e, args, grad, grad_pre);
  }
}

// One block per (branch, channel): strided partial sums, then a fixed-shape
// shared-memory tree, so the result is deterministic run to run.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    node_output_param_kernel(NodeArgs<scalar_t> args, const scalar_t* __restrict__ grad, Compute<scalar_t>* grad_mean,
                             Compute<scalar_t>* grad_invstd, Compute<scalar_t>* grad_gamma,
                             Compute<scalar_t>* grad_beta) {
  __shared__ acc_t partial[2][kThreads];
  const int b = static_cast<int>(blockIdx.x / args.channels);
  const int64_t c = blockIdx.x % args.channels;
  acc_t sum_grad, sum_grad_centered;
  node_output_param_partial<scalar_t, acc_t>(b, c, threadIdx.x, blockDim.x, args, grad, &sum_grad,
                                             &sum_grad_centered);
  partial[0][threadIdx.x] = sum_grad;
  partial[1][threadIdx.x] = sum_grad_centered;
  __syncthreads();
  for (int width = kThreads / 2; width > 0; width /= 2) {
    if (threadIdx.x < width) {
      partial[0][threadIdx.x] += partial[0][threadIdx.x + width];
      partial[1][threadIdx.x] += partial[1][threadIdx.x + width];
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    node_output_param_finish<scalar_t, acc_t>(b, c, partial[0][0], partial[1][0], args, grad_mean, grad_invstd,
                                              grad_gamma, grad_beta);
  }
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    update_slot_stats_kernel(int64_t channels, int64_t num_rows, const int64_t* __restrict__ bn_rows,
                             const scalar_t* __restrict__ mean, const scalar_t* __restrict__ invstd, scalar_t momentum,
                             scalar_t eps, scalar_t unbias, scalar_t* running_mean, scalar_t* running_var,
                             int64_t numel) {
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < numel;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    CUDA_KERNEL_ASSERT(bn_rows[e / channels] < num_rows && "bnao::update_slot_stats: a bn_rows entry is out of range");
    update_slot_stats_item(e, channels, bn_rows, mean, invstd, momentum, eps, unbias, running_mean, running_var);
  }
}

// ---------------------------------------------------------------- launchers
at::Tensor gather_rows_cuda(at::TensorList stacks, const at::Tensor& select, const at::Tensor& rows,
                            at::IntArrayRef shape) {
  const GatherShape gather_shape = check_gather_rows_args(stacks, select, rows, shape);
  const c10::cuda::CUDAGuard guard(stacks[0].device());
  std::vector<at::Tensor> contiguous;
  for (const at::Tensor& s : stacks) contiguous.push_back(s.contiguous());
  const at::Tensor sel = select.contiguous(), row = rows.contiguous();
  std::vector<int64_t> out_sizes = {sel.numel()};
  out_sizes.insert(out_sizes.end(), shape.begin(), shape.end());
  at::Tensor out = at::empty(out_sizes, stacks[0].options());
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "bnao::gather_rows", [&] {
    StackTable<const scalar_t*> table{};
    table.num_stacks = static_cast<int>(contiguous.size());
    for (int s = 0; s < table.num_stacks; ++s) {
      table.data[s] = contiguous[s].data_ptr<scalar_t>();
      fill_stack_sizes("gather_rows", &table, s, contiguous[s].sizes(), gather_shape);
    }
    gather_rows_kernel<scalar_t><<<blocks_for(out.numel()), kThreads, 0, current_stream(out)>>>(
        table, gather_shape, sel.data_ptr<int64_t>(), row.data_ptr<int64_t>(), out.data_ptr<scalar_t>(), out.numel());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

std::vector<at::Tensor> gather_rows_backward_cuda(const at::Tensor& grad, const at::Tensor& select,
                                                  const at::Tensor& rows, at::IntArrayRef stack_sizes) {
  const GatherShape gather_shape = check_gather_rows_backward_args(grad, select, rows);
  const auto sizes = split_stack_sizes(stack_sizes, gather_shape);
  const c10::cuda::CUDAGuard guard(grad.device());
  std::vector<at::Tensor> grads;
  for (const auto& s : sizes) grads.push_back(at::zeros(s, grad.options()));  // untouched rows: exact zeros
  const at::Tensor sel = select.contiguous(), row = rows.contiguous(), g = grad.contiguous();
  if (g.numel() == 0) return grads;
  AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "bnao::gather_rows_backward", [&] {
    StackTable<scalar_t*> table{};
    table.num_stacks = static_cast<int>(grads.size());
    for (int s = 0; s < table.num_stacks; ++s) {
      table.data[s] = grads[s].data_ptr<scalar_t>();
      fill_stack_sizes("gather_rows_backward", &table, s, grads[s].sizes(), gather_shape);
    }
    gather_rows_backward_kernel<scalar_t><<<blocks_for(g.numel()), kThreads, 0, current_stream(g)>>>(
        table, gather_shape, sel.data_ptr<int64_t>(), row.data_ptr<int64_t>(), g.data_ptr<scalar_t>(), g.numel());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return grads;
}

at::Tensor node_output_cuda(const at::Tensor& pre, const at::Tensor& code, const at::Tensor& mean,
                            const at::Tensor& invstd, const at::Tensor& gamma, const at::Tensor& beta,
                            const c10::optional<at::Tensor>& drop_mask) {
  check_node_output_args("node_output", pre, code, mean, invstd, gamma, beta, drop_mask);
  const c10::cuda::CUDAGuard guard(pre.device());
  const at::Tensor p = pre.contiguous(), k = code.contiguous();
  const at::Tensor m = mean.contiguous(), v = invstd.contiguous(), g = gamma.contiguous(), b = beta.contiguous();
  const at::Tensor mask = drop_mask.has_value() ? drop_mask->contiguous() : at::Tensor();
  at::Tensor out = at::empty(p.sizes().slice(1), p.options());
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, p.scalar_type(), "bnao::node_output", [&] {
    const NodeArgs<scalar_t> args = make_node_args<scalar_t>(p, k, m, v, g, b, mask);
    node_output_kernel<scalar_t><<<blocks_for(out.numel()), kThreads, 0, current_stream(out)>>>(
        args, out.data_ptr<scalar_t>(), out.numel());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> node_output_backward_cuda(
    const at::Tensor& grad, const at::Tensor& pre, const at::Tensor& code, const at::Tensor& mean,
    const at::Tensor& invstd, const at::Tensor& gamma, const c10::optional<at::Tensor>& drop_mask) {
  check_node_output_args("node_output_backward", pre, code, mean, invstd, gamma, c10::nullopt, drop_mask);
  TORCH_CHECK(grad.sizes() == pre.sizes().slice(1) && grad.scalar_type() == pre.scalar_type() &&
                  grad.device() == pre.device(),
              "bnao::node_output_backward: grad must be [N, C, H, W] = ", pre.sizes().slice(1),
              " of pre's dtype and device, got ", grad.scalar_type(), " of shape ", grad.sizes());
  const c10::cuda::CUDAGuard guard(pre.device());
  const at::Tensor p = pre.contiguous(), k = code.contiguous(), g_out = grad.contiguous();
  const at::Tensor m = mean.contiguous(), v = invstd.contiguous(), g = gamma.contiguous();
  const at::Tensor mask = drop_mask.has_value() ? drop_mask->contiguous() : at::Tensor();
  at::Tensor grad_pre = at::empty_like(p);
  at::Tensor grad_mean = at::empty_like(m), grad_invstd = at::empty_like(m);
  at::Tensor grad_gamma = at::empty_like(m), grad_beta = at::empty_like(m);
  if (m.numel() == 0) return {grad_pre, grad_mean, grad_invstd, grad_gamma, grad_beta};
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, p.scalar_type(), "bnao::node_output_backward", [&] {
    using P = Compute<scalar_t>;
    using acc_t = at::acc_type<scalar_t, /*is_cuda=*/true>;
    const NodeArgs<scalar_t> args = make_node_args<scalar_t>(p, k, m, v, g, at::Tensor(), mask);
    cudaStream_t stream = current_stream(p);
    if (grad_pre.numel() > 0) {
      node_output_grad_pre_kernel<scalar_t><<<blocks_for(grad_pre.numel()), kThreads, 0, stream>>>(
          args, g_out.data_ptr<scalar_t>(), grad_pre.data_ptr<scalar_t>(), grad_pre.numel());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    node_output_param_kernel<scalar_t, acc_t><<<static_cast<unsigned>(m.numel()), kThreads, 0, stream>>>(
        args, g_out.data_ptr<scalar_t>(), grad_mean.data_ptr<P>(), grad_invstd.data_ptr<P>(),
        grad_gamma.data_ptr<P>(), grad_beta.data_ptr<P>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {grad_pre, grad_mean, grad_invstd, grad_gamma, grad_beta};
}

void update_slot_stats_cuda(const at::Tensor& running_mean, const at::Tensor& running_var, const at::Tensor& bn_rows,
                            const at::Tensor& mean, const at::Tensor& invstd, double momentum, double eps,
                            int64_t count) {
  check_update_slot_stats_args(running_mean, running_var, bn_rows, mean, invstd, count);
  const c10::cuda::CUDAGuard guard(running_mean.device());
  const at::Tensor rows = bn_rows.contiguous();
  const at::Tensor m = mean.to(running_mean.scalar_type()).contiguous();
  const at::Tensor v = invstd.to(running_mean.scalar_type()).contiguous();
  if (m.numel() == 0) return;
  AT_DISPATCH_FLOATING_TYPES(running_mean.scalar_type(), "bnao::update_slot_stats", [&] {
    const scalar_t unbias = static_cast<scalar_t>(static_cast<double>(count) / std::max<int64_t>(count - 1, 1));
    update_slot_stats_kernel<scalar_t><<<blocks_for(m.numel()), kThreads, 0, current_stream(m)>>>(
        running_mean.size(1), running_mean.size(0), rows.data_ptr<int64_t>(), m.data_ptr<scalar_t>(),
        v.data_ptr<scalar_t>(), static_cast<scalar_t>(momentum), static_cast<scalar_t>(eps), unbias,
        running_mean.data_ptr<scalar_t>(), running_var.data_ptr<scalar_t>(), m.numel());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace
}  // namespace cell

TORCH_LIBRARY_IMPL(bnao, CUDA, m) {
  m.impl("gather_rows", &cell::gather_rows_cuda);
  m.impl("gather_rows_backward", &cell::gather_rows_backward_cuda);
  m.impl("node_output", &cell::node_output_cuda);
  m.impl("node_output_backward", &cell::node_output_backward_cuda);
  m.impl("update_slot_stats", &cell::update_slot_stats_cuda);
}

}  // namespace bnao
