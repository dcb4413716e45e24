// RoundArgs (everything a branch_round body reads or writes), the branch decoded from its code row, and
// the per-element forward values (depthwise, pointwise, factorized reduce, pooling): the base of the
// bodies in round_forward.h, round_input_grad.h, round_backward.h and round_tiles.h (overview:
// cell/branch_round.h).
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
  T* grad_source;  // round 2: the gradient of pre1 being written
  // Round 1: where each source's gradient goes; a SourceGrad launch covers the sources source_index ..
  // source_index + source_count - 1, which have one shape (all of a normal cell's; a reduction cell's inputs,
  // then its nodes), so a node's source gradients take one launch (two in reduction cells), not one each.
  T* grad_sources[kMaxSources];
  int source_index;
  int source_count;
  bool accumulate;  // round 1: add the source gradients to grad_sources instead of overwriting them
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
// The space's depthwise shapes as compile-time constants, for the interior loops that unroll over the taps:
// calls fn.template operator()<K, D>() and returns true for (k, d) in {3, 5, 7} x {1, 2}; returns false
// without calling it for any other shape, which takes the generic loop.
template <typename Fn>
BNAO_CELL_HD bool with_constant_kernel(int k, int d, Fn&& fn) {
  switch (k * 4 + d) {
    case 3 * 4 + 1: fn.template operator()<3, 1>(); return true;
    case 5 * 4 + 1: fn.template operator()<5, 1>(); return true;
    case 7 * 4 + 1: fn.template operator()<7, 1>(); return true;
    case 3 * 4 + 2: fn.template operator()<3, 2>(); return true;
    case 5 * 4 + 2: fn.template operator()<5, 2>(); return true;
    case 7 * 4 + 2: fn.template operator()<7, 2>(); return true;
    default: return false;
  }
}

// depthwise_value's sum over an interior window (every tap inside) with the kernel size and dilation as
// constants: the tap loops unroll into loads at fixed offsets from one row pointer, instead of a 64-bit index
// computation, a weight load and a loop test per tap. The same products added in the same order (kh outer, kw
// inner), so the same bits as the generic loop.
template <int K, int D, bool Normalize, typename T>
BNAO_CELL_HD Compute<T> depthwise_interior(const Compute<T>* weight, const ChannelInput<T>& in, int64_t top,
                                           int64_t left) {
  using C = Compute<T>;
  const T* origin = in.plane + top * in.width + left;
  C sum = C(0);
  BNAO_UNROLL
  for (int kh = 0; kh < K; ++kh) {
    const T* row = origin + static_cast<int64_t>(kh * D) * in.width;
    BNAO_UNROLL
    for (int kw = 0; kw < K; ++kw) {
      const C raw = static_cast<C>(row[kw * D]);
      sum += weight[kh * kMaxKernel + kw] * relu(Normalize ? (raw - in.mean) * in.factor + in.beta : raw);
    }
  }
  return sum;
}

// depthwise_interior for kDepthwiseGroup outputs of one row side by side (columns left, left + S, ...): each
// window row's inputs loaded (and ReLU'd) once for all of them and each weight once, with every output's
// products added in depthwise_interior's order (kh outer, kw inner), so the same bits. A GPU thread computes a
// group: 8 + 25 loads for four 5x5 outputs at stride 1 instead of 4 x 50.
constexpr int kDepthwiseGroup = 4;

template <int K, int D, int S, bool Normalize, typename T>
BNAO_CELL_HD void depthwise_interior_group(const Compute<T>* weight, const ChannelInput<T>& in, int64_t top,
                                           int64_t left, Compute<T>* sums) {
  using C = Compute<T>;
  constexpr int kSpan = (kDepthwiseGroup - 1) * S + (K - 1) * D + 1;  // inputs a window row of the group reads
  const T* origin = in.plane + top * in.width + left;
  BNAO_UNROLL
  for (int q = 0; q < kDepthwiseGroup; ++q) sums[q] = C(0);
  BNAO_UNROLL
  for (int kh = 0; kh < K; ++kh) {
    const T* row = origin + static_cast<int64_t>(kh * D) * in.width;
    C x[kSpan];
    BNAO_UNROLL
    for (int m = 0; m < kSpan; ++m) {
      const C raw = static_cast<C>(row[m]);
      x[m] = relu(Normalize ? (raw - in.mean) * in.factor + in.beta : raw);
    }
    BNAO_UNROLL
    for (int kw = 0; kw < K; ++kw) {
      const C w = weight[kh * kMaxKernel + kw];
      BNAO_UNROLL
      for (int q = 0; q < kDepthwiseGroup; ++q) sums[q] += w * x[q * S + kw * D];
    }
  }
}

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
    // Interior pixel (most of them): no bounds checks in the tap loop, and the space's kernels unrolled.
    // (Round 2's normalisation is a template argument too: it is uniform over the branch.)
    const bool fixed = with_constant_kernel(k, d, [&]<int K, int D>() {
      sum = in.normalize ? depthwise_interior<K, D, true>(weight, in, top, left)
                         : depthwise_interior<K, D, false>(weight, in, top, left);
    });
    if (fixed) return sum;
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

// Depthwise results of `count` (<= kDepthwiseGroup) consecutive columns j0, j0 + 1, ... of a sep-conv row into
// out[j0], out[j0 + 1], ...: a whole group of interior columns of the space's shapes through
// depthwise_interior_group, any other group column by column (depthwise_value); each column's value is the
// same either way. The CUDA launcher's form of a row's depthwise results (a thread per group).
template <typename T>
BNAO_CELL_HD void depthwise_group(const RoundArgs<T>& a, const Branch<T>& br, int b, int64_t n, int64_t c, int64_t i,
                                  int64_t j0, int count, T* out) {
  using C = Compute<T>;
  const int k = br.kernel, d = br.dilation, s = br.stride;
  const int64_t pad = static_cast<int64_t>(d) * (k / 2), span = static_cast<int64_t>(k - 1) * d;
  const int64_t top = i * s - pad, left = j0 * s - pad, last = (j0 + kDepthwiseGroup - 1) * s - pad + span;
  bool done = false;
  if (count == kDepthwiseGroup && (s == 1 || s == 2) && top >= 0 && left >= 0 && top + span < br.in_height &&
      last < br.in_width) {
    const C* weight = a.dw + (static_cast<int64_t>(b) * a.channels + c) * kSlab;
    const ChannelInput<T> in = channel_input(a, br, b, n, c);
    C sums[kDepthwiseGroup];
    done = with_constant_kernel(k, d, [&]<int K, int D>() {
      if (s == 1) {
        in.normalize ? depthwise_interior_group<K, D, 1, true>(weight, in, top, left, sums)
                     : depthwise_interior_group<K, D, 1, false>(weight, in, top, left, sums);
      } else {
        in.normalize ? depthwise_interior_group<K, D, 2, true>(weight, in, top, left, sums)
                     : depthwise_interior_group<K, D, 2, false>(weight, in, top, left, sums);
      }
    });
    if (done) {
      BNAO_UNROLL
      for (int q = 0; q < kDepthwiseGroup; ++q) out[j0 + q] = sums[q];
    }
  }
  if (!done) {
    for (int q = 0; q < count; ++q) out[j0 + q] = depthwise_value(a, br, b, n, c, i, j0 + q);
  }
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

}  // namespace cell
}  // namespace bnao
