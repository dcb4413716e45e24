// Host side of bnao::gather_rows, bnao::node_output and bnao::update_slot_stats
// (and their backwards), shared by the CPU and CUDA kernels: the argument
// checks of node_args.h, allocation, and the bodies of node_ops.h bound into
// work items and run on a backend's launcher. A backend (cpu/node_ops_cpu.cpp,
// cuda/node_ops_cuda.cu) provides:
//   guard(t)                        makes t's device current for the call;
//   launcher(t).for_each(n, item)   item(e) for every e < n;
//   launcher(t).reduce_pairs<Acc>(n, reduction)
//                                   for every output o < n, reduction.finish(o, a, b) with (a, b) the
//                                   sums of reduction.partial(o, begin, step, ...) over a fixed split
//                                   (on CUDA, of reduction.terms() terms: cell/reduction_split.h);
//   check_gather_indices / check_slot_rows
//                                   host checks of index values (the CPU's; the CUDA backend cannot read
//                                   device data without a synchronisation, its work items assert instead);
//   is_cuda                         which accumulation type (at::acc_type) the reductions use.
#pragma once

#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <c10/macros/Macros.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <tuple>
#include <vector>

#include "cell/node_args.h"
#include "cell/node_ops.h"

namespace bnao {
namespace cell {

// A bound check of device data: asserted on the device, a no-op on the host (the CPU kernels check the
// same values on the host before launching, with a message naming the entry).
#if defined(__CUDA_ARCH__)
#define BNAO_DEVICE_ASSERT(condition) CUDA_KERNEL_ASSERT(condition)
#else
#define BNAO_DEVICE_ASSERT(condition) ((void)0)
#endif

// ------------------------------------------------------------------ work items
// Plain loads: the old per-op kernels' __restrict__ arguments gave read-only-cache (ld.global.nc) loads,
// which these functors do not; on sm_70 and later global loads are L1-cached anyway, and each element
// here is read once. A GPU profile decides whether __ldg is worth adding to the bodies.
template <typename Ptr>
BNAO_CELL_HD void assert_gather_index(int64_t e, const StackTable<Ptr>& table, const GatherShape& shape,
                                      const int64_t* select, const int64_t* rows) {
  const int64_t r = e / shape.inner;
  const int64_t s = select[r];
  BNAO_DEVICE_ASSERT(s < table.num_stacks && "bnao::gather_rows: select names a stack that does not exist");
  BNAO_DEVICE_ASSERT((s < 0 || (rows[r] >= 0 && rows[r] < table.rows[s])) &&
                     "bnao::gather_rows: a row is outside its stack");
  (void)r;
  (void)s;
  (void)table;
  (void)rows;
}

template <typename T>
struct GatherRowsItem {
  StackTable<const T*> table;
  GatherShape shape;
  const int64_t* select;
  const int64_t* rows;
  T* out;
  BNAO_CELL_HD void operator()(int64_t e) const {
    assert_gather_index(e, table, shape, select, rows);
    gather_rows_item(e, table, shape, select, rows, out);
  }
};

template <typename T>
struct GatherRowsBackwardItem {
  StackTable<T*> grads;
  GatherShape shape;
  const int64_t* select;
  const int64_t* rows;
  const T* grad;
  BNAO_CELL_HD void operator()(int64_t e) const {
    assert_gather_index(e, grads, shape, select, rows);
    gather_rows_backward_item(e, grads, shape, select, rows, grad);
  }
};

template <typename T>
struct NodeOutputItem {
  NodeArgs<T> args;
  T* out;
  BNAO_CELL_HD void operator()(int64_t e) const { node_output_item(e, args, out); }
};

template <typename T>
struct NodeOutputGradPreItem {
  NodeArgs<T> args;
  const T* grad;
  T* grad_pre;
  BNAO_CELL_HD void operator()(int64_t e) const { node_output_grad_pre_item(e, args, grad, grad_pre); }
};

// Output o = (branch, channel) of node_output's statistics and BN2 parameter gradients.
template <typename T, typename Acc>
struct NodeOutputParamReduction {
  using P = Compute<T>;
  NodeArgs<T> args;
  const T* grad;
  P* grad_mean;
  P* grad_invstd;
  P* grad_gamma;
  P* grad_beta;
  BNAO_CELL_HD void partial(int64_t output, int64_t begin, int64_t step, Acc* sum_grad, Acc* sum_centered) const {
    node_output_param_partial<T, Acc>(static_cast<int>(output / args.channels), output % args.channels, begin, step,
                                      args, grad, sum_grad, sum_centered);
  }
  // Terms per output (the CUDA launcher splits outputs with many terms over several blocks).
  int64_t terms() const { return args.batch * args.plane; }
  BNAO_CELL_HD void finish(int64_t output, Acc sum_grad, Acc sum_centered) const {
    node_output_param_finish<T, Acc>(static_cast<int>(output / args.channels), output % args.channels, sum_grad,
                                     sum_centered, args, grad_mean, grad_invstd, grad_gamma, grad_beta);
  }
};

template <typename T>
struct UpdateSlotStatsItem {
  int64_t channels;
  int64_t num_rows;
  const int64_t* bn_rows;
  const T* mean;
  const T* invstd;
  T momentum, eps, unbias;
  T* running_mean;
  T* running_var;
  BNAO_CELL_HD void operator()(int64_t e) const {
    BNAO_DEVICE_ASSERT(bn_rows[e / channels] < num_rows && "bnao::update_slot_stats: a bn_rows entry is out of range");
    update_slot_stats_item(e, channels, bn_rows, mean, invstd, momentum, eps, unbias, running_mean, running_var);
  }
};

// ------------------------------------------------------------------ kernels
// A StackTable over `tensors` (each [rows, trailing...], contiguous, of dtype T).
template <typename Ptr, typename T>
StackTable<Ptr> make_stack_table(const char* op, const std::vector<at::Tensor>& tensors, const GatherShape& shape) {
  StackTable<Ptr> table{};
  table.num_stacks = static_cast<int>(tensors.size());
  for (int s = 0; s < table.num_stacks; ++s) {
    table.data[s] = tensors[s].data_ptr<T>();
    fill_stack_sizes(op, &table, s, tensors[s].sizes(), shape);
  }
  return table;
}

template <typename Backend>
at::Tensor gather_rows_kernel(at::TensorList stacks, const at::Tensor& select, const at::Tensor& rows,
                              at::IntArrayRef shape) {
  const GatherShape gather_shape = check_gather_rows_args(stacks, select, rows, shape);
  [[maybe_unused]] const auto guard = Backend::guard(stacks[0]);
  std::vector<at::Tensor> contiguous;
  std::vector<int64_t> stack_rows;
  for (const at::Tensor& s : stacks) {
    contiguous.push_back(s.contiguous());
    stack_rows.push_back(s.size(0));
  }
  const at::Tensor sel = select.contiguous(), row = rows.contiguous();
  Backend::check_gather_indices("gather_rows", sel, row, stack_rows);
  std::vector<int64_t> out_sizes = {sel.numel()};
  out_sizes.insert(out_sizes.end(), shape.begin(), shape.end());
  at::Tensor out = at::empty(out_sizes, stacks[0].options());
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "bnao::gather_rows", [&] {
    const GatherRowsItem<scalar_t> item{make_stack_table<const scalar_t*, scalar_t>("gather_rows", contiguous,
                                                                                     gather_shape),
                                        gather_shape, sel.data_ptr<int64_t>(), row.data_ptr<int64_t>(),
                                        out.data_ptr<scalar_t>()};
    Backend::launcher(out).for_each(out.numel(), item);
  });
  return out;
}

template <typename Backend>
std::vector<at::Tensor> gather_rows_backward_kernel(const at::Tensor& grad, const at::Tensor& select,
                                                    const at::Tensor& rows, at::IntArrayRef stack_sizes) {
  const GatherShape gather_shape = check_gather_rows_backward_args(grad, select, rows);
  const auto sizes = split_stack_sizes(stack_sizes, gather_shape);
  [[maybe_unused]] const auto guard = Backend::guard(grad);
  std::vector<int64_t> stack_rows;
  std::vector<at::Tensor> grads;
  for (const auto& s : sizes) {
    stack_rows.push_back(s[0]);
    grads.push_back(at::zeros(s, grad.options()));  // untouched rows get exact zeros
  }
  const at::Tensor sel = select.contiguous(), row = rows.contiguous(), g = grad.contiguous();
  Backend::check_gather_indices("gather_rows_backward", sel, row, stack_rows);
  AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "bnao::gather_rows_backward", [&] {
    const GatherRowsBackwardItem<scalar_t> item{
        make_stack_table<scalar_t*, scalar_t>("gather_rows_backward", grads, gather_shape), gather_shape,
        sel.data_ptr<int64_t>(), row.data_ptr<int64_t>(), g.data_ptr<scalar_t>()};
    Backend::launcher(g).for_each(g.numel(), item);
  });
  return grads;
}

template <typename Backend>
at::Tensor node_output_kernel(const at::Tensor& pre, const at::Tensor& code, const at::Tensor& mean,
                              const at::Tensor& invstd, const at::Tensor& gamma, const at::Tensor& beta,
                              const std::optional<at::Tensor>& drop_mask) {
  check_node_output_args("node_output", pre, code, mean, invstd, gamma, beta, drop_mask);
  [[maybe_unused]] const auto guard = Backend::guard(pre);
  const at::Tensor p = pre.contiguous(), k = code.contiguous();
  const at::Tensor m = mean.contiguous(), v = invstd.contiguous(), g = gamma.contiguous(), b = beta.contiguous();
  const at::Tensor mask = drop_mask.has_value() ? drop_mask->contiguous() : at::Tensor();
  at::Tensor out = at::empty(p.sizes().slice(1), p.options());
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, p.scalar_type(), "bnao::node_output", [&] {
    const NodeOutputItem<scalar_t> item{make_node_args<scalar_t>(p, k, m, v, g, b, mask), out.data_ptr<scalar_t>()};
    Backend::launcher(out).for_each(out.numel(), item);
  });
  return out;
}

template <typename Backend>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> node_output_backward_kernel(
    const at::Tensor& grad, const at::Tensor& pre, const at::Tensor& code, const at::Tensor& mean,
    const at::Tensor& invstd, const at::Tensor& gamma, const std::optional<at::Tensor>& drop_mask) {
  check_node_output_args("node_output_backward", pre, code, mean, invstd, gamma, std::nullopt, drop_mask);
  TORCH_CHECK(grad.sizes() == pre.sizes().slice(1) && grad.scalar_type() == pre.scalar_type() &&
                  grad.device() == pre.device(),
              "bnao::node_output_backward: grad must be [N, C, H, W] = ", pre.sizes().slice(1),
              " of pre's dtype and device, got ", grad.scalar_type(), " of shape ", grad.sizes(), " on ",
              grad.device());
  [[maybe_unused]] const auto guard = Backend::guard(pre);
  const at::Tensor p = pre.contiguous(), k = code.contiguous(), g_out = grad.contiguous();
  const at::Tensor m = mean.contiguous(), v = invstd.contiguous(), g = gamma.contiguous();
  const at::Tensor mask = drop_mask.has_value() ? drop_mask->contiguous() : at::Tensor();
  at::Tensor grad_pre = at::empty_like(p);
  at::Tensor grad_mean = at::empty_like(m), grad_invstd = at::empty_like(m);
  at::Tensor grad_gamma = at::empty_like(m), grad_beta = at::empty_like(m);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, p.scalar_type(), "bnao::node_output_backward", [&] {
    using P = Compute<scalar_t>;
    using Acc = at::acc_type<scalar_t, Backend::is_cuda>;
    const NodeArgs<scalar_t> args = make_node_args<scalar_t>(p, k, m, v, g, at::Tensor(), mask);
    const scalar_t* grad_ptr = g_out.data_ptr<scalar_t>();
    const auto launcher = Backend::launcher(p);
    launcher.for_each(grad_pre.numel(), NodeOutputGradPreItem<scalar_t>{args, grad_ptr, grad_pre.data_ptr<scalar_t>()});
    // One output per (branch, channel), summed in a fixed order: deterministic on every device.
    const NodeOutputParamReduction<scalar_t, Acc> reduction{args,
                                                             grad_ptr,
                                                             grad_mean.data_ptr<P>(),
                                                             grad_invstd.data_ptr<P>(),
                                                             grad_gamma.data_ptr<P>(),
                                                             grad_beta.data_ptr<P>()};
    launcher.template reduce_pairs<Acc>(m.numel(), reduction);
  });
  return {grad_pre, grad_mean, grad_invstd, grad_gamma, grad_beta};
}

template <typename Backend>
void update_slot_stats_kernel(const at::Tensor& running_mean, const at::Tensor& running_var, const at::Tensor& bn_rows,
                              const at::Tensor& mean, const at::Tensor& invstd, double momentum, double eps,
                              int64_t count) {
  check_update_slot_stats_args(running_mean, running_var, bn_rows, mean, invstd, count);
  [[maybe_unused]] const auto guard = Backend::guard(running_mean);
  const at::Tensor rows = bn_rows.contiguous();
  Backend::check_slot_rows(rows, running_mean.size(0));
  // The eager path folds float32 statistics into the buffers: convert to the buffers' dtype first.
  const at::Tensor m = mean.to(running_mean.scalar_type()).contiguous();
  const at::Tensor v = invstd.to(running_mean.scalar_type()).contiguous();
  AT_DISPATCH_FLOATING_TYPES(running_mean.scalar_type(), "bnao::update_slot_stats", [&] {
    const scalar_t unbias = static_cast<scalar_t>(static_cast<double>(count) / std::max<int64_t>(count - 1, 1));
    const UpdateSlotStatsItem<scalar_t> item{running_mean.size(1),
                                             running_mean.size(0),
                                             rows.data_ptr<int64_t>(),
                                             m.data_ptr<scalar_t>(),
                                             v.data_ptr<scalar_t>(),
                                             static_cast<scalar_t>(momentum),
                                             static_cast<scalar_t>(eps),
                                             unbias,
                                             running_mean.data_ptr<scalar_t>(),
                                             running_var.data_ptr<scalar_t>()};
    Backend::launcher(m).for_each(m.numel(), item);
  });
}

// Registers a backend's kernels (inside TORCH_LIBRARY_IMPL(bnao, <key>, m)).
#define BNAO_REGISTER_NODE_OPS(m, Backend)                                                          \
  do {                                                                                              \
    (m).impl("gather_rows", &::bnao::cell::gather_rows_kernel<Backend>);                           \
    (m).impl("gather_rows_backward", &::bnao::cell::gather_rows_backward_kernel<Backend>);         \
    (m).impl("node_output", &::bnao::cell::node_output_kernel<Backend>);                           \
    (m).impl("node_output_backward", &::bnao::cell::node_output_backward_kernel<Backend>);         \
    (m).impl("update_slot_stats", &::bnao::cell::update_slot_stats_kernel<Backend>);               \
  } while (0)

#undef BNAO_DEVICE_ASSERT

}  // namespace cell
}  // namespace bnao
