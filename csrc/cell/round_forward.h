// The forward bodies of bnao::branch_round (depthwise, pointwise, pooling results per element, and their
// column loops for the CPU launcher) and the reduction terms' base with the BN statistics (overview:
// cell/branch_round.h).
#pragma once

#include <cstdint>

#include "cell/round_values.h"

namespace bnao {
namespace cell {

// ------------------------------------------------------------------ forward bodies
// A row (b, n, c, i) of a [2, N, C, Ho, Wo] tensor, with its branch and the offset of column 0.
template <typename T>
struct PreRow {
  int b;
  int64_t n, c, i, offset;
  Branch<T> br;
};

// The branch of row `row` first (one division), so that a body with nothing to do for most branch kinds can
// stop before decoding the rest (pre_row_rest: two more divisions).
template <typename T>
BNAO_CELL_HD PreRow<T> pre_row_branch(const RoundArgs<T>& a, int64_t row) {
  PreRow<T> r;
  r.b = static_cast<int>(row / (a.batch * a.channels * a.height));
  r.br = read_branch(a, r.b);
  r.n = r.c = r.i = 0;
  r.offset = row * a.width;
  return r;
}

template <typename T>
BNAO_CELL_HD void pre_row_rest(const RoundArgs<T>& a, int64_t row, PreRow<T>& r) {
  row -= static_cast<int64_t>(r.b) * a.batch * a.channels * a.height;
  r.i = row % a.height;
  row /= a.height;
  r.c = row % a.channels;
  r.n = row / a.channels;
}

template <typename T>
BNAO_CELL_HD PreRow<T> pre_row(const RoundArgs<T>& a, int64_t row) {
  PreRow<T> r = pre_row_branch(a, row);
  pre_row_rest(a, row, r);
  return r;
}

// Elementwise bodies over pre's shape share the row decoding. `run_columns` (used by the CPU
// launcher on whole rows) defaults to `run` per column; a body overrides it where another loop
// order computes the same sums faster (the pointwise products, channel-outer).
// `run_group` (used by the CUDA launcher, a thread per kColumnsPerThread consecutive columns of a row) defaults
// to `run` per column; a body with a faster form for several columns (the depthwise taps) overrides both.
template <typename T, typename Derived>
struct PreBody {
  using Row = PreRow<T>;
  static constexpr int kColumnsPerThread = 1;
  static BNAO_CELL_HD Row row(const RoundArgs<T>& a, int64_t index) { return pre_row(a, index); }
  static BNAO_CELL_HD void run_columns(const RoundArgs<T>& a, const Row& r, int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) Derived::run(a, r, j);
  }
  static BNAO_CELL_HD void run_group(const RoundArgs<T>& a, const Row& r, int64_t j0, int count) {
    for (int q = 0; q < count; ++q) Derived::run(a, r, j0 + q);
  }
};

// out[j] = sum over c (in order) of weight[c * weight_stride] * input[c * plane + j], j in [begin, end):
// the per-element sums of pointwise_value and GradMid, with the channel loop outside so that the
// inner loop runs over contiguous columns (channel planes are far apart: walking them per
// element defeats the caches).
template <typename T>
BNAO_CELL_HD void pointwise_columns(const Compute<T>* weight, int64_t weight_stride, const T* input, int64_t plane,
                                    int64_t channels, int64_t begin, int64_t end, T* out) {
  using C = Compute<T>;
  constexpr int64_t kChunk = 64;
  for (int64_t start = begin; start < end; start += kChunk) {
    const int64_t count = end - start < kChunk ? end - start : kChunk;
    C sum[kChunk];
    for (int64_t q = 0; q < count; ++q) sum[q] = C(0);
    for (int64_t c = 0; c < channels; ++c) {
      const C w = weight[c * weight_stride];
      const T* column = input + c * plane + start;
      for (int64_t q = 0; q < count; ++q) sum[q] += w * static_cast<C>(column[q]);
    }
    for (int64_t q = 0; q < count; ++q) out[start + q] = sum[q];
  }
}

// Depthwise results of columns [begin, end) of a sep-conv row into out: the columns whose taps are
// all inside run tap-outer, column-inner (the same per-element sums as depthwise_value, in the
// same tap order, but independent columns side by side instead of one long add chain).
template <typename T>
BNAO_CELL_HD void depthwise_columns(const RoundArgs<T>& a, const PreRow<T>& r, int64_t begin, int64_t end, T* out) {
  const Branch<T>& br = r.br;
  const int k = br.kernel, d = br.dilation, s = br.stride;
  const int64_t pad = static_cast<int64_t>(d) * (k / 2), span = static_cast<int64_t>(k - 1) * d;
  const int64_t top = r.i * s - pad;
  // Interior columns: left = j * s - pad >= 0 and left + span < width.
  int64_t first = (pad + s - 1) / s, last = (br.in_width - 1 - span + pad) / s;  // last inclusive
  if (br.in_width - 1 - span + pad < 0 || top < 0 || top + span >= br.in_height) first = end, last = end - 1;
  first = first < begin ? begin : (first > end ? end : first);
  last = last >= end ? end - 1 : last;
  using C = Compute<T>;
  for (int64_t j = begin; j < first; ++j) out[j] = depthwise_value(a, br, r.b, r.n, r.c, r.i, j);
  const C* weight = a.dw + (static_cast<int64_t>(r.b) * a.channels + r.c) * kSlab;
  const ChannelInput<T> in = channel_input(a, br, r.b, r.n, r.c);
  constexpr int64_t kChunk = 64;
  for (int64_t start = first; start <= last; start += kChunk) {
    const int64_t count = last + 1 - start < kChunk ? last + 1 - start : kChunk;
    C sum[kChunk];
    for (int64_t q = 0; q < count; ++q) sum[q] = C(0);
    for (int kh = 0; kh < k; ++kh)
      for (int kw = 0; kw < k; ++kw) {
        const C w = weight[kh * kMaxKernel + kw];
        const int64_t y = top + kh * d, x0 = start * s - pad + kw * d;
        for (int64_t q = 0; q < count; ++q) sum[q] += w * relu(in.at(y, x0 + q * s));
      }
    for (int64_t q = 0; q < count; ++q) out[start + q] = sum[q];
  }
  for (int64_t j = (last + 1 > first ? last + 1 : first); j < end; ++j)
    out[j] = depthwise_value(a, br, r.b, r.n, r.c, r.i, j);
}

template <typename T>
struct DepthwiseForward : PreBody<T, DepthwiseForward<T>> {
  // Only sep convs compute here, and most rows belong to other branch kinds (on a GPU a thread per element).
  static BNAO_CELL_HD PreRow<T> row(const RoundArgs<T>& a, int64_t index) {
    PreRow<T> r = pre_row_branch(a, index);
    if (r.br.op == kOpSepConv) pre_row_rest(a, index, r);
    return r;
  }
  static BNAO_CELL_HD void run(const RoundArgs<T>& a, const PreRow<T>& r, int64_t j) {
    if (r.br.op == kOpSepConv) a.mid[r.offset + j] = depthwise_value(a, r.br, r.b, r.n, r.c, r.i, j);
  }
  static BNAO_CELL_HD void run_columns(const RoundArgs<T>& a, const PreRow<T>& r, int64_t begin, int64_t end) {
    if (r.br.op == kOpSepConv) depthwise_columns(a, r, begin, end, a.mid + r.offset);
  }
  static constexpr int kColumnsPerThread = kDepthwiseGroup;
  static BNAO_CELL_HD void run_group(const RoundArgs<T>& a, const PreRow<T>& r, int64_t j0, int count) {
    if (r.br.op == kOpSepConv) depthwise_group(a, r.br, r.b, r.n, r.c, r.i, j0, count, a.mid + r.offset);
  }
};

// Where the maximum of a max-pool window is, as (row - top) * 3 + (column - left) of the unclipped
// window: small integers, exact in any float type.
template <typename T>
BNAO_CELL_HD Compute<T> max_position_code(const Branch<T>& br, int64_t i, int64_t j, int64_t y, int64_t x) {
  return static_cast<Compute<T>>((y - (i * br.stride - 1)) * 3 + (x - (j * br.stride - 1)));
}

// One max-pool column through max_pool_at: its maximum into values[j], its position code into
// codes[j] (either may be null).
template <typename T>
BNAO_CELL_HD void max_pool_column(const RoundArgs<T>& a, const PreRow<T>& r, int64_t j, T* values, T* codes) {
  const MaxAt<Compute<T>> best = max_pool_at(a, r.br, r.b, r.n, r.c, r.i, j);
  if (values != nullptr) values[j] = best.value;
  if (codes != nullptr) codes[j] = max_position_code(r.br, r.i, j, best.y, best.x);
}

// Max-pool results of columns [begin, end) of a row (see max_pool_column). Windows entirely
// inside run column-inner with selects: max_pool_at's scan, in its order and with its tie and NaN
// rule, for independent columns side by side.
template <typename T>
BNAO_CELL_HD void max_pool_columns(const RoundArgs<T>& a, const PreRow<T>& r, int64_t begin, int64_t end, T* values,
                                   T* codes) {
  const Branch<T>& br = r.br;
  const int s = br.stride;
  const int64_t top = r.i * s - 1;
  // Interior columns: j * s - 1 >= 0 and j * s + 1 < in_width.
  int64_t first = 1, last = br.in_width >= 2 ? (br.in_width - 2) / s : -1;
  if (top < 0 || top + 2 >= br.in_height) first = end, last = end - 1;
  first = first < begin ? begin : (first > end ? end : first);
  last = last >= end ? end - 1 : last;
  for (int64_t j = begin; j < first; ++j) max_pool_column(a, r, j, values, codes);
  using C = Compute<T>;
  const ChannelInput<T> in = channel_input(a, br, r.b, r.n, r.c);
  constexpr int64_t kChunk = 64;
  for (int64_t start = first; start <= last; start += kChunk) {
    const int64_t count = last + 1 - start < kChunk ? last + 1 - start : kChunk;
    C best[kChunk], where[kChunk];
    for (int64_t q = 0; q < count; ++q) {
      best[q] = -std::numeric_limits<C>::infinity();
      where[q] = C(0);  // the window's first pixel, as max_pool_at starts
    }
    for (int dy = 0; dy < 3; ++dy)
      for (int dx = 0; dx < 3; ++dx) {
        const T* row = in.plane + (top + dy) * in.width + start * s - 1 + dx;
        const C code = static_cast<C>(dy * 3 + dx);
        for (int64_t q = 0; q < count; ++q) {
          const C raw = static_cast<C>(row[q * s]);
          const C value = in.normalize ? (raw - in.mean) * in.factor + in.beta : raw;
          const bool take = value > best[q] || value != value;
          best[q] = take ? value : best[q];
          where[q] = take ? code : where[q];
        }
      }
    if (values != nullptr)
      for (int64_t q = 0; q < count; ++q) values[start + q] = best[q];
    if (codes != nullptr)
      for (int64_t q = 0; q < count; ++q) codes[start + q] = where[q];
  }
  for (int64_t j = (last + 1 > first ? last + 1 : first); j < end; ++j) max_pool_column(a, r, j, values, codes);
}

// The backward's forward work, recomputed rather than saved: depthwise results of sep convs, and
// the argmax of each max-pool window (so that the input gradient tests 9 codes, not 9 windows).
template <typename T>
struct RecomputeForward : PreBody<T, RecomputeForward<T>> {
  static BNAO_CELL_HD void run(const RoundArgs<T>& a, const PreRow<T>& r, int64_t j) {
    if (r.br.op == kOpSepConv) {
      a.mid[r.offset + j] = depthwise_value(a, r.br, r.b, r.n, r.c, r.i, j);
    } else if (r.br.op == kOpMaxPool) {
      const MaxAt<Compute<T>> best = max_pool_at(a, r.br, r.b, r.n, r.c, r.i, j);
      a.mid[r.offset + j] = max_position_code(r.br, r.i, j, best.y, best.x);
    }
  }
  static BNAO_CELL_HD void run_columns(const RoundArgs<T>& a, const PreRow<T>& r, int64_t begin, int64_t end) {
    if (r.br.op == kOpSepConv) {
      depthwise_columns(a, r, begin, end, a.mid + r.offset);
    } else if (r.br.op == kOpMaxPool) {
      max_pool_columns(a, r, begin, end, static_cast<T*>(nullptr), a.mid + r.offset);
    }
  }
  static constexpr int kColumnsPerThread = kDepthwiseGroup;
  static BNAO_CELL_HD void run_group(const RoundArgs<T>& a, const PreRow<T>& r, int64_t j0, int count) {
    if (r.br.op == kOpSepConv) {
      depthwise_group(a, r.br, r.b, r.n, r.c, r.i, j0, count, a.mid + r.offset);
    } else if (r.br.op == kOpMaxPool) {
      for (int q = 0; q < count; ++q) run(a, r, j0 + q);
    }
  }
};

template <typename T>
struct BranchForward : PreBody<T, BranchForward<T>> {
  static BNAO_CELL_HD void run(const RoundArgs<T>& a, const PreRow<T>& r, int64_t j) {
    a.pre[r.offset + j] = branch_value(a, r.br, r.b, r.n, r.c, r.i, j);
  }
  static BNAO_CELL_HD void run_columns(const RoundArgs<T>& a, const PreRow<T>& r, int64_t begin, int64_t end) {
    if (r.br.op == kOpMaxPool) {
      max_pool_columns(a, r, begin, end, a.pre + r.offset, static_cast<T*>(nullptr));
      return;
    }
    if (r.br.op != kOpSepConv) {
      for (int64_t j = begin; j < end; ++j) run(a, r, j);
      return;
    }
    const Compute<T>* weight = a.pw + (static_cast<int64_t>(r.b) * a.channels + r.c) * a.channels;  // row c of pw[b]
    pointwise_columns(weight, 1, a.mid + pre_offset(a, r.b, r.n, 0, r.i, 0), a.height * a.width, a.channels, begin,
                      end, a.pre + r.offset);
  }
};

// Reduction context of an output indexed (b, channel): the terms run over (n, pixel).
template <typename T>
struct ChannelContext {
  bool active;
  int64_t output;
  int b;
  int64_t c;
  Branch<T> br;
  Compute<T> mean;  // the channel's batch mean, read once per output (InvstdTerm's terms centre on it)
};

template <typename T>
BNAO_CELL_HD ChannelContext<T> channel_context(const RoundArgs<T>& a, int64_t output) {
  ChannelContext<T> ctx;
  ctx.output = output;
  ctx.b = static_cast<int>(output / a.channels);
  ctx.c = output % a.channels;
  ctx.br = read_branch(a, ctx.b);
  ctx.active = false;
  ctx.mean = Compute<T>(0);
  return ctx;
}


// Reduction terms share `row_sum`, the sum of the terms of one row (n, i) in Compute<T>, used by the CPU
// launcher: four interleaved partial sums break the add latency chain of one running sum, and
// the row sums are then added in double in (n, i) order (deterministic, like every sum here).
template <typename T, typename Derived>
struct TermBase {
  template <typename Context>
  static BNAO_CELL_HD Compute<T> row_sum(const RoundArgs<T>& a, const Context& ctx, int64_t n, int64_t i) {
    using C = Compute<T>;
    C partial[4] = {C(0), C(0), C(0), C(0)};
    int64_t j = 0;
    for (; j + 4 <= a.width; j += 4)
      for (int q = 0; q < 4; ++q) partial[q] += Derived::term(a, ctx, n, i, j + q);
    for (; j < a.width; ++j) partial[0] += Derived::term(a, ctx, n, i, j);
    return (partial[0] + partial[1]) + (partial[2] + partial[3]);
  }
};

// strided_term_sum with its index arithmetic in `Index` (the caller checks that every index fits).
template <typename Index, typename Term, typename Acc, typename T>
BNAO_CELL_HD Acc strided_term_sum_as(const RoundArgs<T>& a, const typename Term::Context& ctx, Index first,
                                     Index step) {
  const Index width = static_cast<Index>(a.width), plane = static_cast<Index>(a.height * a.width);
  const Index length = static_cast<Index>(a.batch) * plane;
  Acc partial[4] = {Acc(0), Acc(0), Acc(0), Acc(0)};
  Index k = first;
  for (; k + 3 * step < length; k += 4 * step) {
    BNAO_UNROLL
    for (int q = 0; q < 4; ++q) {
      const Index index = k + q * step, n = index / plane, pixel = index - n * plane, i = pixel / width;
      partial[q] += static_cast<Acc>(Term::term(a, ctx, n, i, pixel - i * width));
    }
  }
  for (; k < length; k += step) {
    const Index n = k / plane, pixel = k - n * plane, i = pixel / width;
    partial[0] += static_cast<Acc>(Term::term(a, ctx, n, i, pixel - i * width));
  }
  return (partial[0] + partial[1]) + (partial[2] + partial[3]);
}

// The CUDA launcher's share of one output: Term's terms k = first, first + step, ... of the flattened
// (n, i, j) range (a thread of a block of a chunk, cell/reduction_split.h), in four interleaved sums
// so that a thread has four independent loads in flight. Deterministic for given (first, step).
// Two divisions per term dominate a one-load term's instructions, and a GPU's 32-bit division is several
// times cheaper than its 64-bit one, so indices run in 32 bits whenever they fit (every real shape).
template <typename Term, typename Acc, typename T>
BNAO_CELL_HD Acc strided_term_sum(const RoundArgs<T>& a, const typename Term::Context& ctx, int64_t first,
                                  int64_t step) {
  const int64_t length = a.batch * a.height * a.width;
  if (first >= 0 && step > 0 && length + 4 * step <= static_cast<int64_t>(UINT32_MAX)) {
    return strided_term_sum_as<uint32_t, Term, Acc>(a, ctx, static_cast<uint32_t>(first),
                                                    static_cast<uint32_t>(step));
  }
  return strided_term_sum_as<int64_t, Term, Acc>(a, ctx, first, step);
}

// Batch mean of pre per (branch, channel); 0 for branches without the round's BN.
template <typename T>
struct MeanTerm : TermBase<T, MeanTerm<T>> {
  using Context = ChannelContext<T>;
  static BNAO_CELL_HD Context prepare(const RoundArgs<T>& a, int64_t output) {
    Context ctx = channel_context(a, output);
    ctx.active = ctx.br.has_bn;
    return ctx;
  }
  static BNAO_CELL_HD Compute<T> term(const RoundArgs<T>& a, const Context& ctx, int64_t n, int64_t i, int64_t j) {
    return static_cast<Compute<T>>(a.pre[pre_offset(a, ctx.b, n, ctx.c, i, j)]);
  }
  template <typename Acc>
  static BNAO_CELL_HD void finish(const RoundArgs<T>& a, const Context& ctx, Acc sum) {
    using C = Compute<T>;
    a.mean[ctx.output] = ctx.active ? static_cast<C>(sum / static_cast<Acc>(a.batch * a.height * a.width)) : C(0);
  }
};

// 1 / sqrt(biased variance + eps) per (branch, channel), two-pass (after MeanTerm); 1 without BN.
template <typename T>
struct InvstdTerm : TermBase<T, InvstdTerm<T>> {
  using Context = ChannelContext<T>;
  static BNAO_CELL_HD Context prepare(const RoundArgs<T>& a, int64_t output) {
    Context ctx = MeanTerm<T>::prepare(a, output);
    ctx.mean = a.mean[output];  // MeanTerm's result, written by the previous launch
    return ctx;
  }
  static BNAO_CELL_HD Compute<T> term(const RoundArgs<T>& a, const Context& ctx, int64_t n, int64_t i, int64_t j) {
    const Compute<T> centred = static_cast<Compute<T>>(a.pre[pre_offset(a, ctx.b, n, ctx.c, i, j)]) - ctx.mean;
    return centred * centred;
  }
  template <typename Acc>
  static BNAO_CELL_HD void finish(const RoundArgs<T>& a, const Context& ctx, Acc sum) {
    const double variance = static_cast<double>(sum) / static_cast<double>(a.batch * a.height * a.width);
    a.invstd[ctx.output] = ctx.active ? static_cast<Compute<T>>(1.0 / sqrt(variance + a.eps)) : Compute<T>(1);
  }
};

}  // namespace cell
}  // namespace bnao
