// Shared host/device bodies of the fused cell's gather, node-output and
// slot-statistics ops (csrc/cell/DESIGN.md, "Ops"). Every function computes
// one work item from plain pointers, so the CPU kernels (cpu/node_ops_cpu.cpp,
// under at::parallel_for) and the CUDA kernels (cuda/node_ops_cuda.cu, on a
// grid) run the same arithmetic. Dependency-free apart from cell_code.h and compute_type.h.
#pragma once

#include <cstdint>

#include "cell/cell_code.h"
#include "cell/compute_type.h"

namespace bnao {
namespace cell {

// ------------------------------------------------------------------ gather_rows
// At most this many stacks per call (one per op with weights of a role: the
// middle op set has 7 for pw1) and this many trailing dims ([C, 7, 7] is 3).
// Fixed sizes let the table travel by value as a kernel argument: no device
// allocation, nothing that breaks CUDA-graph capture.
constexpr int kMaxGatherStacks = 16;
constexpr int kMaxGatherDims = 4;

// The stacks of one call: `data[s]` points at stack s ([rows[s], sizes[s][0..dims)]
// contiguous); `Ptr` is const for the forward's reads, mutable for the backward's writes.
template <typename Ptr>
struct StackTable {
  Ptr data[kMaxGatherStacks];
  int64_t rows[kMaxGatherStacks];
  int64_t row_numel[kMaxGatherStacks];
  int64_t sizes[kMaxGatherStacks][kMaxGatherDims];
  int num_stacks;
};

// The gathered row's shape (`shape` of the op) and its element count.
struct GatherShape {
  int64_t sizes[kMaxGatherDims];
  int dims;
  int64_t inner;
};

// Offset inside stacks[*stack] of element `e` of the gathered output, or -1
// when the element is padding (select < 0, or a coordinate past the stack's
// extent). Rows are not checked here: the CPU launcher checks them on the host,
// the CUDA kernel asserts them.
template <typename Ptr>
BNAO_CELL_HD int64_t gather_source_offset(int64_t e, const StackTable<Ptr>& table, const GatherShape& shape,
                                          const int64_t* select, const int64_t* rows, int* stack) {
  const int64_t r = e / shape.inner;
  int64_t rest = e - r * shape.inner;
  const int64_t s = select[r];
  if (s < 0) return -1;
  int64_t offset = 0;
  int64_t stride = 1;
  for (int d = shape.dims - 1; d >= 0; --d) {
    const int64_t coord = rest % shape.sizes[d];
    rest /= shape.sizes[d];
    if (coord >= table.sizes[s][d]) return -1;  // zero padding of a smaller kernel (e.g. 3x3 in 7x7)
    offset += coord * stride;
    stride *= table.sizes[s][d];
  }
  *stack = static_cast<int>(s);
  return rows[r] * table.row_numel[s] + offset;
}

template <typename scalar_t>
BNAO_CELL_HD void gather_rows_item(int64_t e, const StackTable<const scalar_t*>& table, const GatherShape& shape,
                                   const int64_t* select, const int64_t* rows, scalar_t* out) {
  int stack = 0;
  const int64_t offset = gather_source_offset(e, table, shape, select, rows, &stack);
  out[e] = offset < 0 ? scalar_t(0) : table.data[stack][offset];
}

// Backward of one gathered element into zero-initialised dense stack gradients.
// Rows are unique per stack within a call (a slot is (cell, node, branch, input
// id)), so each stack element receives at most one write: no atomics needed.
template <typename scalar_t>
BNAO_CELL_HD void gather_rows_backward_item(int64_t e, const StackTable<scalar_t*>& grads, const GatherShape& shape,
                                            const int64_t* select, const int64_t* rows, const scalar_t* grad) {
  int stack = 0;
  const int64_t offset = gather_source_offset(e, grads, shape, select, rows, &stack);
  if (offset >= 0) grads.data[stack][offset] = grad[e];
}

// ------------------------------------------------------------------ node_output
// Pointers and sizes of one node_output call: pre [2, N, C, HW] (activations, scalar_t), code
// [2, kNumFields], per-branch statistics and BN2 parameters [2, C] and drop_mask [N, 2] or null
// (Compute<scalar_t>: float32 under bfloat16 activations).
template <typename scalar_t>
struct NodeArgs {
  using P = Compute<scalar_t>;
  const scalar_t* pre;
  const int32_t* code;
  const P* mean;
  const P* invstd;
  const P* gamma;
  const P* beta;
  const P* drop_mask;
  int64_t batch;
  int64_t channels;
  int64_t plane;  // H * W
};

// Whether branch b contributes, and whether its BN2 applies (zero branches never do).
BNAO_CELL_HD bool branch_active(const int32_t* code, int b) { return code[b * kNumFields + kKind] != kKindZero; }

BNAO_CELL_HD bool branch_bn2(const int32_t* code, int b) {
  return branch_active(code, b) && (code[b * kNumFields + kFlags] & kFlagBn2) != 0;
}

// Drop-path multiplier of branch b for sample n (1 without a mask or drop flag).
template <typename scalar_t>
BNAO_CELL_HD Compute<scalar_t> branch_mask(const NodeArgs<scalar_t>& a, int b, int64_t n) {
  if (a.drop_mask == nullptr || (a.code[b * kNumFields + kFlags] & kFlagDrop) == 0) return Compute<scalar_t>(1);
  return a.drop_mask[n * 2 + b];
}

// out[e], e over [N, C, HW]: the sum over the active branches of mask * (BN2-normalised) pre.
template <typename scalar_t>
BNAO_CELL_HD void node_output_item(int64_t e, const NodeArgs<scalar_t>& a, scalar_t* out) {
  const int64_t per_sample = a.channels * a.plane;
  const int64_t n = e / per_sample;
  const int64_t c = (e / a.plane) % a.channels;
  const int64_t branch_numel = a.batch * per_sample;
  using C = Compute<scalar_t>;
  C sum = C(0);
  for (int b = 0; b < 2; ++b) {
    if (!branch_active(a.code, b)) continue;
    C y = static_cast<C>(a.pre[b * branch_numel + e]);
    if (branch_bn2(a.code, b)) {
      const int64_t bc = b * a.channels + c;
      y = (y - a.mean[bc]) * (a.invstd[bc] * a.gamma[bc]) + a.beta[bc];
    }
    sum += y * branch_mask(a, b, n);
  }
  out[e] = sum;
}

// grad_pre[e], e over [2, N, C, HW]: the output's gradient through branch b's mask and BN2 scale.
template <typename scalar_t>
BNAO_CELL_HD void node_output_grad_pre_item(int64_t e, const NodeArgs<scalar_t>& a, const scalar_t* grad,
                                            scalar_t* grad_pre) {
  const int64_t branch_numel = a.batch * a.channels * a.plane;
  const int b = static_cast<int>(e / branch_numel);
  const int64_t i = e - b * branch_numel;
  if (!branch_active(a.code, b)) {
    grad_pre[e] = scalar_t(0);
    return;
  }
  const int64_t n = i / (a.channels * a.plane);
  const int64_t c = (i / a.plane) % a.channels;
  Compute<scalar_t> g = static_cast<Compute<scalar_t>>(grad[i]) * branch_mask(a, b, n);
  if (branch_bn2(a.code, b)) g *= a.invstd[b * a.channels + c] * a.gamma[b * a.channels + c];
  grad_pre[e] = g;
}

// Partial sums over j = begin, begin + step, ... < N * HW of the statistics
// gradients of (branch b, channel c): sum g and sum g * (pre - mean), with
// g = grad * mask. The CPU runs it with (0, 1) per (b, c); thread t of block
// (output, chunk) on CUDA with (chunk * kThreads + t, chunks * kThreads)
// (cell/reduction_split.h), the partials then reduced in fixed orders.
template <typename scalar_t, typename acc_t>
BNAO_CELL_HD void node_output_param_partial(int b, int64_t c, int64_t begin, int64_t step, const NodeArgs<scalar_t>& a,
                                            const scalar_t* grad, acc_t* sum_grad, acc_t* sum_grad_centered) {
  const int64_t count = a.batch * a.plane;
  const int64_t branch_numel = a.batch * a.channels * a.plane;
  const acc_t mean = static_cast<acc_t>(a.mean[b * a.channels + c]);
  acc_t s1 = acc_t(0);
  acc_t s2 = acc_t(0);
  // A 32-bit division where every index fits (every real shape): several times cheaper on a GPU.
  const bool narrow = count + step <= static_cast<int64_t>(UINT32_MAX);
  for (int64_t j = begin; j < count; j += step) {
    const int64_t n = narrow ? static_cast<int64_t>(static_cast<uint32_t>(j) / static_cast<uint32_t>(a.plane))
                             : j / a.plane;
    const int64_t i = (n * a.channels + c) * a.plane + (j - n * a.plane);
    const acc_t g = static_cast<acc_t>(grad[i]) * static_cast<acc_t>(branch_mask(a, b, n));
    s1 += g;
    s2 += g * (static_cast<acc_t>(a.pre[b * branch_numel + i]) - mean);
  }
  *sum_grad = s1;
  *sum_grad_centered = s2;
}

// Gradients of mean, invstd, gamma, beta of (b, c) from the two sums; zero for
// branches without BN2 (their statistics and affine parameters are unused).
template <typename scalar_t, typename acc_t>
BNAO_CELL_HD void node_output_param_finish(int b, int64_t c, acc_t sum_grad, acc_t sum_grad_centered,
                                           const NodeArgs<scalar_t>& a, Compute<scalar_t>* grad_mean,
                                           Compute<scalar_t>* grad_invstd, Compute<scalar_t>* grad_gamma,
                                           Compute<scalar_t>* grad_beta) {
  using P = Compute<scalar_t>;
  const int64_t bc = b * a.channels + c;
  if (!branch_bn2(a.code, b)) {
    grad_mean[bc] = grad_invstd[bc] = grad_gamma[bc] = grad_beta[bc] = P(0);
    return;
  }
  const acc_t invstd = static_cast<acc_t>(a.invstd[bc]);
  const acc_t gamma = static_cast<acc_t>(a.gamma[bc]);
  grad_beta[bc] = static_cast<P>(sum_grad);
  grad_mean[bc] = static_cast<P>(-sum_grad * invstd * gamma);
  grad_gamma[bc] = static_cast<P>(sum_grad_centered * invstd);
  grad_invstd[bc] = static_cast<P>(sum_grad_centered * gamma);
}

// ------------------------------------------------------------ update_slot_stats
// torch.lerp's formula (two branches for accuracy near both ends), so the
// result matches the eager path's Tensor.lerp_.
template <typename scalar_t>
BNAO_CELL_HD scalar_t lerp(scalar_t start, scalar_t end, scalar_t weight) {
  return weight < scalar_t(0.5) ? start + weight * (end - start) : end - (end - start) * (scalar_t(1) - weight);
}

// Item e over [K, C]: folds the batch statistics of statistics row k into running
// row bn_rows[k] (skipped when < 0): mean by lerp, the unbiased variance
// (1 / invstd^2 - eps) * unbias by lerp. Rows are unique, so plain writes.
template <typename scalar_t>
BNAO_CELL_HD void update_slot_stats_item(int64_t e, int64_t channels, const int64_t* bn_rows, const scalar_t* mean,
                                         const scalar_t* invstd, scalar_t momentum, scalar_t eps, scalar_t unbias,
                                         scalar_t* running_mean, scalar_t* running_var) {
  const int64_t k = e / channels;
  const int64_t row = bn_rows[k];
  if (row < 0) return;
  const int64_t c = e - k * channels;
  const scalar_t inv = invstd[e];
  const scalar_t var = (scalar_t(1) / (inv * inv) - eps) * unbias;
  const int64_t target = row * channels + c;
  running_mean[target] = lerp(running_mean[target], mean[e], momentum);
  running_var[target] = lerp(running_var[target], var, momentum);
}

}  // namespace cell
}  // namespace bnao
