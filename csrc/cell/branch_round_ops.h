// Host side of bnao::branch_round and bnao::branch_round_backward, shared by
// the CPU and CUDA kernels: one argument check (same inputs refused with the
// same messages on every device), allocation, and the phase sequences of
// cell/branch_round.h run on a backend's launcher.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <optional>
#include <tuple>
#include <vector>

#include "cell/branch_round.h"

namespace bnao {
namespace cell {

using OptionalTensor = std::optional<at::Tensor>;

// N, C, Ho, Wo of the round's result.
struct RoundShape {
  int64_t batch, channels, height, width;
};

// Where an argument of the ops must be: on the sources' device (`like` is sources[0]), of `shape`,
// contiguous (its dtype is checked by the callers below, each with its own rule).
inline void check_placement(const char* op, const char* name, const at::Tensor& t, const at::Tensor& like,
                            at::IntArrayRef shape) {
  TORCH_CHECK(t.device() == like.device(), op, ": ", name, " is on ", t.device(), " but the sources are on ",
              like.device(), "; move every argument to one device");
  TORCH_CHECK(t.sizes() == shape, op, ": ", name, " must have shape ", shape, ", got ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous; call .contiguous() first");
}

// An activation-shaped argument: the sources' dtype.
inline void check_float_tensor(const char* op, const char* name, const at::Tensor& t, const at::Tensor& like,
                               at::IntArrayRef shape) {
  TORCH_CHECK(t.defined(), op, ": ", name, " is undefined");
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), op, ": ", name, " must have the dtype of the sources (",
              like.scalar_type(), "), got ", t.scalar_type());
  check_placement(op, name, t, like, shape);
}

// A weight, statistic or affine parameter: param_dtype of the sources (float32 with bfloat16 sources).
inline void check_param_tensor(const char* op, const char* name, const at::Tensor& t, const at::Tensor& like,
                               at::IntArrayRef shape) {
  TORCH_CHECK(t.defined(), op, ": ", name, " is undefined");
  const at::ScalarType expected = param_dtype(like.scalar_type());
  TORCH_CHECK(t.scalar_type() == expected, op, ": ", name, " must be ", expected, " for ", like.scalar_type(),
              " sources (weights and BN statistics stay in float32 under bfloat16 activations), got ",
              t.scalar_type());
  check_placement(op, name, t, like, shape);
}

inline void check_code_values(const char* op, const at::Tensor& code, int64_t round, int64_t num_sources,
                              bool reduction) {
  const int32_t* rows = code.data_ptr<int32_t>();
  for (int b = 0; b < kNumBranches; ++b) {
    const int32_t* row = rows + b * kNumFields;
    const int kind = row[kKind];
    TORCH_CHECK(kind >= kKindZero && kind <= kKindMaxPool, op, ": code[", b, "] has unknown op kind ", kind);
    if (kind == kKindSepConv || kind == kKindDilSepConv) {
      TORCH_CHECK(row[kKernel] >= 1 && row[kKernel] <= kMaxKernel && row[kKernel] % 2 == 1, op, ": code[", b,
                  "] has kernel ", row[kKernel], "; sep convs need an odd kernel <= ", kMaxKernel);
    }
    if (round == 2) continue;  // round 2 reads pre1[b] at stride 1 whatever the code says
    const int input = row[kInput];
    TORCH_CHECK(input >= 0 && input < num_sources, op, ": code[", b, "] reads state ", input, " but only ",
                num_sources, " sources were given");
    const int expected_stride = reduction && input < 2 ? 2 : 1;
    TORCH_CHECK(row[kStride] == expected_stride, op, ": code[", b, "] has stride ", row[kStride], " but reading state ",
                input, (reduction ? " of a reduction cell" : " of a normal cell"), " needs ", expected_stride);
    TORCH_CHECK(row[kDilation] == 1 || row[kDilation] == 2, op, ": code[", b, "] has dilation ", row[kDilation],
                "; 1 or 2 expected");
  }
}

// sources[0], after checking that there are 1 to kMaxSources sources.
inline const at::Tensor& first_source(const char* op, at::TensorList sources) {
  TORCH_CHECK(!sources.empty() && sources.size() <= static_cast<size_t>(kMaxSources), op, ": between 1 and ",
              kMaxSources, " sources expected, got ", sources.size());
  return sources[0];
}

// Round 1: every source [N, C, *, *], the cell inputs (0, 1) H x W and the nodes (2..) the round's
// resolution (ceil(H/2) in a reduction cell). Round 2: one source, pre1 [2, N, C, Ho, Wo].
inline RoundShape check_sources(const char* op, at::TensorList sources, int64_t round, bool reduction) {
  TORCH_CHECK(round == 1 || round == 2, op, ": round must be 1 or 2, got ", round);
  const at::Tensor& first = first_source(op, sources);
  TORCH_CHECK(first.scalar_type() == at::kFloat || first.scalar_type() == at::kDouble ||
                  first.scalar_type() == at::kBFloat16,
              op, ": sources must be float32, float64 or bfloat16, got ", first.scalar_type());
  RoundShape shape{};
  if (round == 2) {
    TORCH_CHECK(sources.size() == 1, op, ": round 2 takes one source (pre1), got ", sources.size());
    TORCH_CHECK(first.dim() == 5 && first.size(0) == kNumBranches, op,
                ": round 2's source must be pre1 [2, N, C, Ho, Wo], got shape ", first.sizes());
    shape = {first.size(1), first.size(2), first.size(3), first.size(4)};
  } else {
    TORCH_CHECK(first.dim() == 4, op, ": round-1 sources must be [N, C, H, W], got shape ", first.sizes());
    const int64_t height = first.size(2), width = first.size(3);
    shape = {first.size(0), first.size(1), reduction ? (height + 1) / 2 : height, reduction ? (width + 1) / 2 : width};
    for (size_t s = 0; s < sources.size(); ++s) {
      const bool cell_input = s < 2;
      const std::vector<int64_t> expected = {shape.batch, shape.channels, cell_input ? height : shape.height,
                                             cell_input ? width : shape.width};
      const std::string name = "sources[" + std::to_string(s) + "]" + (cell_input ? " (a cell input)" : " (a node)");
      check_float_tensor(op, name.c_str(), sources[s], first, expected);
    }
  }
  TORCH_CHECK(shape.batch > 0 && shape.channels > 0 && shape.height > 0 && shape.width > 0, op,
              ": sources must not be empty, got shape ", first.sizes());
  TORCH_CHECK(first.is_contiguous(), op, ": sources[0] must be contiguous; call .contiguous() first");
  return shape;
}

// Every argument of the forward (the backward checks these and then its own).
inline RoundShape check_branch_round_args(const char* op, at::TensorList sources, const at::Tensor& code,
                                          int64_t round, const at::Tensor& dw, const at::Tensor& pw,
                                          const OptionalTensor& in_mean, const OptionalTensor& in_invstd,
                                          const OptionalTensor& in_gamma, const OptionalTensor& in_beta,
                                          bool reduction) {
  const RoundShape shape = check_sources(op, sources, round, reduction);
  const at::Tensor& first = sources[0];
  TORCH_CHECK(code.scalar_type() == at::kInt && code.dim() == 2 && code.size(0) == kNumBranches &&
                  code.size(1) == kNumFields,
              op, ": code must be the node's int32 [2, ", static_cast<int>(kNumFields), "] branch code, got ",
              code.scalar_type(), " of shape ", code.sizes());
  TORCH_CHECK(code.device() == first.device(), op, ": code is on ", code.device(), " but the sources are on ",
              first.device(), "; keep the code on the activations' device");
  TORCH_CHECK(code.is_contiguous(), op, ": code must be contiguous");
  const int64_t channels = shape.channels;
  check_param_tensor(op, "dw", dw, first, {kNumBranches, channels, kMaxKernel, kMaxKernel});
  check_param_tensor(op, "pw", pw, first, {kNumBranches, channels, channels});
  const OptionalTensor* norm[] = {&in_mean, &in_invstd, &in_gamma, &in_beta};
  const char* names[] = {"in_mean", "in_invstd", "in_gamma", "in_beta"};
  for (int t = 0; t < 4; ++t) {
    const bool given = norm[t]->has_value() && (*norm[t])->defined();
    if (round == 1) {
      TORCH_CHECK(!given, op, ": ", names[t], " is for round 2 (BN1's normalisation); pass None in round 1");
    } else {
      TORCH_CHECK(given, op, ": round 2 needs ", names[t], " (round 1's BN statistics and affine parameters)");
      check_param_tensor(op, names[t], **norm[t], first, {kNumBranches, channels});
    }
  }
  // The code is device data; it can be validated only where reading it costs no device sync.
  if (code.device().is_cpu()) check_code_values(op, code, round, static_cast<int64_t>(sources.size()), reduction);
  return shape;
}

template <typename T>
RoundArgs<T> make_round_args(at::TensorList sources, const at::Tensor& code, int64_t round, const at::Tensor& dw,
                             const at::Tensor& pw, const OptionalTensor& in_mean, const OptionalTensor& in_invstd,
                             const OptionalTensor& in_gamma, const OptionalTensor& in_beta, double eps,
                             const RoundShape& shape) {
  using P = Compute<T>;
  RoundArgs<T> a{};
  a.num_sources = static_cast<int>(sources.size());
  for (int s = 0; s < a.num_sources; ++s) {
    a.sources[s] = sources[s].data_ptr<T>();
    a.source_height[s] = round == 1 ? sources[s].size(2) : shape.height;
    a.source_width[s] = round == 1 ? sources[s].size(3) : shape.width;
  }
  a.code = code.data_ptr<int32_t>();
  a.round = static_cast<int>(round);
  a.batch = shape.batch;
  a.channels = shape.channels;
  a.height = shape.height;
  a.width = shape.width;
  a.dw = dw.data_ptr<P>();
  a.pw = pw.data_ptr<P>();
  if (round == 2) {
    a.in_mean = in_mean->data_ptr<P>();
    a.in_invstd = in_invstd->data_ptr<P>();
    a.in_gamma = in_gamma->data_ptr<P>();
    a.in_beta = in_beta->data_ptr<P>();
  }
  a.eps = eps;
  return a;
}

template <typename Launcher>
std::tuple<at::Tensor, at::Tensor, at::Tensor> branch_round_forward(
    const Launcher& launcher, at::TensorList sources, const at::Tensor& code, int64_t round, const at::Tensor& dw,
    const at::Tensor& pw, const OptionalTensor& in_mean, const OptionalTensor& in_invstd,
    const OptionalTensor& in_gamma, const OptionalTensor& in_beta, double eps, bool reduction) {
  const char* op = "bnao::branch_round";
  const RoundShape shape =
      check_branch_round_args(op, sources, code, round, dw, pw, in_mean, in_invstd, in_gamma, in_beta, reduction);
  TORCH_CHECK(eps > 0.0, op, ": eps must be > 0, got ", eps);
  const auto options = sources[0].options();
  const auto param_options = options.dtype(param_dtype(sources[0].scalar_type()));
  const std::vector<int64_t> pre_shape = {kNumBranches, shape.batch, shape.channels, shape.height, shape.width};
  at::Tensor pre = at::empty(pre_shape, options);
  at::Tensor mid = at::empty(pre_shape, options);
  at::Tensor mean = at::empty({kNumBranches, shape.channels}, param_options);
  at::Tensor invstd = at::empty({kNumBranches, shape.channels}, param_options);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, pre.scalar_type(), "bnao::branch_round", [&] {
    using P = Compute<scalar_t>;
    RoundArgs<scalar_t> a =
        make_round_args<scalar_t>(sources, code, round, dw, pw, in_mean, in_invstd, in_gamma, in_beta, eps, shape);
    a.pre = pre.data_ptr<scalar_t>();
    a.mid = mid.data_ptr<scalar_t>();
    a.mean = mean.data_ptr<P>();
    a.invstd = invstd.data_ptr<P>();
    run_forward(launcher, a);
  });
  return {pre, mean, invstd};
}

using BackwardResult =
    std::tuple<std::vector<at::Tensor>, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

template <typename Launcher>
BackwardResult branch_round_backward_impl(const Launcher& launcher, const at::Tensor& grad_pre_in,
                                          const at::Tensor& grad_mean_in, const at::Tensor& grad_invstd_in,
                                          at::TensorList sources, const at::Tensor& code, int64_t round,
                                          const at::Tensor& dw, const at::Tensor& pw, const OptionalTensor& in_mean,
                                          const OptionalTensor& in_invstd, const OptionalTensor& in_gamma,
                                          const OptionalTensor& in_beta, const at::Tensor& pre,
                                          const at::Tensor& mean, const at::Tensor& invstd, bool reduction,
                                          at::TensorList accumulate_into = {}, int64_t overwrite_below = 0) {
  // accumulate_into (round 1 only): the sources' gradients are added to these tensors in place (those of
  // sources below overwrite_below are written instead), and the returned list is empty (the fused cell's
  // backward sums every reader of a state into one buffer).
  const bool accumulate = !accumulate_into.empty();
  const char* op = accumulate ? "bnao::branch_round_backward_accumulate" : "bnao::branch_round_backward";
  const RoundShape shape =
      check_branch_round_args(op, sources, code, round, dw, pw, in_mean, in_invstd, in_gamma, in_beta, reduction);
  const at::Tensor& first = sources[0];
  const std::vector<int64_t> pre_shape = {kNumBranches, shape.batch, shape.channels, shape.height, shape.width};
  check_float_tensor(op, "pre", pre, first, pre_shape);
  check_param_tensor(op, "mean", mean, first, {kNumBranches, shape.channels});
  check_param_tensor(op, "invstd", invstd, first, {kNumBranches, shape.channels});
  // Incoming gradients come from autograd (possibly expanded zeros): made contiguous here.
  const at::Tensor grad_pre = grad_pre_in.contiguous(), grad_mean = grad_mean_in.contiguous(),
                   grad_invstd = grad_invstd_in.contiguous();
  check_float_tensor(op, "grad_pre", grad_pre, first, pre_shape);
  check_param_tensor(op, "grad_mean", grad_mean, first, {kNumBranches, shape.channels});
  check_param_tensor(op, "grad_invstd", grad_invstd, first, {kNumBranches, shape.channels});

  const auto options = first.options();
  const auto param_options = options.dtype(param_dtype(first.scalar_type()));
  std::vector<at::Tensor> grad_sources;
  if (accumulate) {
    TORCH_CHECK(round == 1, op, ": accumulates source gradients of round 1 only, got round ", round);
    TORCH_CHECK(overwrite_below >= 0 && overwrite_below <= static_cast<int64_t>(sources.size()), op,
                ": overwrite_below must be in [0, ", sources.size(), "], got ", overwrite_below);
    TORCH_CHECK(accumulate_into.size() == sources.size(), op, ": grad_sources must have one tensor per source (",
                sources.size(), "), got ", accumulate_into.size());
    for (size_t s = 0; s < sources.size(); ++s) {
      check_float_tensor(op, "grad_sources[i]", accumulate_into[s], first, sources[s].sizes().vec());
      for (const at::Tensor& source : sources) {
        TORCH_CHECK(accumulate_into[s].data_ptr() != source.data_ptr(), op, ": grad_sources[", s,
                    "] shares memory with a source; pass separate gradient buffers");
      }
      // One launch writes several sources' gradients at once (run_backward): they must not overlap.
      for (size_t t = 0; t < s; ++t) {
        TORCH_CHECK(at::get_overlap_status(accumulate_into[s], accumulate_into[t]) == at::MemOverlapStatus::No, op,
                    ": grad_sources[", t, "] and grad_sources[", s,
                    "] share memory; pass one separate gradient buffer per source");
      }
    }
  } else {
    for (const at::Tensor& source : sources) grad_sources.push_back(at::empty(source.sizes(), options));
  }
  at::Tensor grad_dw = at::empty(dw.sizes(), param_options), grad_pw = at::empty(pw.sizes(), param_options);
  const std::vector<int64_t> norm_shape =
      round == 2 ? std::vector<int64_t>{kNumBranches, shape.channels} : std::vector<int64_t>{0};
  // Every element is written by NormShiftTerm / NormScaleTerm's finish (zero for branches without BN1), so
  // no fill kernels: four launches fewer per round-2 backward.
  at::Tensor grad_in_mean = at::empty(norm_shape, param_options),
             grad_in_invstd = at::empty(norm_shape, param_options),
             grad_in_gamma = at::empty(norm_shape, param_options), grad_in_beta = at::empty(norm_shape, param_options);
  at::Tensor grad_total = at::empty(pre_shape, options), mid = at::empty(pre_shape, options),
             grad_mid = at::empty(pre_shape, options);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, first.scalar_type(), "bnao::branch_round_backward", [&] {
    using P = Compute<scalar_t>;
    RoundArgs<scalar_t> a =
        make_round_args<scalar_t>(sources, code, round, dw, pw, in_mean, in_invstd, in_gamma, in_beta, 0.0, shape);
    a.pre = pre.data_ptr<scalar_t>();
    a.mean = mean.data_ptr<P>();
    a.invstd = invstd.data_ptr<P>();
    a.mid = mid.data_ptr<scalar_t>();
    a.grad_pre = grad_pre.data_ptr<scalar_t>();
    a.grad_mean = grad_mean.data_ptr<P>();
    a.grad_invstd = grad_invstd.data_ptr<P>();
    a.grad_total = grad_total.data_ptr<scalar_t>();
    a.grad_mid = grad_mid.data_ptr<scalar_t>();
    a.grad_dw = grad_dw.data_ptr<P>();
    a.grad_pw = grad_pw.data_ptr<P>();
    if (round == 2) {
      a.grad_in_mean = grad_in_mean.data_ptr<P>();
      a.grad_in_invstd = grad_in_invstd.data_ptr<P>();
      a.grad_in_gamma = grad_in_gamma.data_ptr<P>();
      a.grad_in_beta = grad_in_beta.data_ptr<P>();
    }
    a.accumulate = accumulate;
    a.overwrite_below = static_cast<int>(overwrite_below);
    scalar_t* targets[kMaxSources] = {};
    for (size_t s = 0; s < sources.size(); ++s) {
      targets[s] = (accumulate ? accumulate_into[s] : grad_sources[s]).data_ptr<scalar_t>();
    }
    run_backward(launcher, a, targets);
  });
  return {grad_sources, grad_dw, grad_pw, grad_in_mean, grad_in_invstd, grad_in_gamma, grad_in_beta};
}

// ------------------------------------------------------------------ the registered kernels
// Written once for every backend. `Backend` provides `guard(like)` (a device guard for like's device, or an
// empty object on the CPU) and `launcher(like)` (the launcher the phase sequences run on); the .cpp/.cu
// files only define it and register these.
template <typename Backend>
std::tuple<at::Tensor, at::Tensor, at::Tensor> branch_round_kernel(
    at::TensorList sources, const at::Tensor& code, int64_t round, const at::Tensor& dw, const at::Tensor& pw,
    const OptionalTensor& in_mean, const OptionalTensor& in_invstd, const OptionalTensor& in_gamma,
    const OptionalTensor& in_beta, double eps, bool reduction) {
  const at::Tensor& like = first_source("bnao::branch_round", sources);
  [[maybe_unused]] const auto guard = Backend::guard(like);
  return branch_round_forward(Backend::launcher(like), sources, code, round, dw, pw, in_mean, in_invstd, in_gamma,
                              in_beta, eps, reduction);
}

template <typename Backend>
BackwardResult branch_round_backward_kernel(const at::Tensor& grad_pre, const at::Tensor& grad_mean,
                                            const at::Tensor& grad_invstd, at::TensorList sources,
                                            const at::Tensor& code, int64_t round, const at::Tensor& dw,
                                            const at::Tensor& pw, const OptionalTensor& in_mean,
                                            const OptionalTensor& in_invstd, const OptionalTensor& in_gamma,
                                            const OptionalTensor& in_beta, const at::Tensor& pre,
                                            const at::Tensor& mean, const at::Tensor& invstd, bool reduction) {
  const at::Tensor& like = first_source("bnao::branch_round_backward", sources);
  [[maybe_unused]] const auto guard = Backend::guard(like);
  return branch_round_backward_impl(Backend::launcher(like), grad_pre, grad_mean, grad_invstd, sources, code, round,
                                    dw, pw, in_mean, in_invstd, in_gamma, in_beta, pre, mean, invstd, reduction);
}

// Round 1's backward adding the sources' gradients into grad_sources in place; returns (grad_dw, grad_pw).
template <typename Backend>
std::tuple<at::Tensor, at::Tensor> branch_round_backward_accumulate_kernel(
    at::TensorList grad_sources, const at::Tensor& grad_pre, const at::Tensor& grad_mean,
    const at::Tensor& grad_invstd, at::TensorList sources, const at::Tensor& code, const at::Tensor& dw,
    const at::Tensor& pw, const at::Tensor& pre, const at::Tensor& mean, const at::Tensor& invstd, bool reduction,
    int64_t overwrite_below) {
  const char* op = "bnao::branch_round_backward_accumulate";
  TORCH_CHECK(!grad_sources.empty(), op, ": grad_sources is empty");
  const at::Tensor& like = first_source(op, sources);
  [[maybe_unused]] const auto guard = Backend::guard(like);
  const BackwardResult grads =
      branch_round_backward_impl(Backend::launcher(like), grad_pre, grad_mean, grad_invstd, sources, code, 1, dw, pw,
                                 {}, {}, {}, {}, pre, mean, invstd, reduction, grad_sources, overwrite_below);
  return {std::get<1>(grads), std::get<2>(grads)};
}

// Registers the three kernels for a backend (inside TORCH_LIBRARY_IMPL).
#define BNAO_REGISTER_BRANCH_ROUND(m, Backend)                                                           \
  do {                                                                                                   \
    (m).impl("branch_round", &::bnao::cell::branch_round_kernel<Backend>);                              \
    (m).impl("branch_round_backward", &::bnao::cell::branch_round_backward_kernel<Backend>);            \
    (m).impl("branch_round_backward_accumulate",                                                         \
             &::bnao::cell::branch_round_backward_accumulate_kernel<Backend>);                          \
  } while (0)

}  // namespace cell
}  // namespace bnao
