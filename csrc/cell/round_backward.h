// The backward bodies of bnao::branch_round_backward: the gradient of pre through the statistics, the
// pointwise and depthwise weight-gradient terms, the source gradients (round 1) and round 2's
// normalisation prologue (overview: cell/branch_round.h).
#pragma once

#include <cstdint>

#include "cell/round_input_grad.h"

namespace bnao {
namespace cell {

// ------------------------------------------------------------------ backward bodies
// Gradient of pre including the statistics' (d mean / d pre = 1/M; d invstd / d pre =
// -invstd^3 (pre - mean) / M, the mean's own dependence cancelling in the biased variance).
template <typename T>
struct GradTotal : PreBody<T, GradTotal<T>> {
  static BNAO_CELL_HD void run(const RoundArgs<T>& a, const PreRow<T>& r, int64_t j) {
    using C = Compute<T>;
    const int64_t index = r.offset + j;
    C grad = static_cast<C>(a.grad_pre[index]);
    if (r.br.has_bn) {
      const int64_t bc = r.b * a.channels + r.c;
      const C count = static_cast<C>(a.batch * a.height * a.width);
      const C invstd = a.invstd[bc];
      const C centred = static_cast<C>(a.pre[index]) - a.mean[bc];
      grad += a.grad_mean[bc] / count - a.grad_invstd[bc] * invstd * invstd * invstd * centred / count;
    }
    a.grad_total[index] = grad;
  }
};

// The backward's first elementwise pass: GradTotal and RecomputeForward of the same element in one launch
// (they read and write different buffers, so their order does not matter).
template <typename T>
struct GradTotalAndRecompute : PreBody<T, GradTotalAndRecompute<T>> {
  static BNAO_CELL_HD void run(const RoundArgs<T>& a, const PreRow<T>& r, int64_t j) {
    GradTotal<T>::run(a, r, j);
    RecomputeForward<T>::run(a, r, j);
  }
  static BNAO_CELL_HD void run_columns(const RoundArgs<T>& a, const PreRow<T>& r, int64_t begin, int64_t end) {
    GradTotal<T>::run_columns(a, r, begin, end);
    RecomputeForward<T>::run_columns(a, r, begin, end);
  }
  static constexpr int kColumnsPerThread = RecomputeForward<T>::kColumnsPerThread;
  static BNAO_CELL_HD void run_group(const RoundArgs<T>& a, const PreRow<T>& r, int64_t j0, int count) {
    GradTotal<T>::run_group(a, r, j0, count);
    RecomputeForward<T>::run_group(a, r, j0, count);
  }
};

// Gradient of the depthwise result of sep-conv branches: pw^T . grad_total.
template <typename T>
struct GradMid : PreBody<T, GradMid<T>> {
  static BNAO_CELL_HD void run(const RoundArgs<T>& a, const PreRow<T>& r, int64_t j) {
    using C = Compute<T>;
    if (r.br.op != kOpSepConv) return;
    const C* column = a.pw + static_cast<int64_t>(r.b) * a.channels * a.channels + r.c;
    const T* grad = a.grad_total + pre_offset(a, r.b, r.n, 0, r.i, j);
    const int64_t plane = a.height * a.width;
    C sum = C(0);
    for (int64_t o = 0; o < a.channels; ++o) sum += column[o * a.channels] * static_cast<C>(grad[o * plane]);
    a.grad_mid[r.offset + j] = sum;
  }
  static BNAO_CELL_HD void run_columns(const RoundArgs<T>& a, const PreRow<T>& r, int64_t begin, int64_t end) {
    if (r.br.op != kOpSepConv) return;
    const Compute<T>* weight = a.pw + static_cast<int64_t>(r.b) * a.channels * a.channels + r.c;  // column c of pw[b]
    pointwise_columns(weight, a.channels, a.grad_total + pre_offset(a, r.b, r.n, 0, r.i, 0), a.height * a.width,
                      a.channels, begin, end, a.grad_mid + r.offset);
  }
};


// grad pw[b, o, c] = sum over (n, pixel) of grad_total[b, n, o] * (what pw[o, c] multiplied).
template <typename T>
struct GradPwTerm : TermBase<T, GradPwTerm<T>> {
  struct Context {
    bool active;
    int64_t output;
    int b;
    int64_t o, c;
    Branch<T> br;
  };
  static BNAO_CELL_HD Context prepare(const RoundArgs<T>& a, int64_t output) {
    Context ctx;
    ctx.output = output;
    ctx.c = output % a.channels;
    ctx.o = (output / a.channels) % a.channels;
    ctx.b = static_cast<int>(output / (a.channels * a.channels));
    ctx.br = read_branch(a, ctx.b);
    ctx.active = ctx.br.op == kOpSepConv || ctx.br.op == kOpReduce;
    return ctx;
  }
  static BNAO_CELL_HD Compute<T> term(const RoundArgs<T>& a, const Context& ctx, int64_t n, int64_t i, int64_t j) {
    using C = Compute<T>;
    const C grad = static_cast<C>(a.grad_total[pre_offset(a, ctx.b, n, ctx.o, i, j)]);
    if (ctx.br.op == kOpSepConv) return grad * static_cast<C>(a.mid[pre_offset(a, ctx.b, n, ctx.c, i, j)]);
    const int64_t offset = reduce_offset(ctx.o, a.channels);
    const int64_t y = 2 * i + offset, x = 2 * j + offset;
    return inside(ctx.br, y, x) ? grad * load_input(a, ctx.br, ctx.b, n, ctx.c, y, x) : C(0);
  }
  // Sep convs: a plain dot product of two contiguous rows (vectorised); the reduce: the terms.
  static BNAO_CELL_HD Compute<T> row_sum(const RoundArgs<T>& a, const Context& ctx, int64_t n, int64_t i) {
    using C = Compute<T>;
    if (ctx.br.op != kOpSepConv) return TermBase<T, GradPwTerm<T>>::row_sum(a, ctx, n, i);
    const T* grad = a.grad_total + pre_offset(a, ctx.b, n, ctx.o, i, 0);
    const T* mid = a.mid + pre_offset(a, ctx.b, n, ctx.c, i, 0);
    C partial[4] = {C(0), C(0), C(0), C(0)};
    int64_t j = 0;
    for (; j + 4 <= a.width; j += 4)
      for (int q = 0; q < 4; ++q) partial[q] += static_cast<C>(grad[j + q]) * static_cast<C>(mid[j + q]);
    for (; j < a.width; ++j) partial[0] += static_cast<C>(grad[j]) * static_cast<C>(mid[j]);
    return (partial[0] + partial[1]) + (partial[2] + partial[3]);
  }
  template <typename Acc>
  static BNAO_CELL_HD void finish(const RoundArgs<T>& a, const Context& ctx, Acc sum) {
    a.grad_pw[ctx.output] = ctx.active ? static_cast<Compute<T>>(sum) : Compute<T>(0);
  }
};

// grad dw[b, c, kh, kw] = sum over (n, output pixel) of grad_mid * ReLU(input at the tap);
// zero outside the branch's k x k corner and for branches without a depthwise conv.
template <typename T>
struct GradDwTerm : TermBase<T, GradDwTerm<T>> {
  struct Context {
    bool active;
    int64_t output;
    int b;
    int64_t c;
    int kh, kw;
    Branch<T> br;
  };
  static BNAO_CELL_HD Context prepare(const RoundArgs<T>& a, int64_t output) {
    Context ctx;
    ctx.output = output;
    const int tap = static_cast<int>(output % kSlab);
    ctx.kh = tap / kMaxKernel;
    ctx.kw = tap % kMaxKernel;
    ctx.c = (output / kSlab) % a.channels;
    ctx.b = static_cast<int>(output / (kSlab * a.channels));
    ctx.br = read_branch(a, ctx.b);
    ctx.active = ctx.br.op == kOpSepConv && ctx.kh < ctx.br.kernel && ctx.kw < ctx.br.kernel;
    return ctx;
  }
  static BNAO_CELL_HD Compute<T> term(const RoundArgs<T>& a, const Context& ctx, int64_t n, int64_t i, int64_t j) {
    using C = Compute<T>;
    const int d = ctx.br.dilation, s = ctx.br.stride;
    const int64_t pad = static_cast<int64_t>(d) * (ctx.br.kernel / 2);
    const int64_t y = i * s - pad + ctx.kh * d, x = j * s - pad + ctx.kw * d;
    if (!inside(ctx.br, y, x)) return C(0);
    return static_cast<C>(a.grad_mid[pre_offset(a, ctx.b, n, ctx.c, i, j)]) *
           relu(load_input(a, ctx.br, ctx.b, n, ctx.c, y, x));
  }
  // The row's taps that land inside, without a bounds check per column (vectorisable).
  static BNAO_CELL_HD Compute<T> row_sum(const RoundArgs<T>& a, const Context& ctx, int64_t n, int64_t i) {
    using C = Compute<T>;
    const int d = ctx.br.dilation, s = ctx.br.stride;
    const int64_t pad = static_cast<int64_t>(d) * (ctx.br.kernel / 2);
    const int64_t y = i * s - pad + ctx.kh * d, shift = ctx.kw * d - pad;  // x = j * s + shift
    if (y < 0 || y >= ctx.br.in_height) return C(0);
    const int64_t first = shift >= 0 ? 0 : (-shift + s - 1) / s;
    const int64_t limit = (ctx.br.in_width - 1 - shift) / s;  // last j with x < in_width
    const int64_t last = ctx.br.in_width - 1 - shift < 0 ? -1 : (limit < a.width - 1 ? limit : a.width - 1);
    const ChannelInput<T> in = channel_input(a, ctx.br, ctx.b, n, ctx.c);
    const T* grad = a.grad_mid + pre_offset(a, ctx.b, n, ctx.c, i, 0);
    C partial[4] = {C(0), C(0), C(0), C(0)};
    int64_t j = first;
    if (s == 1) {
      // Stride 1 spelled out plainly (contiguous; the prologue hoisted), so the compiler vectorises it.
      const T* row = in.plane + y * in.width + shift;
      if (in.normalize) {
        for (; j + 4 <= last + 1; j += 4)
          for (int q = 0; q < 4; ++q)
            partial[q] += static_cast<C>(grad[j + q]) *
                          relu((static_cast<C>(row[j + q]) - in.mean) * in.factor + in.beta);
      } else {
        for (; j + 4 <= last + 1; j += 4)
          for (int q = 0; q < 4; ++q) partial[q] += static_cast<C>(grad[j + q]) * relu(static_cast<C>(row[j + q]));
      }
    }
    for (; j + 4 <= last + 1; j += 4)
      for (int q = 0; q < 4; ++q) partial[q] += static_cast<C>(grad[j + q]) * relu(in.at(y, (j + q) * s + shift));
    for (; j <= last; ++j) partial[0] += static_cast<C>(grad[j]) * relu(in.at(y, j * s + shift));
    return (partial[0] + partial[1]) + (partial[2] + partial[3]);
  }
  template <typename Acc>
  static BNAO_CELL_HD void finish(const RoundArgs<T>& a, const Context& ctx, Acc sum) {
    a.grad_dw[ctx.output] = ctx.active ? static_cast<Compute<T>>(sum) : Compute<T>(0);
  }
};


// Round 1: the gradient of each source of the launch (RoundArgs::source_index, source_count), summed over the
// branches that read it (zero when none).
template <typename T>
struct SourceGrad {
  // A row (n, c, y) of source `source`, whose gradient is `out`.
  struct Row {
    int source;
    int64_t n, c, y;
    T* out;
    Branch<T> br[kNumBranches];
  };
  static BNAO_CELL_HD Row row(const RoundArgs<T>& a, int64_t index) {
    const int64_t height = a.source_height[a.source_index], width = a.source_width[a.source_index];
    const int64_t per_source = a.batch * a.channels * height;
    Row r;
    r.source = a.source_index + static_cast<int>(index / per_source);
    for (int b = 0; b < kNumBranches; ++b) r.br[b] = read_branch(a, b);
    r.n = r.c = r.y = 0;
    r.out = nullptr;
    // A launch covers every state the node may read, and a node reads at most two: on a GPU most threads
    // stop here, before the rest of the decoding.
    if (skip(a, r)) return r;
    index -= (r.source - a.source_index) * per_source;
    r.out = a.grad_sources[r.source] + index * width;
    r.y = index % height;
    index /= height;
    r.c = index % a.channels;
    r.n = index / a.channels;
    return r;
  }
  // The CUDA launcher's form: `count` (<= kDepthwiseGroup) consecutive columns from x0, the sep convs' taps
  // through depthwise_input_grad_group; each element's sum as `run` adds it (start, branch 0, branch 1).
  static constexpr int kColumnsPerThread = kDepthwiseGroup;
  static BNAO_CELL_HD void run_group(const RoundArgs<T>& a, const Row& r, int64_t x0, int count) {
    using C = Compute<T>;
    if (skip(a, r)) return;
    // Loops over the whole group with `q < count` tests (not `q < count` bounds), so the arrays stay registers.
    C sums[kDepthwiseGroup], values[kDepthwiseGroup];
    BNAO_UNROLL
    for (int q = 0; q < kDepthwiseGroup; ++q) sums[q] = q < count && adds(a, r) ? static_cast<C>(r.out[x0 + q]) : C(0);
    for (int b = 0; b < kNumBranches; ++b) {
      const Branch<T>& br = r.br[b];
      if (br.source != r.source) continue;
      if (br.op == kOpSepConv) {
        depthwise_input_grad_group(a, br, b, r.n, r.c, r.y, x0, count, values);
      } else {
        BNAO_UNROLL
        for (int q = 0; q < kDepthwiseGroup; ++q)
          values[q] = q < count ? branch_input_grad(a, br, b, r.n, r.c, r.y, x0 + q) : C(0);
      }
      BNAO_UNROLL
      for (int q = 0; q < kDepthwiseGroup; ++q) sums[q] += values[q];
    }
    BNAO_UNROLL
    for (int q = 0; q < kDepthwiseGroup; ++q)
      if (q < count) r.out[x0 + q] = sums[q];
  }
  // Whether the row's gradient is added to its buffer (else the buffer is overwritten).
  static BNAO_CELL_HD bool adds(const RoundArgs<T>& a, const Row& r) {
    return a.accumulate && r.source >= a.overwrite_below;
  }
  // Adding to a source no branch reads adds zero: leave its buffer untouched (no memory traffic).
  static BNAO_CELL_HD bool skip(const RoundArgs<T>& a, const Row& r) {
    return adds(a, r) && r.br[0].source != r.source && r.br[1].source != r.source;
  }
  static BNAO_CELL_HD void run(const RoundArgs<T>& a, const Row& r, int64_t x) {
    if (skip(a, r)) return;
    Compute<T> sum = adds(a, r) ? static_cast<Compute<T>>(r.out[x]) : Compute<T>(0);
    for (int b = 0; b < kNumBranches; ++b) {
      if (r.br[b].source == r.source) sum += branch_input_grad(a, r.br[b], b, r.n, r.c, r.y, x);
    }
    r.out[x] = sum;
  }
  // Same sums as `run`, branch by branch over the whole row (start + branch 0 + branch 1, as in run;
  // start is 0, or the value already there when accumulating).
  static BNAO_CELL_HD void run_columns(const RoundArgs<T>& a, const Row& r, int64_t begin, int64_t end) {
    if (skip(a, r)) return;
    T* out = r.out;
    if (!adds(a, r)) {
      for (int64_t x = begin; x < end; ++x) out[x] = T(0);
    }
    for (int b = 0; b < kNumBranches; ++b) {
      const Branch<T>& br = r.br[b];
      if (br.source != r.source) continue;
      if (br.op == kOpSepConv) {
        add_depthwise_input_grad_columns(a, br, b, r.n, r.c, r.y, begin, end, out);
      } else if (br.op == kOpMaxPool) {
        add_max_pool_input_grad_columns(a, br, b, r.n, r.c, r.y, begin, end, out);
      } else {
        for (int64_t x = begin; x < end; ++x) add_to(out[x], branch_input_grad(a, br, b, r.n, r.c, r.y, x));
      }
    }
  }
};

// Round 2, first pass: gradient of each branch's normalised input, into grad_source (scaled to
// pre1's gradient by ScaleNormGrad once the prologue's parameter gradients have read it).
template <typename T>
struct NormInputGrad : PreBody<T, NormInputGrad<T>> {
  static BNAO_CELL_HD void run(const RoundArgs<T>& a, const PreRow<T>& r, int64_t j) {
    a.grad_source[r.offset + j] = branch_input_grad(a, r.br, r.b, r.n, r.c, r.i, j);
  }
  static BNAO_CELL_HD void run_columns(const RoundArgs<T>& a, const PreRow<T>& r, int64_t begin, int64_t end) {
    if (r.br.op != kOpSepConv) {
      for (int64_t j = begin; j < end; ++j) run(a, r, j);
      return;
    }
    T* out = a.grad_source + r.offset;  // 0 + the gradient: run's value (up to the sign of a zero)
    for (int64_t j = begin; j < end; ++j) out[j] = T(0);
    add_depthwise_input_grad_columns(a, r.br, r.b, r.n, r.c, r.i, begin, end, out);
  }
};

template <typename T>
struct ScaleNormGrad : PreBody<T, ScaleNormGrad<T>> {
  static BNAO_CELL_HD void run(const RoundArgs<T>& a, const PreRow<T>& r, int64_t j) {
    if (!r.br.normalize) return;
    const int64_t bc = r.b * a.channels + r.c;
    a.grad_source[r.offset + j] = static_cast<Compute<T>>(a.grad_source[r.offset + j]) * (a.in_invstd[bc] * a.in_gamma[bc]);
  }
};

// Prologue z = (x - mean) * invstd * gamma + beta, gz = dL/dz in grad_source:
// S1 = sum gz gives grad beta = S1 and grad mean = -S1 * invstd * gamma.
template <typename T>
struct NormShiftTerm : TermBase<T, NormShiftTerm<T>> {
  using Context = ChannelContext<T>;
  static BNAO_CELL_HD Context prepare(const RoundArgs<T>& a, int64_t output) {
    Context ctx = channel_context(a, output);
    ctx.active = ctx.br.normalize;
    return ctx;
  }
  static BNAO_CELL_HD Compute<T> term(const RoundArgs<T>& a, const Context& ctx, int64_t n, int64_t i, int64_t j) {
    return static_cast<Compute<T>>(a.grad_source[pre_offset(a, ctx.b, n, ctx.c, i, j)]);
  }
  template <typename Acc>
  static BNAO_CELL_HD void finish(const RoundArgs<T>& a, const Context& ctx, Acc sum) {
    const int64_t o = ctx.output;
    const Compute<T> shift = ctx.active ? static_cast<Compute<T>>(sum) : Compute<T>(0);
    a.grad_in_beta[o] = shift;
    a.grad_in_mean[o] = -shift * a.in_invstd[o] * a.in_gamma[o];
  }
};

// S2 = sum gz * (x - mean) gives grad gamma = S2 * invstd and grad invstd = S2 * gamma.
template <typename T>
struct NormScaleTerm : TermBase<T, NormScaleTerm<T>> {
  using Context = ChannelContext<T>;
  static BNAO_CELL_HD Context prepare(const RoundArgs<T>& a, int64_t output) {
    return NormShiftTerm<T>::prepare(a, output);
  }
  static BNAO_CELL_HD Compute<T> term(const RoundArgs<T>& a, const Context& ctx, int64_t n, int64_t i, int64_t j) {
    using C = Compute<T>;
    const int64_t offset = pre_offset(a, ctx.b, n, ctx.c, i, j);
    return static_cast<C>(a.grad_source[offset]) * (static_cast<C>(a.sources[0][offset]) - a.in_mean[ctx.output]);
  }
  template <typename Acc>
  static BNAO_CELL_HD void finish(const RoundArgs<T>& a, const Context& ctx, Acc sum) {
    const int64_t o = ctx.output;
    const Compute<T> scale = ctx.active ? static_cast<Compute<T>>(sum) : Compute<T>(0);
    a.grad_in_gamma[o] = scale * a.in_invstd[o];
    a.grad_in_invstd[o] = scale * a.in_gamma[o];
  }
};

}  // namespace cell
}  // namespace bnao
