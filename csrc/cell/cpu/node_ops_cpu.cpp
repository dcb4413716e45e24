// CPU kernels of bnao::gather_rows, bnao::node_output and
// bnao::update_slot_stats (and their backwards): the shared bodies of
// cell/node_ops.h under at::parallel_for. Every output element is written by
// exactly one work item and every reduction runs in a fixed order, so results
// do not depend on the thread count.
#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>
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

constexpr int64_t kGrain = 16384;

// Host-side checks of the index values (cheap: one pass over R entries).
// Unique rows per stack is the precondition of the backward's plain writes.
void check_gather_indices(const char* op, const at::Tensor& select, const at::Tensor& rows,
                          const std::vector<int64_t>& stack_rows) {
  const int64_t* sel = select.data_ptr<int64_t>();
  const int64_t* row = rows.data_ptr<int64_t>();
  std::vector<std::vector<bool>> seen(stack_rows.size());
  for (size_t s = 0; s < stack_rows.size(); ++s) seen[s].assign(static_cast<size_t>(stack_rows[s]), false);
  const int64_t num_stacks = static_cast<int64_t>(stack_rows.size());
  for (int64_t r = 0; r < select.numel(); ++r) {
    const int64_t s = sel[r];
    if (s < 0) continue;
    TORCH_CHECK(s < num_stacks, "bnao::", op, ": select[", r, "] = ", s, " but there are ", num_stacks, " stacks");
    TORCH_CHECK(row[r] >= 0 && row[r] < stack_rows[s], "bnao::", op, ": rows[", r, "] = ", row[r],
                " is outside stack ", s, "'s ", stack_rows[s], " rows");
    TORCH_CHECK(!seen[s][row[r]], "bnao::", op, ": row ", row[r], " of stack ", s,
                " is selected twice; rows must be unique per stack (a slot is used once per cell)");
    seen[s][row[r]] = true;
  }
}

at::Tensor gather_rows_cpu(at::TensorList stacks, const at::Tensor& select, const at::Tensor& rows,
                           at::IntArrayRef shape) {
  const GatherShape gather_shape = check_gather_rows_args(stacks, select, rows, shape);
  std::vector<at::Tensor> contiguous;
  std::vector<int64_t> stack_rows;
  for (const at::Tensor& s : stacks) {
    contiguous.push_back(s.contiguous());
    stack_rows.push_back(s.size(0));
  }
  const at::Tensor sel = select.contiguous();
  const at::Tensor row = rows.contiguous();
  check_gather_indices("gather_rows", sel, row, stack_rows);
  std::vector<int64_t> out_sizes = {sel.numel()};
  out_sizes.insert(out_sizes.end(), shape.begin(), shape.end());
  at::Tensor out = at::empty(out_sizes, stacks[0].options());
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "bnao::gather_rows", [&] {
    StackTable<const scalar_t*> table{};
    table.num_stacks = static_cast<int>(contiguous.size());
    for (int s = 0; s < table.num_stacks; ++s) {
      table.data[s] = contiguous[s].data_ptr<scalar_t>();
      fill_stack_sizes("gather_rows", &table, s, contiguous[s].sizes(), gather_shape);
    }
    const int64_t* sel_ptr = sel.data_ptr<int64_t>();
    const int64_t* row_ptr = row.data_ptr<int64_t>();
    scalar_t* out_ptr = out.data_ptr<scalar_t>();
    at::parallel_for(0, out.numel(), kGrain, [&](int64_t begin, int64_t end) {
      for (int64_t e = begin; e < end; ++e) gather_rows_item(e, table, gather_shape, sel_ptr, row_ptr, out_ptr);
    });
  });
  return out;
}

std::vector<at::Tensor> gather_rows_backward_cpu(const at::Tensor& grad, const at::Tensor& select,
                                                 const at::Tensor& rows, at::IntArrayRef stack_sizes) {
  const GatherShape gather_shape = check_gather_rows_backward_args(grad, select, rows);
  const auto sizes = split_stack_sizes(stack_sizes, gather_shape);
  std::vector<int64_t> stack_rows;
  std::vector<at::Tensor> grads;
  for (const auto& s : sizes) {
    stack_rows.push_back(s[0]);
    grads.push_back(at::zeros(s, grad.options()));  // untouched rows get exact zeros
  }
  const at::Tensor sel = select.contiguous();
  const at::Tensor row = rows.contiguous();
  check_gather_indices("gather_rows_backward", sel, row, stack_rows);
  const at::Tensor g = grad.contiguous();
  AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "bnao::gather_rows_backward", [&] {
    StackTable<scalar_t*> table{};
    table.num_stacks = static_cast<int>(grads.size());
    for (int s = 0; s < table.num_stacks; ++s) {
      table.data[s] = grads[s].data_ptr<scalar_t>();
      fill_stack_sizes("gather_rows_backward", &table, s, grads[s].sizes(), gather_shape);
    }
    const int64_t* sel_ptr = sel.data_ptr<int64_t>();
    const int64_t* row_ptr = row.data_ptr<int64_t>();
    const scalar_t* grad_ptr = g.data_ptr<scalar_t>();
    at::parallel_for(0, g.numel(), kGrain, [&](int64_t begin, int64_t end) {
      for (int64_t e = begin; e < end; ++e) {
        gather_rows_backward_item(e, table, gather_shape, sel_ptr, row_ptr, grad_ptr);
      }
    });
  });
  return grads;
}

at::Tensor node_output_cpu(const at::Tensor& pre, const at::Tensor& code, const at::Tensor& mean,
                           const at::Tensor& invstd, const at::Tensor& gamma, const at::Tensor& beta,
                           const c10::optional<at::Tensor>& drop_mask) {
  check_node_output_args("node_output", pre, code, mean, invstd, gamma, beta, drop_mask);
  const at::Tensor p = pre.contiguous();
  const at::Tensor k = code.contiguous();
  const at::Tensor m = mean.contiguous(), v = invstd.contiguous(), g = gamma.contiguous(), b = beta.contiguous();
  const at::Tensor mask = drop_mask.has_value() ? drop_mask->contiguous() : at::Tensor();
  at::Tensor out = at::empty(p.sizes().slice(1), p.options());
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, p.scalar_type(), "bnao::node_output", [&] {
    const NodeArgs<scalar_t> args = make_node_args<scalar_t>(p, k, m, v, g, b, mask);
    scalar_t* out_ptr = out.data_ptr<scalar_t>();
    at::parallel_for(0, out.numel(), kGrain, [&](int64_t begin, int64_t end) {
      for (int64_t e = begin; e < end; ++e) node_output_item(e, args, out_ptr);
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> node_output_backward_cpu(
    const at::Tensor& grad, const at::Tensor& pre, const at::Tensor& code, const at::Tensor& mean,
    const at::Tensor& invstd, const at::Tensor& gamma, const c10::optional<at::Tensor>& drop_mask) {
  check_node_output_args("node_output_backward", pre, code, mean, invstd, gamma, c10::nullopt, drop_mask);
  TORCH_CHECK(grad.sizes() == pre.sizes().slice(1) && grad.scalar_type() == pre.scalar_type(),
              "bnao::node_output_backward: grad must be [N, C, H, W] = ", pre.sizes().slice(1), " of pre's dtype, got ",
              grad.scalar_type(), " of shape ", grad.sizes());
  const at::Tensor p = pre.contiguous(), k = code.contiguous(), g_out = grad.contiguous();
  const at::Tensor m = mean.contiguous(), v = invstd.contiguous(), g = gamma.contiguous();
  const at::Tensor mask = drop_mask.has_value() ? drop_mask->contiguous() : at::Tensor();
  at::Tensor grad_pre = at::empty_like(p);
  at::Tensor grad_mean = at::empty_like(m), grad_invstd = at::empty_like(m);
  at::Tensor grad_gamma = at::empty_like(m), grad_beta = at::empty_like(m);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, p.scalar_type(), "bnao::node_output_backward", [&] {
    using P = Compute<scalar_t>;
    using acc_t = at::acc_type<scalar_t, /*is_cuda=*/false>;
    const NodeArgs<scalar_t> args = make_node_args<scalar_t>(p, k, m, v, g, at::Tensor(), mask);
    const scalar_t* grad_ptr = g_out.data_ptr<scalar_t>();
    scalar_t* grad_pre_ptr = grad_pre.data_ptr<scalar_t>();
    at::parallel_for(0, grad_pre.numel(), kGrain, [&](int64_t begin, int64_t end) {
      for (int64_t e = begin; e < end; ++e) node_output_grad_pre_item(e, args, grad_ptr, grad_pre_ptr);
    });
    // One sequential reduction per (branch, channel): deterministic at any thread count.
    const int64_t channels = args.channels;
    at::parallel_for(0, 2 * channels, 1, [&](int64_t begin, int64_t end) {
      for (int64_t item = begin; item < end; ++item) {
        const int b = static_cast<int>(item / channels);
        const int64_t c = item % channels;
        acc_t sum_grad, sum_grad_centered;
        node_output_param_partial<scalar_t, acc_t>(b, c, 0, 1, args, grad_ptr, &sum_grad, &sum_grad_centered);
        node_output_param_finish<scalar_t, acc_t>(b, c, sum_grad, sum_grad_centered, args,
                                                  grad_mean.data_ptr<P>(), grad_invstd.data_ptr<P>(),
                                                  grad_gamma.data_ptr<P>(), grad_beta.data_ptr<P>());
      }
    });
  });
  return {grad_pre, grad_mean, grad_invstd, grad_gamma, grad_beta};
}

void update_slot_stats_cpu(const at::Tensor& running_mean, const at::Tensor& running_var, const at::Tensor& bn_rows,
                           const at::Tensor& mean, const at::Tensor& invstd, double momentum, double eps,
                           int64_t count) {
  check_update_slot_stats_args(running_mean, running_var, bn_rows, mean, invstd, count);
  const at::Tensor rows = bn_rows.contiguous();
  const int64_t* row_ptr = rows.data_ptr<int64_t>();
  std::vector<bool> seen(static_cast<size_t>(running_mean.size(0)), false);
  for (int64_t k = 0; k < rows.numel(); ++k) {
    if (row_ptr[k] < 0) continue;
    TORCH_CHECK(row_ptr[k] < running_mean.size(0), "bnao::update_slot_stats: bn_rows[", k, "] = ", row_ptr[k],
                " is outside the ", running_mean.size(0), " running-statistics rows");
    TORCH_CHECK(!seen[row_ptr[k]], "bnao::update_slot_stats: row ", row_ptr[k],
                " appears twice in bn_rows; each slot BN is updated once per call");
    seen[row_ptr[k]] = true;
  }
  // The eager path folds float32 statistics into the buffers: convert to the buffers' dtype first.
  const at::Tensor m = mean.to(running_mean.scalar_type()).contiguous();
  const at::Tensor v = invstd.to(running_mean.scalar_type()).contiguous();
  const int64_t channels = running_mean.size(1);
  AT_DISPATCH_FLOATING_TYPES(running_mean.scalar_type(), "bnao::update_slot_stats", [&] {
    const scalar_t unbias = static_cast<scalar_t>(static_cast<double>(count) / std::max<int64_t>(count - 1, 1));
    const scalar_t* mean_ptr = m.data_ptr<scalar_t>();
    const scalar_t* invstd_ptr = v.data_ptr<scalar_t>();
    scalar_t* rm = running_mean.data_ptr<scalar_t>();
    scalar_t* rv = running_var.data_ptr<scalar_t>();
    at::parallel_for(0, m.numel(), kGrain, [&](int64_t begin, int64_t end) {
      for (int64_t e = begin; e < end; ++e) {
        update_slot_stats_item(e, channels, row_ptr, mean_ptr, invstd_ptr, static_cast<scalar_t>(momentum),
                               static_cast<scalar_t>(eps), unbias, rm, rv);
      }
    });
  });
}

}  // namespace
}  // namespace cell

TORCH_LIBRARY_IMPL(bnao, CPU, m) {
  m.impl("gather_rows", &cell::gather_rows_cpu);
  m.impl("gather_rows_backward", &cell::gather_rows_backward_cpu);
  m.impl("node_output", &cell::node_output_cpu);
  m.impl("node_output_backward", &cell::node_output_backward_cpu);
  m.impl("update_slot_stats", &cell::update_slot_stats_cpu);
}

}  // namespace bnao
