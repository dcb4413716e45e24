// Kernel bodies of bnao::branch_round and bnao::branch_round_backward, shared
// by the CPU kernel (cpu/branch_round_cpu.cpp, at::parallel_for) and the CUDA
// kernel (cuda/branch_round_cuda.cu, a grid). Semantics: csrc/cell/DESIGN.md,
// "branch_round", defined by bnao/ops/fused/reference.py::branch_round_reference.
//
// Two kinds of bodies, both functions of (arguments, work-item index):
//   * elementwise bodies: one work item per element (row, column) of a [2, N, C, Ho, Wo] (or
//     source-shaped) tensor, writing only that element, so they need no atomics.
//     `Body::row(args, row)` decodes a row (all but the last dimension) into a `Body::Row`, and
//     `Body::run(args, row, column)` computes one element. The CPU launcher decodes each row
//     once and calls `Body::run_columns(args, row, begin, end)` (the same per-element sums,
//     with loops a CPU vectorises); the CUDA launcher gives one element to each thread, except
//     for the pointwise products, which it runs in their channel-tile forms (BranchForwardTiles,
//     GradMidTiles: 8 output channels of a pixel per thread, the same per-element sums).
//   * reduction terms: output `o` (a (branch, channel) statistic or a weight gradient) is the
//     sum over every (n, i, j) of pre's shape of `Term::term(args, ctx, n, i, j)`, with
//     `ctx = Term::prepare(args, o)`, written by `Term::finish(args, ctx, sum)`. The CPU launcher
//     adds each row's `Term::row_sum` in (n, i) order in double on one thread; the CUDA launcher
//     splits each output over chunks of blocks (cell/reduction_split.h, `strided_term_sum` per
//     thread, a fixed-shape tree per block, the chunks added in order), and computes the weight
//     gradients as multi-sum tiles (GradDwTiles, GradPwTiles) with the same chunk pass. Both are
//     deterministic.
// The phase sequences (run_forward / run_backward) are written once here, against a launcher
// that provides `for_each<Body>(rows, columns, args)`, `reduce<Term>(outputs, args)`, and
// `for_each_tiled<Body, Tiles>` / `reduce_tiled<Term, Tiles>` (the same results, through the tile
// forms where a backend prefers them).
//
// The branch code is device data: it is read inside the bodies. Every read of an activation is
// bounds-checked against the source's real shape, so a corrupt code cannot read out of bounds
// (it can only give wrong numbers); the CPU op validates the code before running.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#include "cell/cell_code.h"
#include "cell/compute_type.h"

namespace bnao {
namespace cell {

constexpr int kMaxSources = 16;  // a node reads at most B + 1 states; B + 2 <= 16 covers every space
constexpr int kNumBranches = 2;
constexpr int kSlab = kMaxKernel * kMaxKernel;  // floats per channel of a gathered depthwise weight

// What a branch computes in a round (the kind, resolved with its stride and the round).
enum RoundOp : int {
  kOpZero = 0,     // zeros
  kOpCopy = 1,     // identity (stride 1), and every round-2 pass-through
  kOpSepConv = 2,  // ReLU, depthwise k x k (stride, dilation), pointwise C x C
  kOpReduce = 3,   // factorized reduce: pointwise rows :C/2 on even pixels, rows C/2: on odd ones
  kOpAvgPool = 4,  // 3x3, pad 1, stride, padding excluded from the count
  kOpMaxPool = 5,  // 3x3, pad 1 (-inf), stride
};

// Everything a body may read or write. Passed by value to CUDA kernels (< 1 KB).
// Activations are T; weights, BN statistics and affine parameters (and their gradients) are P =
// Compute<T> (cell/compute_type.h).
template <typename T>
struct RoundArgs {
  using P = Compute<T>;
  // Sources: round 1 the states the node may read ([N, C, H_s, W_s] each); round 2 one tensor,
  // pre1 [2, N, C, Ho, Wo] (source_height/width then hold Ho, Wo).
  const T* sources[kMaxSources];
  int64_t source_height[kMaxSources];
  int64_t source_width[kMaxSources];
  int num_sources;
  const int32_t* code;  // [2, kNumFields]
  int round;            // 1 or 2
  int64_t batch, channels, height, width;  // N, C, Ho, Wo of pre
  const P* dw;  // [2, C, 7, 7]
  const P* pw;  // [2, C, C]
  // Round 2's prologue: round 1's (mean, invstd, gamma, beta), [2, C] each; null in round 1.
  const P* in_mean;
  const P* in_invstd;
  const P* in_gamma;
  const P* in_beta;
  double eps;
  // Forward results (read again by the backward).
  T* pre;     // [2, N, C, Ho, Wo]
  T* mid;     // [2, N, C, Ho, Wo] scratch: depthwise results of sep-conv branches
  P* mean;    // [2, C]
  P* invstd;  // [2, C]
  // Backward.
  const T* grad_pre;     // [2, N, C, Ho, Wo]
  const P* grad_mean;    // [2, C]
  const P* grad_invstd;  // [2, C]
  T* grad_total;         // [2, N, C, Ho, Wo] scratch: gradient of pre including the statistics'
  T* grad_mid;           // [2, N, C, Ho, Wo] scratch: gradient of mid
  P* grad_dw;            // [2, C, 7, 7]
  P* grad_pw;            // [2, C, C]
  P* grad_in_mean;       // [2, C] (round 2)
  P* grad_in_invstd;
  P* grad_in_gamma;
  P* grad_in_beta;
  T* grad_source;    // the source gradient being written (one launch per source)
  int source_index;  // which source grad_source belongs to
  bool accumulate;   // round 1: add the source gradients to grad_source instead of overwriting it
  int overwrite_below;  // when accumulating: sources below this index are overwritten all the same
};

// A branch's decision for the round, decoded from its code row.
template <typename T>
struct Branch {
  int op;
  int kernel, dilation, stride;
  bool has_bn;     // the round's BN statistics are computed for it
  bool normalize;  // round 2: BN1's normalisation is applied to its input first
  int source;      // source it reads (-1: none)
  const T* input;  // [N, C, in_height, in_width]
  int64_t in_height, in_width;
};

BNAO_CELL_HD int clamp_int(int value, int low, int high) {
  return value < low ? low : (value > high ? high : value);
}

BNAO_CELL_HD int round1_op(int kind, int stride) {
  switch (kind) {
    case kKindSepConv:
    case kKindDilSepConv:
      return kOpSepConv;
    case kKindIdentity:
      return stride == 2 ? kOpReduce : kOpCopy;
    case kKindAvgPool:
      return kOpAvgPool;
    case kKindMaxPool:
      return kOpMaxPool;
    default:  // kKindZero, and unknown kinds of a corrupt code
      return kOpZero;
  }
}

template <typename T>
BNAO_CELL_HD Branch<T> read_branch(const RoundArgs<T>& a, int b) {
  const int32_t* row = a.code + b * kNumFields;
  const int kind = row[kKind], flags = row[kFlags];
  Branch<T> br;
  // Clamped so that a corrupt code cannot index past a 7x7 weight slab.
  br.kernel = clamp_int(row[kKernel], 1, kMaxKernel);
  if (a.round == 1) {
    br.dilation = clamp_int(row[kDilation], 1, 2);
    br.stride = clamp_int(row[kStride], 1, 2);
    br.has_bn = (flags & kFlagBn1) != 0;
    br.normalize = false;
    const int source = row[kInput];
    const bool valid = source >= 0 && source < a.num_sources;
    br.source = valid ? source : -1;
    br.op = valid ? round1_op(kind, br.stride) : kOpZero;
    br.input = valid ? a.sources[source] : nullptr;
    br.in_height = valid ? a.source_height[source] : 0;
    br.in_width = valid ? a.source_width[source] : 0;
  } else {
    // Round 2: only sep convs compute (stride 1, dilation 1); every other branch passes pre1 through.
    br.dilation = 1;
    br.stride = 1;
    br.has_bn = (flags & kFlagBn2) != 0;
    br.normalize = (flags & kFlagBn1) != 0;
    br.source = 0;
    br.op = kind == kKindSepConv ? kOpSepConv : kOpCopy;
    br.in_height = a.height;
    br.in_width = a.width;
    br.input = a.sources[0] + static_cast<int64_t>(b) * a.batch * a.channels * a.height * a.width;
  }
  return br;
}

template <typename T>
BNAO_CELL_HD int64_t pre_offset(const RoundArgs<T>& a, int b, int64_t n, int64_t c, int64_t i, int64_t j) {
  return (((static_cast<int64_t>(b) * a.batch + n) * a.channels + c) * a.height + i) * a.width + j;
}

template <typename T>
BNAO_CELL_HD bool inside(const Branch<T>& br, int64_t y, int64_t x) {
  return y >= 0 && y < br.in_height && x >= 0 && x < br.in_width;
}

// The branch's input at an in-bounds pixel, after round 2's prologue normalisation.
template <typename T>
BNAO_CELL_HD Compute<T> load_input(const RoundArgs<T>& a, const Branch<T>& br, int b, int64_t n, int64_t c,
                                   int64_t y, int64_t x) {
  Compute<T> value = static_cast<Compute<T>>(br.input[((n * a.channels + c) * br.in_height + y) * br.in_width + x]);
  if (br.normalize) {
    const int64_t bc = b * a.channels + c;
    // Same association as the reference: (x - mean) * (invstd * gamma) + beta.
    value = (value - a.in_mean[bc]) * (a.in_invstd[bc] * a.in_gamma[bc]) + a.in_beta[bc];
  }
  return value;
}

// One channel plane of a branch's input with round 2's prologue constants read once, for the
// loops that visit many pixels of one (n, c).
template <typename T>
struct ChannelInput {
  const T* plane;
  int64_t height, width;
  bool normalize;
  Compute<T> mean, factor, beta;

  BNAO_CELL_HD Compute<T> at(int64_t y, int64_t x) const {
    const Compute<T> value = static_cast<Compute<T>>(plane[y * width + x]);
    return normalize ? (value - mean) * factor + beta : value;
  }
  BNAO_CELL_HD bool inside(int64_t y, int64_t x) const { return y >= 0 && y < height && x >= 0 && x < width; }
};

template <typename T>
BNAO_CELL_HD ChannelInput<T> channel_input(const RoundArgs<T>& a, const Branch<T>& br, int b, int64_t n, int64_t c) {
  ChannelInput<T> in;
  in.plane = br.input + (n * a.channels + c) * br.in_height * br.in_width;
  in.height = br.in_height;
  in.width = br.in_width;
  in.normalize = br.normalize;
  in.mean = in.factor = in.beta = Compute<T>(0);
  if (br.normalize) {
    const int64_t bc = b * a.channels + c;
    in.mean = a.in_mean[bc];
    in.factor = a.in_invstd[bc] * a.in_gamma[bc];
    in.beta = a.in_beta[bc];
  }
  return in;
}

// ReLU that keeps NaN (like torch.relu). On the host it clears the bits of negative values with a
// mask instead of branching: on activations the sign is a coin flip, so a branch mispredicts
// half the time, and the mask form vectorises. GPUs predicate the select anyway.
template <typename T>
BNAO_CELL_HD T relu(T value) {
#ifdef __CUDA_ARCH__
  return value < T(0) ? T(0) : value;
#else
  using Bits = typename std::conditional<sizeof(T) == 4, uint32_t, uint64_t>::type;
  static_assert(sizeof(Bits) == sizeof(T), "relu: float32 or float64 only");
  Bits bits;
  std::memcpy(&bits, &value, sizeof(T));
  bits &= Bits(0) - static_cast<Bits>(!(value < T(0)));  // all ones unless negative
  std::memcpy(&value, &bits, sizeof(T));
  return value;
#endif
}

// Input pixel of a factorized-reduce output row: rows :C/2 read even pixels, the others odd ones.
BNAO_CELL_HD int64_t reduce_offset(int64_t out_channel, int64_t channels) { return out_channel < channels / 2 ? 0 : 1; }

// out += value, the sum in the arithmetic type and rounded once to the storage type (with bfloat16
// storage, `out += value` would first round value to bfloat16).
template <typename T>
BNAO_CELL_HD void add_to(T& out, Compute<T> value) {
  out = static_cast<T>(static_cast<Compute<T>>(out) + value);
}

// ------------------------------------------------------------------ forward values
template <typename T>
BNAO_CELL_HD Compute<T> depthwise_value(const RoundArgs<T>& a, const Branch<T>& br, int b, int64_t n, int64_t c,
                                        int64_t i, int64_t j) {
  using C = Compute<T>;
  const int k = br.kernel, d = br.dilation, s = br.stride;
  const int64_t pad = static_cast<int64_t>(d) * (k / 2);
  const C* weight = a.dw + (static_cast<int64_t>(b) * a.channels + c) * kSlab;
  const ChannelInput<T> in = channel_input(a, br, b, n, c);
  const int64_t top = i * s - pad, left = j * s - pad, span = static_cast<int64_t>(k - 1) * d;
  C sum = C(0);
  if (top >= 0 && left >= 0 && top + span < in.height && left + span < in.width) {
    // Interior pixel (most of them): no bounds checks in the tap loop.
    for (int kh = 0; kh < k; ++kh)
      for (int kw = 0; kw < k; ++kw) sum += weight[kh * kMaxKernel + kw] * relu(in.at(top + kh * d, left + kw * d));
    return sum;
  }
  for (int kh = 0; kh < k; ++kh) {
    const int64_t y = top + kh * d;
    for (int kw = 0; kw < k; ++kw) {
      const int64_t x = left + kw * d;
      if (in.inside(y, x)) sum += weight[kh * kMaxKernel + kw] * relu(in.at(y, x));
    }
  }
  return sum;
}

template <typename T>
BNAO_CELL_HD Compute<T> pointwise_value(const RoundArgs<T>& a, int b, int64_t n, int64_t o, int64_t i, int64_t j) {
  using C = Compute<T>;
  const C* row = a.pw + (static_cast<int64_t>(b) * a.channels + o) * a.channels;
  const int64_t plane = a.height * a.width;
  const T* column = a.mid + pre_offset(a, b, n, 0, i, j);
  C sum = C(0);
  for (int64_t c = 0; c < a.channels; ++c) sum += row[c] * static_cast<C>(column[c * plane]);
  return sum;
}

template <typename T>
BNAO_CELL_HD Compute<T> reduce_value(const RoundArgs<T>& a, const Branch<T>& br, int b, int64_t n, int64_t o,
                                     int64_t i, int64_t j) {
  using C = Compute<T>;
  const int64_t offset = reduce_offset(o, a.channels);
  const int64_t y = 2 * i + offset, x = 2 * j + offset;
  if (!inside(br, y, x)) return C(0);  // odd pixels past the edge read zero padding
  const C* row = a.pw + (static_cast<int64_t>(b) * a.channels + o) * a.channels;
  C sum = C(0);
  for (int64_t c = 0; c < a.channels; ++c) sum += row[c] * load_input(a, br, b, n, c, y, x);
  return sum;
}

// Rows [begin, end) of a 3x3 pad-1 window of output i at `stride`, clipped to [0, size).
struct Window {
  int64_t begin, end;
};

BNAO_CELL_HD Window pool_window(int64_t i, int stride, int64_t size) {
  Window w;
  w.begin = i * stride - 1 < 0 ? 0 : i * stride - 1;
  w.end = i * stride + 2 > size ? size : i * stride + 2;
  return w;
}

template <typename T>
BNAO_CELL_HD Compute<T> avg_pool_value(const RoundArgs<T>& a, const Branch<T>& br, int b, int64_t n, int64_t c,
                                       int64_t i, int64_t j) {
  using C = Compute<T>;
  const Window rows = pool_window(i, br.stride, br.in_height), cols = pool_window(j, br.stride, br.in_width);
  C sum = C(0);
  for (int64_t y = rows.begin; y < rows.end; ++y)
    for (int64_t x = cols.begin; x < cols.end; ++x) sum += load_input(a, br, b, n, c, y, x);
  const int64_t count = (rows.end - rows.begin) * (cols.end - cols.begin);  // count_include_pad=False
  return count > 0 ? sum / static_cast<C>(count) : C(0);
}

// Max of a 3x3 window and where it is: the first maximum in row-major order (as PyTorch), a NaN
// winning like in PyTorch's CPU kernel.
template <typename T>
struct MaxAt {
  T value;
  int64_t y, x;
};

template <typename T>
BNAO_CELL_HD MaxAt<Compute<T>> max_pool_at(const RoundArgs<T>& a, const Branch<T>& br, int b, int64_t n, int64_t c,
                                           int64_t i, int64_t j) {
  using C = Compute<T>;
  const Window rows = pool_window(i, br.stride, br.in_height), cols = pool_window(j, br.stride, br.in_width);
  MaxAt<C> best;
  best.value = -std::numeric_limits<C>::infinity();
  best.y = rows.begin;
  best.x = cols.begin;
  for (int64_t y = rows.begin; y < rows.end; ++y)
    for (int64_t x = cols.begin; x < cols.end; ++x) {
      const C value = load_input(a, br, b, n, c, y, x);
      // Selects rather than a branch: which pixel wins is data-dependent and unpredictable.
      const bool take = value > best.value || value != value;
      best.value = take ? value : best.value;
      best.y = take ? y : best.y;
      best.x = take ? x : best.x;
    }
  return best;
}

// pre[b, n, c, i, j] of a branch whose depthwise results (sep convs) are in a.mid.
template <typename T>
BNAO_CELL_HD Compute<T> branch_value(const RoundArgs<T>& a, const Branch<T>& br, int b, int64_t n, int64_t c,
                                     int64_t i, int64_t j) {
  switch (br.op) {
    case kOpSepConv:
      return pointwise_value(a, b, n, c, i, j);
    case kOpReduce:
      return reduce_value(a, br, b, n, c, i, j);
    case kOpAvgPool:
      return avg_pool_value(a, br, b, n, c, i, j);
    case kOpMaxPool:
      return max_pool_at(a, br, b, n, c, i, j).value;
    case kOpCopy:
      return inside(br, i, j) ? load_input(a, br, b, n, c, i, j) : Compute<T>(0);
    default:
      return Compute<T>(0);
  }
}

// ------------------------------------------------------------------ forward bodies
// A row (b, n, c, i) of a [2, N, C, Ho, Wo] tensor, with its branch and the offset of column 0.
template <typename T>
struct PreRow {
  int b;
  int64_t n, c, i, offset;
  Branch<T> br;
};

template <typename T>
BNAO_CELL_HD PreRow<T> pre_row(const RoundArgs<T>& a, int64_t row) {
  PreRow<T> r;
  r.offset = row * a.width;
  r.i = row % a.height;
  row /= a.height;
  r.c = row % a.channels;
  row /= a.channels;
  r.n = row % a.batch;
  r.b = static_cast<int>(row / a.batch);
  r.br = read_branch(a, r.b);
  return r;
}

// Elementwise bodies over pre's shape share the row decoding. `run_columns` (used by the CPU
// launcher on whole rows) defaults to `run` per column; a body overrides it where another loop
// order computes the same sums faster (the pointwise products, channel-outer).
template <typename T, typename Derived>
struct PreBody {
  using Row = PreRow<T>;
  static BNAO_CELL_HD Row row(const RoundArgs<T>& a, int64_t index) { return pre_row(a, index); }
  static BNAO_CELL_HD void run_columns(const RoundArgs<T>& a, const Row& r, int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) Derived::run(a, r, j);
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
  static BNAO_CELL_HD void run(const RoundArgs<T>& a, const PreRow<T>& r, int64_t j) {
    if (r.br.op == kOpSepConv) a.mid[r.offset + j] = depthwise_value(a, r.br, r.b, r.n, r.c, r.i, j);
  }
  static BNAO_CELL_HD void run_columns(const RoundArgs<T>& a, const PreRow<T>& r, int64_t begin, int64_t end) {
    if (r.br.op == kOpSepConv) depthwise_columns(a, r, begin, end, a.mid + r.offset);
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

// ------------------------------------------------------------------ channel tiles (the CUDA launcher's)
// BranchForward and GradMid compute each output element as a C-term dot product over channels, so run one
// element per thread they read every channel value C times (from L2 on a GPU: the other channels' threads
// sit in other blocks). Their tile forms compute kChannelTile output channels of one pixel per work item and
// read each channel value once for all of them, with the same per-element sums in the same order (so the
// same values as the element bodies). A backend's `for_each_tiled<Body, Tiles>` runs them (the CUDA
// launcher); the CPU runs the element bodies, whose row loops already stream each channel row once.
constexpr int kChannelTile = 8;

// Work item e = ((b * N + n) * tiles + tile) * H * W + pixel of a channel-tile body over pre's shape; a body
// `Tiles<T>::run(args, e)` covers e < channel_tile_items(args).
struct ChannelTileItem {
  int b;
  int64_t n, c0, i, j, pixel;
};

template <typename T>
BNAO_CELL_HD int64_t channel_tiles(const RoundArgs<T>& a) { return (a.channels + kChannelTile - 1) / kChannelTile; }

template <typename T>
BNAO_CELL_HD int64_t channel_tile_items(const RoundArgs<T>& a) {
  return kNumBranches * a.batch * channel_tiles(a) * a.height * a.width;
}

template <typename T>
BNAO_CELL_HD ChannelTileItem channel_tile_item(const RoundArgs<T>& a, int64_t e) {
  ChannelTileItem t;
  const int64_t plane = a.height * a.width, tiles = channel_tiles(a);
  t.pixel = e % plane;
  e /= plane;
  t.c0 = e % tiles * kChannelTile;
  e /= tiles;
  t.n = e % a.batch;
  t.b = static_cast<int>(e / a.batch);
  t.i = t.pixel / a.width;
  t.j = t.pixel - t.i * a.width;
  return t;
}

// BranchForward over channel tiles: sep convs and the factorized reduce read their C inputs once per
// pixel; other branches compute each channel as BranchForward does.
template <typename T>
struct BranchForwardTiles {
  static BNAO_CELL_HD void run(const RoundArgs<T>& a, int64_t e) {
    using C = Compute<T>;
    const ChannelTileItem t = channel_tile_item(a, e);
    const Branch<T> br = read_branch(a, t.b);
    const int64_t plane = a.height * a.width;
    T* out = a.pre + pre_offset(a, t.b, t.n, 0, t.i, t.j);
    if (br.op != kOpSepConv && br.op != kOpReduce) {
      for (int r = 0; r < kChannelTile && t.c0 + r < a.channels; ++r)
        out[(t.c0 + r) * plane] = branch_value(a, br, t.b, t.n, t.c0 + r, t.i, t.j);
      return;
    }
    const C* weight = a.pw + static_cast<int64_t>(t.b) * a.channels * a.channels;  // pw[b], rows o, columns c
    // The reduce's rows o < C/2 read the input at (2i, 2j), the others at (2i + 1, 2j + 1): reduce_value.
    const bool even_inside = br.op == kOpReduce && inside(br, 2 * t.i, 2 * t.j);
    const bool odd_inside = br.op == kOpReduce && inside(br, 2 * t.i + 1, 2 * t.j + 1);
    C sum[kChannelTile];
    BNAO_UNROLL
    for (int r = 0; r < kChannelTile; ++r) sum[r] = C(0);
    for (int64_t c = 0; c < a.channels; ++c) {
      C even = C(0), odd = C(0);
      if (br.op == kOpSepConv) {
        even = static_cast<C>(a.mid[pre_offset(a, t.b, t.n, c, t.i, t.j)]);
      } else {
        if (even_inside) even = load_input(a, br, t.b, t.n, c, 2 * t.i, 2 * t.j);
        if (odd_inside) odd = load_input(a, br, t.b, t.n, c, 2 * t.i + 1, 2 * t.j + 1);
      }
      BNAO_UNROLL
      for (int r = 0; r < kChannelTile; ++r) {
        const int64_t o = t.c0 + r < a.channels ? t.c0 + r : a.channels - 1;  // past C: computed, not stored
        const bool odd_row = br.op == kOpReduce && reduce_offset(o, a.channels) == 1;
        sum[r] += weight[o * a.channels + c] * (odd_row ? odd : even);
      }
    }
    BNAO_UNROLL
    for (int r = 0; r < kChannelTile; ++r) {
      const int64_t o = t.c0 + r;
      if (o >= a.channels) continue;
      const bool row_inside = br.op == kOpSepConv || (reduce_offset(o, a.channels) == 1 ? odd_inside : even_inside);
      out[o * plane] = row_inside ? sum[r] : C(0);  // reduce_value: zero where its pixel is past the edge
    }
  }
};

// GradMid over channel tiles: grad_mid[b, n, c] = pw[b]^T . grad_total[b, n] for kChannelTile channels c of
// one pixel, each grad_total value read once; branches without a depthwise conv are left untouched.
template <typename T>
struct GradMidTiles {
  static BNAO_CELL_HD void run(const RoundArgs<T>& a, int64_t e) {
    using C = Compute<T>;
    const ChannelTileItem t = channel_tile_item(a, e);
    if (read_branch(a, t.b).op != kOpSepConv) return;
    const C* weight = a.pw + static_cast<int64_t>(t.b) * a.channels * a.channels;
    const T* grad = a.grad_total + pre_offset(a, t.b, t.n, 0, t.i, t.j);
    const int64_t plane = a.height * a.width;
    C sum[kChannelTile];
    BNAO_UNROLL
    for (int r = 0; r < kChannelTile; ++r) sum[r] = C(0);
    for (int64_t o = 0; o < a.channels; ++o) {
      const C g = static_cast<C>(grad[o * plane]);
      BNAO_UNROLL
      for (int r = 0; r < kChannelTile; ++r) {
        const int64_t c = t.c0 + r < a.channels ? t.c0 + r : a.channels - 1;  // past C: computed, not stored
        sum[r] += weight[o * a.channels + c] * g;
      }
    }
    T* out = a.grad_mid + pre_offset(a, t.b, t.n, 0, t.i, t.j);
    BNAO_UNROLL
    for (int r = 0; r < kChannelTile; ++r)
      if (t.c0 + r < a.channels) out[(t.c0 + r) * plane] = sum[r];
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

// The pointwise weight gradient as a multi-sum reduction over chunks of terms: GradPwTerm's outputs, for a
// backend's `reduce_tiled` (the CUDA launcher; the CPU runs GradPwTerm itself). GradPwTerm gives each of the
// 2 C^2 (branch, o, c) outputs its own pass over the terms, so every value of grad_total and of what pw
// multiplied (mid, or the factorized reduce's input) is read C times; here output (branch, 8 x 8 tile of
// (o, c), chunk) reads 8 + 8 values per term (8 + 16 for the reduce: its two halves of o read even and odd
// pixels) and keeps the tile's 64 sums side by side. Threads and chunks as GradDwTiles; `finish` writes
// partial[((b * C + o) * C + c) * chunks + chunk] for the tile's real (o, c).
template <typename T, typename Acc>
struct GradPwTiles {
  static constexpr int kTile = 8;
  static constexpr int kSums = kTile * kTile;
  RoundArgs<T> args;
  Acc* partial;  // [2 * C * C, chunks]
  int64_t chunks;

  static BNAO_CELL_HD int64_t tiles_per_side(const RoundArgs<T>& a) { return (a.channels + kTile - 1) / kTile; }
  // The (branch, o tile, c tile) triples; the launcher runs tiles(args) * chunks outputs.
  static BNAO_CELL_HD int64_t tiles(const RoundArgs<T>& a) {
    return kNumBranches * tiles_per_side(a) * tiles_per_side(a);
  }
  // GradPwTerm's outputs, every one written by the tiles (the launcher checks its count against this).
  static BNAO_CELL_HD int64_t covered_outputs(const RoundArgs<T>& a) {
    return kNumBranches * a.channels * a.channels;
  }

  BNAO_CELL_HD void partial_sums(int64_t o, int64_t thread, int64_t threads, Acc* sums) const {
    using C = Compute<T>;
    const RoundArgs<T>& a = args;
    const int64_t side = tiles_per_side(a), chunk = o % chunks, tile = o / chunks;
    const int b = static_cast<int>(tile / (side * side));
    const int64_t o0 = (tile / side) % side * kTile, c0 = tile % side * kTile;
    BNAO_UNROLL
    for (int q = 0; q < kSums; ++q) sums[q] = Acc(0);
    const Branch<T> br = read_branch(a, b);
    if (br.op != kOpSepConv && br.op != kOpReduce) return;  // GradPwTerm's inactive outputs: zero
    const int64_t plane = a.height * a.width, length = a.batch * plane, half = a.channels / 2;
    for (int64_t index = chunk * threads + thread; index < length; index += chunks * threads) {
      const int64_t n = index / plane, pixel = index - n * plane, i = pixel / a.width, j = pixel - i * a.width;
      C grad[kTile], value[kTile], odd[kTile];  // odd: the reduce's odd-pixel input (rows o >= C/2)
      // GradPwTerm::term of the reduce is exactly zero where its pixel is past the edge (not grad * 0, which
      // is NaN for a non-finite grad): the pixel's two positions, the same for every (o, c).
      const bool even_in = br.op == kOpSepConv || inside(br, 2 * i, 2 * j);
      const bool odd_in = br.op == kOpReduce && inside(br, 2 * i + 1, 2 * j + 1);
      BNAO_UNROLL
      for (int r = 0; r < kTile; ++r) {
        const bool real = o0 + r < a.channels;
        grad[r] = real ? static_cast<C>(a.grad_total[pre_offset(a, b, n, o0 + r, i, j)]) : C(0);
      }
      BNAO_UNROLL
      for (int q = 0; q < kTile; ++q) {
        const int64_t c = c0 + q;
        value[q] = odd[q] = C(0);
        if (c >= a.channels) continue;
        if (br.op == kOpSepConv) {
          value[q] = static_cast<C>(a.mid[pre_offset(a, b, n, c, i, j)]);
        } else {  // the reduce: the input at (2i + offset, 2j + offset)
          if (even_in) value[q] = load_input(a, br, b, n, c, 2 * i, 2 * j);
          if (odd_in) odd[q] = load_input(a, br, b, n, c, 2 * i + 1, 2 * j + 1);
        }
      }
      BNAO_UNROLL
      for (int r = 0; r < kTile; ++r) {
        const bool odd_row = br.op == kOpReduce && o0 + r >= half;
        if (!(odd_row ? odd_in : even_in)) continue;
        BNAO_UNROLL
        for (int q = 0; q < kTile; ++q)
          sums[r * kTile + q] += static_cast<Acc>(grad[r] * (odd_row ? odd[q] : value[q]));
      }
    }
  }

  BNAO_CELL_HD void finish(int64_t o, const Acc* sums) const {
    const RoundArgs<T>& a = args;
    const int64_t side = tiles_per_side(a), chunk = o % chunks, tile = o / chunks;
    const int64_t b = tile / (side * side), o0 = (tile / side) % side * kTile, c0 = tile % side * kTile;
    BNAO_UNROLL
    for (int r = 0; r < kTile; ++r) {
      BNAO_UNROLL
      for (int q = 0; q < kTile; ++q) {
        if (o0 + r < a.channels && c0 + q < a.channels)
          partial[((b * a.channels + o0 + r) * a.channels + c0 + q) * chunks + chunk] = sums[r * kTile + q];
      }
    }
  }
};

// The depthwise weight gradient as a multi-sum reduction over chunks of terms: GradDwTerm's outputs, for a
// backend's `reduce_tiled` (the CUDA launcher; the CPU runs GradDwTerm itself). GradDwTerm gives each of the
// 2 C x 49 (branch, channel, tap) outputs its own pass over the terms, so every tap re-reads grad_mid and
// the input (49 reads of each value, from L2 on a GPU); here output o = (branch, channel, chunk) reads each
// term's grad_mid value and input window once and keeps the 49 taps' sums side by side (kSums). Thread
// `thread` of `threads` takes the terms chunk * threads + thread, + chunks * threads, ... (as
// cell/reduction_split.h). `finish` writes the chunk's sums to partial[(bc * 49 + tap) * chunks + chunk],
// the layout whose chunk sums the launcher's second pass hands to GradDwTerm::finish, in chunk order.
template <typename T, typename Acc>
struct GradDwTiles {
  static constexpr int kSums = kSlab;
  RoundArgs<T> args;
  Acc* partial;  // [2 * C * 49, chunks]
  int64_t chunks;

  // The (branch, channel) pairs; the launcher runs tiles(args) * chunks outputs.
  static BNAO_CELL_HD int64_t tiles(const RoundArgs<T>& a) { return kNumBranches * a.channels; }
  // GradDwTerm's outputs, every one written by the tiles (the launcher checks its count against this).
  static BNAO_CELL_HD int64_t covered_outputs(const RoundArgs<T>& a) { return kNumBranches * a.channels * kSlab; }

  BNAO_CELL_HD void partial_sums(int64_t o, int64_t thread, int64_t threads, Acc* sums) const {
    const RoundArgs<T>& a = args;
    const int64_t chunk = o % chunks, bc = o / chunks, c = bc % a.channels;
    const int b = static_cast<int>(bc / a.channels);
    BNAO_UNROLL
    for (int tap = 0; tap < kSums; ++tap) sums[tap] = Acc(0);
    const Branch<T> br = read_branch(a, b);
    if (br.op != kOpSepConv) return;  // GradDwTerm's inactive outputs: zero
    // The tap loops unrolled to the branch's kernel size (the sums stay in registers, and a 3 x 3 conv does
    // not issue the 40 other taps of the 7 x 7 slab); any other size takes the whole slab, with the taps past
    // its k x k corner adding nothing. The same sums in the same order whatever the unrolling.
    switch (br.kernel) {
      case 3:
        add_taps<3>(br, b, c, chunk, thread, threads, sums);
        break;
      case 5:
        add_taps<5>(br, b, c, chunk, thread, threads, sums);
        break;
      default:
        add_taps<kMaxKernel>(br, b, c, chunk, thread, threads, sums);
        break;
    }
  }

  // Thread `thread`'s terms of chunk `chunk` added into the taps (kh, kw) < (K, K) of `sums`.
  template <int K>
  BNAO_CELL_HD void add_taps(const Branch<T>& br, int b, int64_t c, int64_t chunk, int64_t thread, int64_t threads,
                             Acc* sums) const {
    using C = Compute<T>;
    const RoundArgs<T>& a = args;
    const int k = br.kernel, d = br.dilation, s = br.stride;
    const int64_t pad = static_cast<int64_t>(d) * (k / 2), plane = a.height * a.width, length = a.batch * plane;
    for (int64_t index = chunk * threads + thread; index < length; index += chunks * threads) {
      const int64_t n = index / plane, pixel = index - n * plane, i = pixel / a.width, j = pixel - i * a.width;
      const C grad = static_cast<C>(a.grad_mid[pre_offset(a, b, n, c, i, j)]);
      const ChannelInput<T> in = channel_input(a, br, b, n, c);
      BNAO_UNROLL
      for (int kh = 0; kh < K; ++kh) {
        const int64_t y = i * s - pad + kh * d;
        BNAO_UNROLL
        for (int kw = 0; kw < K; ++kw) {
          const int64_t x = j * s - pad + kw * d;
          // GradDwTerm::term's value: grad_mid times the ReLU of the (normalised) input at the tap.
          if (kh < k && kw < k && in.inside(y, x))
            sums[kh * kMaxKernel + kw] += static_cast<Acc>(grad * relu(in.at(y, x)));
        }
      }
    }
  }

  BNAO_CELL_HD void finish(int64_t o, const Acc* sums) const {
    const int64_t chunk = o % chunks, bc = o / chunks;
    BNAO_UNROLL
    for (int tap = 0; tap < kSums; ++tap) partial[(bc * kSlab + tap) * chunks + chunk] = sums[tap];
  }
};

// Output index i of a tap of a strided window reaching input row y through tap offset `reach`
// (i * stride + reach == y), or -1 when none.
// Strides are 1 or 2 (read_branch clamps them), so no division is needed.
BNAO_CELL_HD int64_t strided_source(int64_t y, int64_t reach, int stride, int64_t size) {
  const int64_t scaled = y - reach;
  if (scaled < 0 || (stride == 2 && (scaled & 1))) return -1;
  const int64_t i = stride == 2 ? scaled >> 1 : scaled;
  return i < size ? i : -1;
}

template <typename T>
BNAO_CELL_HD Compute<T> depthwise_input_grad(const RoundArgs<T>& a, const Branch<T>& br, int b, int64_t n, int64_t c,
                                             int64_t y, int64_t x) {
  using C = Compute<T>;
  if (!(load_input(a, br, b, n, c, y, x) > C(0))) return C(0);  // ReLU passes no gradient at <= 0
  const int k = br.kernel, d = br.dilation, s = br.stride;
  const int64_t pad = static_cast<int64_t>(d) * (k / 2);
  const C* weight = a.dw + (static_cast<int64_t>(b) * a.channels + c) * kSlab;
  const T* grad = a.grad_mid + pre_offset(a, b, n, c, 0, 0);
  C sum = C(0);
  if (s == 1) {
    const int64_t bottom = y + pad, right = x + pad, span = static_cast<int64_t>(k - 1) * d;
    if (bottom - span >= 0 && right - span >= 0 && bottom < a.height && right < a.width) {
      // Interior pixel at stride 1: every tap reaches an output, no checks needed.
      for (int kh = 0; kh < k; ++kh)
        for (int kw = 0; kw < k; ++kw)
          sum += weight[kh * kMaxKernel + kw] * static_cast<C>(grad[(bottom - kh * d) * a.width + right - kw * d]);
      return sum;
    }
  }
  for (int kh = 0; kh < k; ++kh) {
    const int64_t i = strided_source(y, kh * d - pad, s, a.height);
    if (i < 0) continue;
    for (int kw = 0; kw < k; ++kw) {
      const int64_t j = strided_source(x, kw * d - pad, s, a.width);
      if (j >= 0) sum += weight[kh * kMaxKernel + kw] * static_cast<C>(grad[i * a.width + j]);
    }
  }
  return sum;
}

// Adds the depthwise input gradients of columns [begin, end) of input row y (stride 1) to out:
// interior columns tap-outer, column-inner (the sums of depthwise_input_grad, in its tap order),
// the others through depthwise_input_grad.
template <typename T>
BNAO_CELL_HD void add_depthwise_input_grad_columns(const RoundArgs<T>& a, const Branch<T>& br, int b, int64_t n,
                                                   int64_t c, int64_t y, int64_t begin, int64_t end, T* out) {
  const int k = br.kernel, d = br.dilation;
  const int64_t pad = static_cast<int64_t>(d) * (k / 2), span = static_cast<int64_t>(k - 1) * d;
  const int64_t bottom = y + pad;
  int64_t first = span - pad, last = a.width - 1 - pad;  // interior: x + pad - span >= 0, x + pad < Wo
  if (br.stride != 1 || bottom - span < 0 || bottom >= a.height || last < first) first = end, last = end - 1;
  first = first < begin ? begin : (first > end ? end : first);
  last = last >= end ? end - 1 : last;
  using C = Compute<T>;
  for (int64_t x = begin; x < first; ++x) add_to(out[x], depthwise_input_grad(a, br, b, n, c, y, x));
  const C* weight = a.dw + (static_cast<int64_t>(b) * a.channels + c) * kSlab;
  const T* grad = a.grad_mid + pre_offset(a, b, n, c, 0, 0);
  const ChannelInput<T> in = channel_input(a, br, b, n, c);
  constexpr int64_t kChunk = 64;
  for (int64_t start = first; start <= last; start += kChunk) {
    const int64_t count = last + 1 - start < kChunk ? last + 1 - start : kChunk;
    C sum[kChunk];
    for (int64_t q = 0; q < count; ++q) sum[q] = C(0);
    for (int kh = 0; kh < k; ++kh)
      for (int kw = 0; kw < k; ++kw) {
        const C w = weight[kh * kMaxKernel + kw];
        const T* row = grad + (bottom - kh * d) * a.width + start + pad - kw * d;
        for (int64_t q = 0; q < count; ++q) sum[q] += w * static_cast<C>(row[q]);
      }
    for (int64_t q = 0; q < count; ++q) add_to(out[start + q], in.at(y, start + q) > C(0) ? sum[q] : C(0));
  }
  for (int64_t x = (last + 1 > first ? last + 1 : first); x < end; ++x)
    add_to(out[x], depthwise_input_grad(a, br, b, n, c, y, x));
}

template <typename T>
BNAO_CELL_HD Compute<T> reduce_input_grad(const RoundArgs<T>& a, int b, int64_t n, int64_t c, int64_t y, int64_t x) {
  using C = Compute<T>;
  // Even pixels feed rows :C/2, odd pixels rows C/2:; mixed pixels are never read.
  if ((y & 1) != (x & 1)) return C(0);
  const int64_t offset = y & 1, i = y >> 1, j = x >> 1;
  if (i >= a.height || j >= a.width) return C(0);
  const int64_t begin = offset ? a.channels / 2 : 0, end = offset ? a.channels : a.channels / 2;
  const C* column = a.pw + static_cast<int64_t>(b) * a.channels * a.channels + c;
  const T* grad = a.grad_total + pre_offset(a, b, n, 0, i, j);
  const int64_t plane = a.height * a.width;
  C sum = C(0);
  for (int64_t o = begin; o < end; ++o) sum += column[o * a.channels] * static_cast<C>(grad[o * plane]);
  return sum;
}

template <typename T>
BNAO_CELL_HD Compute<T> pool_input_grad(const RoundArgs<T>& a, const Branch<T>& br, int b, int64_t n, int64_t c,
                                        int64_t y, int64_t x) {
  using C = Compute<T>;
  C sum = C(0);
  for (int dy = 0; dy < 3; ++dy) {
    const int64_t i = strided_source(y, dy - 1, br.stride, a.height);
    if (i < 0) continue;
    for (int dx = 0; dx < 3; ++dx) {
      const int64_t j = strided_source(x, dx - 1, br.stride, a.width);
      if (j < 0) continue;
      const C grad = static_cast<C>(a.grad_total[pre_offset(a, b, n, c, i, j)]);
      if (br.op == kOpAvgPool) {
        const Window rows = pool_window(i, br.stride, br.in_height), cols = pool_window(j, br.stride, br.in_width);
        sum += grad / static_cast<C>((rows.end - rows.begin) * (cols.end - cols.begin));
      } else if (static_cast<C>(a.mid[pre_offset(a, b, n, c, i, j)]) == max_position_code(br, i, j, y, x)) {
        sum += grad;  // only the window's first maximum gets it (RecomputeForward found it)
      }
    }
  }
  return sum;
}

// Adds the max-pool input gradients of columns [begin, end) of input row y to out. At stride 1
// the pixels whose nine candidate windows all exist run column-inner (pool_input_grad's sums,
// in its order); the others, and stride 2, through pool_input_grad.
template <typename T>
BNAO_CELL_HD void add_max_pool_input_grad_columns(const RoundArgs<T>& a, const Branch<T>& br, int b, int64_t n,
                                                  int64_t c, int64_t y, int64_t begin, int64_t end, T* out) {
  int64_t first = 1, last = a.width - 2;  // interior: x - 1 >= 0 and x + 1 < Wo
  if (br.stride != 1 || y < 1 || y + 1 >= a.height || last < first) first = end, last = end - 1;
  first = first < begin ? begin : (first > end ? end : first);
  last = last >= end ? end - 1 : last;
  using C = Compute<T>;
  for (int64_t x = begin; x < first; ++x) add_to(out[x], pool_input_grad(a, br, b, n, c, y, x));
  const T* grad = a.grad_total + pre_offset(a, b, n, c, 0, 0);
  const T* codes = a.mid + pre_offset(a, b, n, c, 0, 0);
  constexpr int64_t kChunk = 64;
  for (int64_t start = first; start <= last; start += kChunk) {
    const int64_t count = last + 1 - start < kChunk ? last + 1 - start : kChunk;
    C sum[kChunk];
    for (int64_t q = 0; q < count; ++q) sum[q] = C(0);
    for (int dy = 0; dy < 3; ++dy)
      for (int dx = 0; dx < 3; ++dx) {
        const int64_t offset = (y + 1 - dy) * a.width + start + 1 - dx;  // output (i, j) of window tap (dy, dx)
        const C code = static_cast<C>(dy * 3 + dx);
        for (int64_t q = 0; q < count; ++q)
          sum[q] += static_cast<C>(codes[offset + q]) == code ? static_cast<C>(grad[offset + q]) : C(0);
      }
    for (int64_t q = 0; q < count; ++q) add_to(out[start + q], sum[q]);
  }
  for (int64_t x = (last + 1 > first ? last + 1 : first); x < end; ++x)
    add_to(out[x], pool_input_grad(a, br, b, n, c, y, x));
}

// Gradient of the branch's (normalised) input at an in-bounds pixel (y, x).
template <typename T>
BNAO_CELL_HD Compute<T> branch_input_grad(const RoundArgs<T>& a, const Branch<T>& br, int b, int64_t n, int64_t c,
                                          int64_t y, int64_t x) {
  using C = Compute<T>;
  switch (br.op) {
    case kOpSepConv:
      return depthwise_input_grad(a, br, b, n, c, y, x);
    case kOpReduce:
      return reduce_input_grad(a, b, n, c, y, x);
    case kOpAvgPool:
    case kOpMaxPool:
      return pool_input_grad(a, br, b, n, c, y, x);
    case kOpCopy:
      return y < a.height && x < a.width ? static_cast<C>(a.grad_total[pre_offset(a, b, n, c, y, x)]) : C(0);
    default:
      return C(0);
  }
}

// Round 1: gradient of source a.source_index, summed over the branches that read it (zero when none).
template <typename T>
struct SourceGrad {
  // A row (n, c, y) of source a.source_index.
  struct Row {
    int64_t n, c, y, offset;
    Branch<T> br[kNumBranches];
  };
  static BNAO_CELL_HD Row row(const RoundArgs<T>& a, int64_t index) {
    Row r;
    r.offset = index * a.source_width[a.source_index];
    r.y = index % a.source_height[a.source_index];
    index /= a.source_height[a.source_index];
    r.c = index % a.channels;
    r.n = index / a.channels;
    for (int b = 0; b < kNumBranches; ++b) r.br[b] = read_branch(a, b);
    return r;
  }
  // Whether this source's gradient is added to its buffer (else the buffer is overwritten).
  static BNAO_CELL_HD bool adds(const RoundArgs<T>& a) {
    return a.accumulate && a.source_index >= a.overwrite_below;
  }
  // Adding to a source no branch reads adds zero: leave its buffer untouched (no memory traffic).
  static BNAO_CELL_HD bool skip(const RoundArgs<T>& a, const Row& r) {
    return adds(a) && r.br[0].source != a.source_index && r.br[1].source != a.source_index;
  }
  static BNAO_CELL_HD void run(const RoundArgs<T>& a, const Row& r, int64_t x) {
    if (skip(a, r)) return;
    Compute<T> sum = adds(a) ? static_cast<Compute<T>>(a.grad_source[r.offset + x]) : Compute<T>(0);
    for (int b = 0; b < kNumBranches; ++b) {
      if (r.br[b].source == a.source_index) sum += branch_input_grad(a, r.br[b], b, r.n, r.c, r.y, x);
    }
    a.grad_source[r.offset + x] = sum;
  }
  // Same sums as `run`, branch by branch over the whole row (start + branch 0 + branch 1, as in run;
  // start is 0, or the value already there when accumulating).
  static BNAO_CELL_HD void run_columns(const RoundArgs<T>& a, const Row& r, int64_t begin, int64_t end) {
    if (skip(a, r)) return;
    T* out = a.grad_source + r.offset;
    if (!adds(a)) {
      for (int64_t x = begin; x < end; ++x) out[x] = T(0);
    }
    for (int b = 0; b < kNumBranches; ++b) {
      const Branch<T>& br = r.br[b];
      if (br.source != a.source_index) continue;
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

// ------------------------------------------------------------------ phase sequences (host)
// `launcher.for_each<Body>(rows, columns, args)` runs Body<T> on every element of a
// [rows, columns] tensor; `launcher.reduce<Term>(outputs, args)` runs Term<T> for every output
// (its terms over every (n, i, j) of pre's shape); `launcher.reduce_tiled<Term, Tiles>(outputs, args)`
// gives the same outputs, which a backend may compute through the multi-sum reduction Tiles<T, Acc>
// (the CUDA launcher does; the CPU runs Term); `launcher.for_each_tiled<Body, Tiles>(rows, columns, args)`
// likewise for an element body and its channel-tile form.
template <typename Launcher, typename T>
void run_forward(const Launcher& launcher, const RoundArgs<T>& a) {
  const int64_t rows = kNumBranches * a.batch * a.channels * a.height;
  launcher.template for_each<DepthwiseForward>(rows, a.width, a);
  launcher.template for_each_tiled<BranchForward, BranchForwardTiles>(rows, a.width, a);
  launcher.template reduce<MeanTerm>(kNumBranches * a.channels, a);
  launcher.template reduce<InvstdTerm>(kNumBranches * a.channels, a);
}

// `grad_sources[s]` is where source s's gradient goes (round 2: one tensor shaped like pre1).
template <typename Launcher, typename T>
void run_backward(const Launcher& launcher, RoundArgs<T> a, T* const* grad_sources) {
  const int64_t rows = kNumBranches * a.batch * a.channels * a.height;
  launcher.template for_each<GradTotal>(rows, a.width, a);
  launcher.template for_each<RecomputeForward>(rows, a.width, a);
  launcher.template for_each_tiled<GradMid, GradMidTiles>(rows, a.width, a);
  launcher.template reduce_tiled<GradPwTerm, GradPwTiles>(kNumBranches * a.channels * a.channels, a);
  launcher.template reduce_tiled<GradDwTerm, GradDwTiles>(kNumBranches * a.channels * kSlab, a);
  if (a.round == 1) {
    for (int s = 0; s < a.num_sources; ++s) {
      a.source_index = s;
      a.grad_source = grad_sources[s];
      launcher.template for_each<SourceGrad>(a.batch * a.channels * a.source_height[s], a.source_width[s], a);
    }
    return;
  }
  a.source_index = 0;
  a.grad_source = grad_sources[0];
  launcher.template for_each<NormInputGrad>(rows, a.width, a);
  launcher.template reduce<NormShiftTerm>(kNumBranches * a.channels, a);
  launcher.template reduce<NormScaleTerm>(kNumBranches * a.channels, a);
  launcher.template for_each<ScaleNormGrad>(rows, a.width, a);
}

}  // namespace cell
}  // namespace bnao
