// Argument checks and kernel-argument packing of bnao::gather_rows,
// bnao::node_output and bnao::update_slot_stats, shared by the CPU and CUDA
// kernels so both refuse the same inputs with the same messages. Checks that
// read index values (and so would need a device-to-host copy) live in the CPU
// kernels only; the CUDA kernels assert bounds on the device instead.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <vector>

#include "cell/node_ops.h"

namespace bnao {
namespace cell {

inline void check_index_pair(const char* op, const at::Tensor& select, const at::Tensor& rows,
                             const at::Device& device) {
  TORCH_CHECK(select.dim() == 1 && select.scalar_type() == at::kLong, "bnao::", op,
              ": select must be a 1-D int64 tensor (stack index per gathered row, -1 for none), got ",
              select.scalar_type(), " of shape ", select.sizes());
  TORCH_CHECK(rows.dim() == 1 && rows.scalar_type() == at::kLong, "bnao::", op,
              ": rows must be a 1-D int64 tensor (row in the selected stack), got ", rows.scalar_type(),
              " of shape ", rows.sizes());
  TORCH_CHECK(select.numel() == rows.numel(), "bnao::", op, ": select and rows must have one entry per gathered row, got ",
              select.numel(), " and ", rows.numel());
  TORCH_CHECK(select.device() == device && rows.device() == device, "bnao::", op,
              ": select and rows must be on the stacks' device ", device, ", got ", select.device(), " and ",
              rows.device());
}

inline GatherShape make_gather_shape(const char* op, at::IntArrayRef shape) {
  TORCH_CHECK(!shape.empty() && shape.size() <= static_cast<size_t>(kMaxGatherDims), "bnao::", op,
              ": shape (one gathered row) must have 1 to ", kMaxGatherDims, " dims, got ", shape);
  GatherShape result{};
  result.dims = static_cast<int>(shape.size());
  result.inner = 1;
  // Bounded so that the element count and every index stay far inside int64.
  constexpr int64_t kMaxRowNumel = int64_t{1} << 40;
  for (int d = 0; d < result.dims; ++d) {
    TORCH_CHECK(shape[d] > 0 && shape[d] <= kMaxRowNumel / result.inner, "bnao::", op,
                ": shape must be positive with at most 2^40 elements, got ", shape);
    result.sizes[d] = shape[d];
    result.inner *= shape[d];
  }
  return result;
}

// Fills the size fields of a StackTable from per-stack [rows, trailing...] sizes.
template <typename Ptr>
void fill_stack_sizes(const char* op, StackTable<Ptr>* table, int stack, at::IntArrayRef sizes,
                      const GatherShape& shape) {
  TORCH_CHECK(static_cast<int>(sizes.size()) == shape.dims + 1, "bnao::", op, ": stack ", stack,
              " must have one row dim plus the ", shape.dims, " dims of shape, got sizes ", sizes);
  table->rows[stack] = sizes[0];
  table->row_numel[stack] = 1;
  for (int d = 0; d < shape.dims; ++d) {
    TORCH_CHECK(sizes[d + 1] <= shape.sizes[d], "bnao::", op, ": stack ", stack, " of sizes ", sizes,
                " does not fit in shape (dim ", d, " is ", sizes[d + 1], " > ", shape.sizes[d],
                "); the gathered rows are zero-padded, never cropped");
    table->sizes[stack][d] = sizes[d + 1];
    table->row_numel[stack] *= sizes[d + 1];
  }
}

// Checks of gather_rows; returns the gathered row shape.
inline GatherShape check_gather_rows_args(at::TensorList stacks, const at::Tensor& select, const at::Tensor& rows,
                                          at::IntArrayRef shape) {
  TORCH_CHECK(!stacks.empty() && stacks.size() <= static_cast<size_t>(kMaxGatherStacks),
              "bnao::gather_rows: pass 1 to ", kMaxGatherStacks, " stacks, got ", stacks.size());
  const GatherShape gather_shape = make_gather_shape("gather_rows", shape);
  const at::Tensor& first = stacks[0];
  TORCH_CHECK(at::isFloatingType(first.scalar_type()), "bnao::gather_rows: stacks must be floating point, got ",
              first.scalar_type());
  for (size_t s = 0; s < stacks.size(); ++s) {
    TORCH_CHECK(stacks[s].scalar_type() == first.scalar_type() && stacks[s].device() == first.device(),
                "bnao::gather_rows: every stack must have stack 0's dtype and device (", first.scalar_type(), ", ",
                first.device(), "), stack ", s, " is ", stacks[s].scalar_type(), " on ", stacks[s].device());
    StackTable<const void*> probe{};  // only to run the size checks of fill_stack_sizes up front
    fill_stack_sizes("gather_rows", &probe, static_cast<int>(s), stacks[s].sizes(), gather_shape);
  }
  check_index_pair("gather_rows", select, rows, first.device());
  return gather_shape;
}

// Per-stack sizes [rows, trailing...] from the flat stack_sizes of gather_rows_backward.
inline std::vector<std::vector<int64_t>> split_stack_sizes(at::IntArrayRef stack_sizes, const GatherShape& shape) {
  const int64_t per_stack = shape.dims + 1;
  TORCH_CHECK(!stack_sizes.empty() && static_cast<int64_t>(stack_sizes.size()) % per_stack == 0,
              "bnao::gather_rows_backward: stack_sizes must hold ", per_stack,
              " ints per stack (rows, then the trailing sizes), got ", stack_sizes.size());
  const int64_t num_stacks = static_cast<int64_t>(stack_sizes.size()) / per_stack;
  TORCH_CHECK(num_stacks <= kMaxGatherStacks, "bnao::gather_rows_backward: at most ", kMaxGatherStacks,
              " stacks, got ", num_stacks);
  std::vector<std::vector<int64_t>> result;
  for (int64_t s = 0; s < num_stacks; ++s) {
    result.emplace_back(stack_sizes.begin() + s * per_stack, stack_sizes.begin() + (s + 1) * per_stack);
  }
  return result;
}

inline GatherShape check_gather_rows_backward_args(const at::Tensor& grad, const at::Tensor& select,
                                                   const at::Tensor& rows) {
  TORCH_CHECK(grad.dim() >= 2 && at::isFloatingType(grad.scalar_type()),
              "bnao::gather_rows_backward: grad must be the floating [R, *shape] gradient of gather_rows, got ",
              grad.scalar_type(), " of shape ", grad.sizes());
  check_index_pair("gather_rows_backward", select, rows, grad.device());
  TORCH_CHECK(grad.size(0) == select.numel(), "bnao::gather_rows_backward: grad has ", grad.size(0),
              " rows but select has ", select.numel());
  return make_gather_shape("gather_rows_backward", grad.sizes().slice(1));
}

// Checks of node_output / node_output_backward; `grad` is undefined for the forward.
inline void check_node_output_args(const char* op, const at::Tensor& pre, const at::Tensor& code,
                                   const at::Tensor& mean, const at::Tensor& invstd, const at::Tensor& gamma,
                                   const c10::optional<at::Tensor>& beta, const c10::optional<at::Tensor>& drop_mask) {
  TORCH_CHECK(pre.dim() == 5 && pre.size(0) == 2 && at::isFloatingType(pre.scalar_type()), "bnao::", op,
              ": pre must be the floating [2, N, C, H, W] round-2 result of a node's two branches, got ",
              pre.scalar_type(), " of shape ", pre.sizes());
  TORCH_CHECK(code.dim() == 2 && code.size(0) == 2 && code.size(1) == kNumFields && code.scalar_type() == at::kInt,
              "bnao::", op, ": code must be the int32 [2, ", kNumFields, "] branch code of the node, got ",
              code.scalar_type(), " of shape ", code.sizes());
  TORCH_CHECK(code.device() == pre.device(), "bnao::", op, ": code must be on pre's device ", pre.device(),
              " (the kernels read it there), got ", code.device());
  const int64_t channels = pre.size(2);
  std::vector<std::pair<const char*, const at::Tensor*>> stats = {{"mean", &mean}, {"invstd", &invstd},
                                                                   {"gamma", &gamma}};
  if (beta.has_value()) stats.emplace_back("beta", &beta.value());
  // Statistics, BN2 parameters and drop-path multipliers: float32 under bfloat16 activations.
  const at::ScalarType params = param_dtype(pre.scalar_type());
  for (const auto& [name, t] : stats) {
    TORCH_CHECK(t->dim() == 2 && t->size(0) == 2 && t->size(1) == channels, "bnao::", op, ": ", name,
                " must be [2, C] = [2, ", channels, "], got ", t->sizes());
    TORCH_CHECK(t->scalar_type() == params && t->device() == pre.device(), "bnao::", op, ": ", name, " must be ",
                params, " on pre's device ", pre.device(), " (for ", pre.scalar_type(), " pre), got ",
                t->scalar_type(), " on ", t->device());
  }
  if (drop_mask.has_value()) {
    const at::Tensor& m = drop_mask.value();
    TORCH_CHECK(m.dim() == 2 && m.size(0) == pre.size(1) && m.size(1) == 2, "bnao::", op,
                ": drop_mask must be [N, 2] = [", pre.size(1), ", 2] (one multiplier per sample and branch), got ",
                m.sizes());
    TORCH_CHECK(m.scalar_type() == params && m.device() == pre.device(), "bnao::", op, ": drop_mask must be ",
                params, " on pre's device ", pre.device(), " (for ", pre.scalar_type(), " pre), got ",
                m.scalar_type(), " on ", m.device());
  }
}

template <typename scalar_t>
NodeArgs<scalar_t> make_node_args(const at::Tensor& pre, const at::Tensor& code, const at::Tensor& mean,
                                  const at::Tensor& invstd, const at::Tensor& gamma, const at::Tensor& beta,
                                  const at::Tensor& drop_mask) {
  using P = Compute<scalar_t>;
  NodeArgs<scalar_t> a{};
  a.pre = pre.data_ptr<scalar_t>();
  a.code = code.data_ptr<int32_t>();
  a.mean = mean.data_ptr<P>();
  a.invstd = invstd.data_ptr<P>();
  a.gamma = gamma.data_ptr<P>();
  a.beta = beta.defined() ? beta.data_ptr<P>() : nullptr;
  a.drop_mask = drop_mask.defined() ? drop_mask.data_ptr<P>() : nullptr;
  a.batch = pre.size(1);
  a.channels = pre.size(2);
  a.plane = pre.size(3) * pre.size(4);
  return a;
}

inline void check_update_slot_stats_args(const at::Tensor& running_mean, const at::Tensor& running_var,
                                         const at::Tensor& bn_rows, const at::Tensor& mean, const at::Tensor& invstd,
                                         int64_t count) {
  TORCH_CHECK(running_mean.dim() == 2 && at::isFloatingType(running_mean.scalar_type()),
              "bnao::update_slot_stats: running_mean must be the floating [rows, C] running means of a stage, got ",
              running_mean.scalar_type(), " of shape ", running_mean.sizes());
  TORCH_CHECK(running_var.sizes() == running_mean.sizes() && running_var.scalar_type() == running_mean.scalar_type() &&
                  running_var.device() == running_mean.device(),
              "bnao::update_slot_stats: running_var must match running_mean (", running_mean.scalar_type(), " ",
              running_mean.sizes(), "), got ", running_var.scalar_type(), " ", running_var.sizes());
  // Updated in place through raw pointers: a strided view would need a copy back.
  TORCH_CHECK(running_mean.is_contiguous() && running_var.is_contiguous(),
              "bnao::update_slot_stats: running_mean and running_var must be contiguous (they are updated in place)");
  TORCH_CHECK(bn_rows.dim() == 1 && bn_rows.scalar_type() == at::kLong && bn_rows.device() == running_mean.device(),
              "bnao::update_slot_stats: bn_rows must be a 1-D int64 tensor on ", running_mean.device(),
              " (row per statistics row, -1 to skip), got ", bn_rows.scalar_type(), " of shape ", bn_rows.sizes(),
              " on ", bn_rows.device());
  const int64_t channels = running_mean.size(1);
  for (const auto& [name, t] : {std::make_pair("mean", &mean), std::make_pair("invstd", &invstd)}) {
    TORCH_CHECK(t->dim() == 2 && t->size(0) == bn_rows.numel() && t->size(1) == channels,
                "bnao::update_slot_stats: ", name, " must be [K, C] = [", bn_rows.numel(), ", ", channels,
                "] (one row per bn_rows entry), got ", t->sizes());
    TORCH_CHECK(at::isFloatingType(t->scalar_type()) && t->device() == running_mean.device(),
                "bnao::update_slot_stats: ", name, " must be floating on ", running_mean.device(), ", got ",
                t->scalar_type(), " on ", t->device());
  }
  TORCH_CHECK(count >= 1, "bnao::update_slot_stats: count (values per channel behind each statistic, N * H * W) "
              "must be >= 1, got ", count);
}

}  // namespace cell
}  // namespace bnao
