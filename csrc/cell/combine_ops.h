// Host side of bnao::combine and bnao::combine_backward, shared by the CPU and
// CUDA kernels: one argument check, allocation, and the bodies of combine.h
// bound into work items and run on a backend's launcher (the backends of
// cell/node_ops_host.h: for_each, reduce_many).
#pragma once

#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <tuple>
#include <vector>

#include "cell/combine.h"

namespace bnao {
namespace cell {

// Every argument of the forward (the backward checks these and then its grad): 1 to kMaxCombineStates
// states [N, C, H, W] of one floating dtype, shape and device; weight [C, S, C] and loose [S] in
// param_dtype (float32 under bfloat16 states) on that device.
inline void check_combine_args(const char* op, at::TensorList states, const at::Tensor& weight,
                               const at::Tensor& loose) {
  TORCH_CHECK(!states.empty() && states.size() <= static_cast<size_t>(kMaxCombineStates), "bnao::", op, ": pass 1 to ",
              kMaxCombineStates, " states, got ", states.size());
  const at::Tensor& first = states[0];
  const at::ScalarType dtype = first.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kBFloat16, "bnao::", op,
              ": states must be float32, float64 or bfloat16, got ", dtype);
  TORCH_CHECK(first.dim() == 4 && first.numel() > 0, "bnao::", op, ": states must be non-empty [N, C, H, W], got ",
              first.sizes());
  for (size_t s = 0; s < states.size(); ++s) {
    TORCH_CHECK(states[s].sizes() == first.sizes() && states[s].scalar_type() == dtype &&
                    states[s].device() == first.device(),
                "bnao::", op, ": every state must match state 0 (", dtype, " ", first.sizes(), " on ", first.device(),
                "), state ", s, " is ", states[s].scalar_type(), " ", states[s].sizes(), " on ", states[s].device());
  }
  const int64_t channels = first.size(1), num_states = static_cast<int64_t>(states.size());
  const at::ScalarType params = param_dtype(dtype);
  TORCH_CHECK(weight.dim() == 3 && weight.size(0) == channels && weight.size(1) == num_states &&
                  weight.size(2) == channels && weight.scalar_type() == params && weight.device() == first.device(),
              "bnao::", op, ": weight must be ", params, " [C, S, C] = [", channels, ", ", num_states, ", ", channels,
              "] on ", first.device(), ", got ", weight.scalar_type(), " ", weight.sizes(), " on ", weight.device());
  TORCH_CHECK(loose.dim() == 1 && loose.size(0) == num_states && loose.scalar_type() == params &&
                  loose.device() == first.device(),
              "bnao::", op, ": loose must be ", params, " [S] = [", num_states,
              "] (1 for a loose end, 0 otherwise) on ", first.device(), ", got ", loose.scalar_type(), " ",
              loose.sizes(), " on ", loose.device());
}

// Kernel arguments over contiguous copies (kept alive by `contiguous`).
template <typename T>
CombineArgs<T> make_combine_args(const std::vector<at::Tensor>& contiguous, const at::Tensor& weight,
                                 const at::Tensor& loose, const at::Tensor& grad) {
  using P = Compute<T>;
  CombineArgs<T> a{};
  a.num_states = static_cast<int>(contiguous.size());
  for (int s = 0; s < a.num_states; ++s) a.states[s] = contiguous[s].data_ptr<T>();
  a.weight = weight.data_ptr<P>();
  a.loose = loose.data_ptr<P>();
  a.grad = grad.defined() ? grad.data_ptr<T>() : nullptr;
  a.batch = contiguous[0].size(0);
  a.channels = contiguous[0].size(1);
  a.plane = contiguous[0].size(2) * contiguous[0].size(3);
  return a;
}

inline std::vector<at::Tensor> contiguous_states(at::TensorList states) {
  std::vector<at::Tensor> out;
  for (const at::Tensor& s : states) out.push_back(s.contiguous());
  return out;
}

template <typename T, typename Acc>
struct CombineItem {
  CombineArgs<T> args;
  T* out;
  BNAO_CELL_HD void operator()(int64_t e) const { combine_item<T, Acc>(e, args, out); }
};

template <typename T, typename Acc>
struct CombineGradStateItem {
  CombineArgs<T> args;
  T* grad_states[kMaxCombineStates];
  BNAO_CELL_HD void operator()(int64_t e) const { combine_grad_state_item<T, Acc>(e, args, grad_states); }
};

template <typename Backend>
at::Tensor combine_kernel(at::TensorList states, const at::Tensor& weight, const at::Tensor& loose) {
  check_combine_args("combine", states, weight, loose);
  [[maybe_unused]] const auto guard = Backend::guard(states[0]);
  const std::vector<at::Tensor> contiguous = contiguous_states(states);
  const at::Tensor w = weight.contiguous(), l = loose.contiguous();
  at::Tensor out = at::empty(contiguous[0].sizes(), contiguous[0].options());
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, out.scalar_type(), "bnao::combine", [&] {
    using Acc = at::acc_type<scalar_t, Backend::is_cuda>;
    const CombineItem<scalar_t, Acc> item{make_combine_args<scalar_t>(contiguous, w, l, at::Tensor()),
                                          out.data_ptr<scalar_t>()};
    Backend::launcher(out).for_each(combine_items(item.args), item);
  });
  return out;
}

template <typename Backend>
std::tuple<std::vector<at::Tensor>, at::Tensor> combine_backward_kernel(const at::Tensor& grad, at::TensorList states,
                                                                        const at::Tensor& weight,
                                                                        const at::Tensor& loose) {
  check_combine_args("combine_backward", states, weight, loose);
  TORCH_CHECK(grad.sizes() == states[0].sizes() && grad.scalar_type() == states[0].scalar_type() &&
                  grad.device() == states[0].device(),
              "bnao::combine_backward: grad must be the states' [N, C, H, W] = ", states[0].sizes(), " of their dtype ",
              "and device, got ", grad.scalar_type(), " ", grad.sizes(), " on ", grad.device());
  [[maybe_unused]] const auto guard = Backend::guard(states[0]);
  const std::vector<at::Tensor> contiguous = contiguous_states(states);
  const at::Tensor w = weight.contiguous(), l = loose.contiguous(), g = grad.contiguous();
  std::vector<at::Tensor> grad_states;
  for (const at::Tensor& s : contiguous) grad_states.push_back(at::empty_like(s));
  at::Tensor grad_weight = at::empty_like(w);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, g.scalar_type(), "bnao::combine_backward", [&] {
    using Acc = at::acc_type<scalar_t, Backend::is_cuda>;
    const CombineArgs<scalar_t> args = make_combine_args<scalar_t>(contiguous, w, l, g);
    CombineGradStateItem<scalar_t, Acc> item{args, {}};
    for (int s = 0; s < args.num_states; ++s) item.grad_states[s] = grad_states[s].data_ptr<scalar_t>();
    const auto launcher = Backend::launcher(g);
    launcher.for_each(combine_grad_state_items(args), item);
    // Two passes (combine.h): tiles summed per chunk of pixels, then the chunks in a fixed order: deterministic
    // on every device, and no host synchronisation (the loose mask stays on the device).
    const int64_t chunks = weight_grad_chunks(args.batch * args.plane);
    const at::Tensor partial = at::empty({chunks, w.size(0), w.size(1), w.size(2)},
                                         w.options().dtype(c10::CppTypeToScalarType<Acc>::value));
    const CombineWeightGradTiles<scalar_t, Acc> tiles{args, partial.data_ptr<Acc>(), chunks};
    launcher.template reduce_many<Acc>(tiles.outputs(), tiles);
    const CombineWeightGradFinish<scalar_t, Acc> finish_pass{args, partial.data_ptr<Acc>(), chunks,
                                                             grad_weight.data_ptr<Compute<scalar_t>>()};
    launcher.for_each(grad_weight.numel(), finish_pass);
  });
  return {grad_states, grad_weight};
}

// Registers a backend's kernels (inside TORCH_LIBRARY_IMPL(bnao, <key>, m)).
#define BNAO_REGISTER_COMBINE(m, Backend)                                                \
  do {                                                                                  \
    (m).impl("combine", &::bnao::cell::combine_kernel<Backend>);                        \
    (m).impl("combine_backward", &::bnao::cell::combine_backward_kernel<Backend>);      \
  } while (0)

}  // namespace cell
}  // namespace bnao
