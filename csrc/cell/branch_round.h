// Kernel bodies of bnao::branch_round and bnao::branch_round_backward, shared
// by the CPU kernel (cpu/branch_round_cpu.cpp, at::parallel_for) and the CUDA
// kernel (cuda/branch_round_cuda.cu, a grid). Semantics: csrc/cell/DESIGN.md,
// "branch_round", defined by bnao/ops/fused/reference.py::branch_round_reference.
//
// Two kinds of bodies, both functions of (arguments, work-item index):
//   * elementwise bodies (`struct X { static void run(const RoundArgs<T>&, int64_t index); }`),
//     one work item per element of a [2, N, C, Ho, Wo] (or source-shaped) tensor, writing only
//     that element, so they need no atomics;
//   * reduction terms (`prepare`, `term`, `finish`): output `o` is the sum over `k < length` of
//     `term(ctx, k)`. The CPU launcher adds the terms of an output in order on one thread; the
//     CUDA launcher runs one block per output with a fixed-shape tree. Both are deterministic.
// The phase sequences (run_forward / run_backward) are written once here, against a launcher
// that provides `for_each<Body>(count, args)` and `reduce<Term>(outputs, length, args)`.
//
// The branch code is device data: it is read inside the bodies. Every read of an activation is
// bounds-checked against the source's real shape, so a corrupt code cannot read out of bounds
// (it can only give wrong numbers); the CPU op validates the code before running.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

#include "cell/cell_code.h"

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
template <typename T>
struct RoundArgs {
  // Sources: round 1 the states the node may read ([N, C, H_s, W_s] each); round 2 one tensor,
  // pre1 [2, N, C, Ho, Wo] (source_height/width then hold Ho, Wo).
  const T* sources[kMaxSources];
  int64_t source_height[kMaxSources];
  int64_t source_width[kMaxSources];
  int num_sources;
  const int32_t* code;  // [2, kNumFields]
  int round;            // 1 or 2
  int64_t batch, channels, height, width;  // N, C, Ho, Wo of pre
  const T* dw;  // [2, C, 7, 7]
  const T* pw;  // [2, C, C]
  // Round 2's prologue: round 1's (mean, invstd, gamma, beta), [2, C] each; null in round 1.
  const T* in_mean;
  const T* in_invstd;
  const T* in_gamma;
  const T* in_beta;
  double eps;
  // Forward results (read again by the backward).
  T* pre;     // [2, N, C, Ho, Wo]
  T* mid;     // [2, N, C, Ho, Wo] scratch: depthwise results of sep-conv branches
  T* mean;    // [2, C]
  T* invstd;  // [2, C]
  // Backward.
  const T* grad_pre;     // [2, N, C, Ho, Wo]
  const T* grad_mean;    // [2, C]
  const T* grad_invstd;  // [2, C]
  T* grad_total;         // [2, N, C, Ho, Wo] scratch: gradient of pre including the statistics'
  T* grad_mid;           // [2, N, C, Ho, Wo] scratch: gradient of mid
  T* grad_dw;            // [2, C, 7, 7]
  T* grad_pw;            // [2, C, C]
  T* grad_in_mean;       // [2, C] (round 2)
  T* grad_in_invstd;
  T* grad_in_gamma;
  T* grad_in_beta;
  T* grad_source;    // the source gradient being written (one launch per source)
  int source_index;  // which source grad_source belongs to
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

// Position of an element of a [2, N, C, H, W] tensor.
struct Position {
  int b;
  int64_t n, c, i, j;
};

BNAO_CELL_HD Position split_index(int64_t index, int64_t batch, int64_t channels, int64_t height, int64_t width) {
  Position p;
  p.j = index % width;
  index /= width;
  p.i = index % height;
  index /= height;
  p.c = index % channels;
  index /= channels;
  p.n = index % batch;
  p.b = static_cast<int>(index / batch);
  return p;
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
BNAO_CELL_HD T load_input(const RoundArgs<T>& a, const Branch<T>& br, int b, int64_t n, int64_t c, int64_t y,
                          int64_t x) {
  T value = br.input[((n * a.channels + c) * br.in_height + y) * br.in_width + x];
  if (br.normalize) {
    const int64_t bc = b * a.channels + c;
    // Same association as the reference: (x - mean) * (invstd * gamma) + beta.
    value = (value - a.in_mean[bc]) * (a.in_invstd[bc] * a.in_gamma[bc]) + a.in_beta[bc];
  }
  return value;
}

// ReLU that keeps NaN (like torch.relu).
template <typename T>
BNAO_CELL_HD T relu(T value) {
  return value < T(0) ? T(0) : value;
}

// Input pixel of a factorized-reduce output row: rows :C/2 read even pixels, the others odd ones.
BNAO_CELL_HD int64_t reduce_offset(int64_t out_channel, int64_t channels) { return out_channel < channels / 2 ? 0 : 1; }

// ------------------------------------------------------------------ forward values
template <typename T>
BNAO_CELL_HD T depthwise_value(const RoundArgs<T>& a, const Branch<T>& br, int b, int64_t n, int64_t c, int64_t i,
                               int64_t j) {
  const int k = br.kernel, d = br.dilation, s = br.stride;
  const int64_t pad = static_cast<int64_t>(d) * (k / 2);
  const T* weight = a.dw + (static_cast<int64_t>(b) * a.channels + c) * kSlab;
  T sum = T(0);
  for (int kh = 0; kh < k; ++kh) {
    const int64_t y = i * s - pad + kh * d;
    for (int kw = 0; kw < k; ++kw) {
      const int64_t x = j * s - pad + kw * d;
      if (inside(br, y, x)) sum += weight[kh * kMaxKernel + kw] * relu(load_input(a, br, b, n, c, y, x));
    }
  }
  return sum;
}

template <typename T>
BNAO_CELL_HD T pointwise_value(const RoundArgs<T>& a, int b, int64_t n, int64_t o, int64_t i, int64_t j) {
  const T* row = a.pw + (static_cast<int64_t>(b) * a.channels + o) * a.channels;
  const int64_t plane = a.height * a.width;
  const T* column = a.mid + pre_offset(a, b, n, 0, i, j);
  T sum = T(0);
  for (int64_t c = 0; c < a.channels; ++c) sum += row[c] * column[c * plane];
  return sum;
}

template <typename T>
BNAO_CELL_HD T reduce_value(const RoundArgs<T>& a, const Branch<T>& br, int b, int64_t n, int64_t o, int64_t i,
                            int64_t j) {
  const int64_t offset = reduce_offset(o, a.channels);
  const int64_t y = 2 * i + offset, x = 2 * j + offset;
  if (!inside(br, y, x)) return T(0);  // odd pixels past the edge read zero padding
  const T* row = a.pw + (static_cast<int64_t>(b) * a.channels + o) * a.channels;
  T sum = T(0);
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
BNAO_CELL_HD T avg_pool_value(const RoundArgs<T>& a, const Branch<T>& br, int b, int64_t n, int64_t c, int64_t i,
                              int64_t j) {
  const Window rows = pool_window(i, br.stride, br.in_height), cols = pool_window(j, br.stride, br.in_width);
  T sum = T(0);
  for (int64_t y = rows.begin; y < rows.end; ++y)
    for (int64_t x = cols.begin; x < cols.end; ++x) sum += load_input(a, br, b, n, c, y, x);
  const int64_t count = (rows.end - rows.begin) * (cols.end - cols.begin);  // count_include_pad=False
  return count > 0 ? sum / static_cast<T>(count) : T(0);
}

// Max of a 3x3 window and where it is: the first maximum in row-major order (as PyTorch), a NaN
// winning like in PyTorch's CPU kernel.
template <typename T>
struct MaxAt {
  T value;
  int64_t y, x;
};

template <typename T>
BNAO_CELL_HD MaxAt<T> max_pool_at(const RoundArgs<T>& a, const Branch<T>& br, int b, int64_t n, int64_t c, int64_t i,
                                  int64_t j) {
  const Window rows = pool_window(i, br.stride, br.in_height), cols = pool_window(j, br.stride, br.in_width);
  MaxAt<T> best;
  best.value = -std::numeric_limits<T>::infinity();
  best.y = rows.begin;
  best.x = cols.begin;
  for (int64_t y = rows.begin; y < rows.end; ++y)
    for (int64_t x = cols.begin; x < cols.end; ++x) {
      const T value = load_input(a, br, b, n, c, y, x);
      if (value > best.value || value != value) {
        best.value = value;
        best.y = y;
        best.x = x;
      }
    }
  return best;
}

// pre[b, n, c, i, j] of a branch whose depthwise results (sep convs) are in a.mid.
template <typename T>
BNAO_CELL_HD T branch_value(const RoundArgs<T>& a, const Branch<T>& br, int b, int64_t n, int64_t c, int64_t i,
                            int64_t j) {
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
      return inside(br, i, j) ? load_input(a, br, b, n, c, i, j) : T(0);
    default:
      return T(0);
  }
}

// ------------------------------------------------------------------ forward bodies
template <typename T>
struct DepthwiseForward {
  static BNAO_CELL_HD void run(const RoundArgs<T>& a, int64_t index) {
    const Position p = split_index(index, a.batch, a.channels, a.height, a.width);
    const Branch<T> br = read_branch(a, p.b);
    if (br.op == kOpSepConv) a.mid[index] = depthwise_value(a, br, p.b, p.n, p.c, p.i, p.j);
  }
};

template <typename T>
struct BranchForward {
  static BNAO_CELL_HD void run(const RoundArgs<T>& a, int64_t index) {
    const Position p = split_index(index, a.batch, a.channels, a.height, a.width);
    a.pre[index] = branch_value(a, read_branch(a, p.b), p.b, p.n, p.c, p.i, p.j);
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
};

template <typename T>
BNAO_CELL_HD ChannelContext<T> channel_context(const RoundArgs<T>& a, int64_t output) {
  ChannelContext<T> ctx;
  ctx.output = output;
  ctx.b = static_cast<int>(output / a.channels);
  ctx.c = output % a.channels;
  ctx.br = read_branch(a, ctx.b);
  ctx.active = false;
  return ctx;
}

// Offset of element k (over N x Ho x Wo) of channel (b, c) in a [2, N, C, Ho, Wo] tensor.
template <typename T>
BNAO_CELL_HD int64_t channel_element(const RoundArgs<T>& a, int b, int64_t c, int64_t k) {
  const int64_t plane = a.height * a.width;
  const int64_t n = k / plane;
  return ((static_cast<int64_t>(b) * a.batch + n) * a.channels + c) * plane + (k - n * plane);
}

// Batch mean of pre per (branch, channel); 0 for branches without the round's BN.
template <typename T>
struct MeanTerm {
  using Context = ChannelContext<T>;
  static BNAO_CELL_HD Context prepare(const RoundArgs<T>& a, int64_t output) {
    Context ctx = channel_context(a, output);
    ctx.active = ctx.br.has_bn;
    return ctx;
  }
  static BNAO_CELL_HD T term(const RoundArgs<T>& a, const Context& ctx, int64_t k) {
    return a.pre[channel_element(a, ctx.b, ctx.c, k)];
  }
  template <typename Acc>
  static BNAO_CELL_HD void finish(const RoundArgs<T>& a, const Context& ctx, Acc sum) {
    a.mean[ctx.output] = ctx.active ? static_cast<T>(sum / static_cast<Acc>(a.batch * a.height * a.width)) : T(0);
  }
};

// 1 / sqrt(biased variance + eps) per (branch, channel), two-pass (after MeanTerm); 1 without BN.
template <typename T>
struct InvstdTerm {
  using Context = ChannelContext<T>;
  static BNAO_CELL_HD Context prepare(const RoundArgs<T>& a, int64_t output) { return MeanTerm<T>::prepare(a, output); }
  static BNAO_CELL_HD T term(const RoundArgs<T>& a, const Context& ctx, int64_t k) {
    const T centred = a.pre[channel_element(a, ctx.b, ctx.c, k)] - a.mean[ctx.output];
    return centred * centred;
  }
  template <typename Acc>
  static BNAO_CELL_HD void finish(const RoundArgs<T>& a, const Context& ctx, Acc sum) {
    const double variance = static_cast<double>(sum) / static_cast<double>(a.batch * a.height * a.width);
    a.invstd[ctx.output] = ctx.active ? static_cast<T>(1.0 / sqrt(variance + a.eps)) : T(1);
  }
};

// ------------------------------------------------------------------ backward bodies
// Gradient of pre including the statistics' (d mean / d pre = 1/M; d invstd / d pre =
// -invstd^3 (pre - mean) / M, the mean's own dependence cancelling in the biased variance).
template <typename T>
struct GradTotal {
  static BNAO_CELL_HD void run(const RoundArgs<T>& a, int64_t index) {
    const Position p = split_index(index, a.batch, a.channels, a.height, a.width);
    T grad = a.grad_pre[index];
    if (read_branch(a, p.b).has_bn) {
      const int64_t bc = p.b * a.channels + p.c;
      const T count = static_cast<T>(a.batch * a.height * a.width);
      const T invstd = a.invstd[bc];
      grad += a.grad_mean[bc] / count - a.grad_invstd[bc] * invstd * invstd * invstd * (a.pre[index] - a.mean[bc]) / count;
    }
    a.grad_total[index] = grad;
  }
};

// Gradient of the depthwise result of sep-conv branches: pw^T . grad_total.
template <typename T>
struct GradMid {
  static BNAO_CELL_HD void run(const RoundArgs<T>& a, int64_t index) {
    const Position p = split_index(index, a.batch, a.channels, a.height, a.width);
    if (read_branch(a, p.b).op != kOpSepConv) return;
    const T* column = a.pw + static_cast<int64_t>(p.b) * a.channels * a.channels + p.c;
    const T* grad = a.grad_total + pre_offset(a, p.b, p.n, 0, p.i, p.j);
    const int64_t plane = a.height * a.width;
    T sum = T(0);
    for (int64_t o = 0; o < a.channels; ++o) sum += column[o * a.channels] * grad[o * plane];
    a.grad_mid[index] = sum;
  }
};

// grad pw[b, o, c] = sum over (n, pixel) of grad_total[b, n, o] * (what pw[o, c] multiplied).
template <typename T>
struct GradPwTerm {
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
  static BNAO_CELL_HD T term(const RoundArgs<T>& a, const Context& ctx, int64_t k) {
    const T grad = a.grad_total[channel_element(a, ctx.b, ctx.o, k)];
    if (ctx.br.op == kOpSepConv) return grad * a.mid[channel_element(a, ctx.b, ctx.c, k)];
    const int64_t plane = a.height * a.width;
    const int64_t n = k / plane, pixel = k - n * plane;
    const int64_t offset = reduce_offset(ctx.o, a.channels);
    const int64_t y = 2 * (pixel / a.width) + offset, x = 2 * (pixel % a.width) + offset;
    return inside(ctx.br, y, x) ? grad * load_input(a, ctx.br, ctx.b, n, ctx.c, y, x) : T(0);
  }
  template <typename Acc>
  static BNAO_CELL_HD void finish(const RoundArgs<T>& a, const Context& ctx, Acc sum) {
    a.grad_pw[ctx.output] = ctx.active ? static_cast<T>(sum) : T(0);
  }
};

// grad dw[b, c, kh, kw] = sum over (n, output pixel) of grad_mid * ReLU(input at the tap);
// zero outside the branch's k x k corner and for branches without a depthwise conv.
template <typename T>
struct GradDwTerm {
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
  static BNAO_CELL_HD T term(const RoundArgs<T>& a, const Context& ctx, int64_t k) {
    const int64_t plane = a.height * a.width;
    const int64_t n = k / plane, pixel = k - n * plane;
    const int d = ctx.br.dilation, s = ctx.br.stride;
    const int64_t pad = static_cast<int64_t>(d) * (ctx.br.kernel / 2);
    const int64_t y = (pixel / a.width) * s - pad + ctx.kh * d, x = (pixel % a.width) * s - pad + ctx.kw * d;
    if (!inside(ctx.br, y, x)) return T(0);
    return a.grad_mid[channel_element(a, ctx.b, ctx.c, k)] * relu(load_input(a, ctx.br, ctx.b, n, ctx.c, y, x));
  }
  template <typename Acc>
  static BNAO_CELL_HD void finish(const RoundArgs<T>& a, const Context& ctx, Acc sum) {
    a.grad_dw[ctx.output] = ctx.active ? static_cast<T>(sum) : T(0);
  }
};

// Output index i of a tap of a strided window reaching input row y through tap offset `reach`
// (i * stride + reach == y), or -1 when none.
BNAO_CELL_HD int64_t strided_source(int64_t y, int64_t reach, int stride, int64_t size) {
  const int64_t scaled = y - reach;
  if (scaled < 0 || scaled % stride != 0) return -1;
  const int64_t i = scaled / stride;
  return i < size ? i : -1;
}

template <typename T>
BNAO_CELL_HD T depthwise_input_grad(const RoundArgs<T>& a, const Branch<T>& br, int b, int64_t n, int64_t c,
                                    int64_t y, int64_t x) {
  if (!(load_input(a, br, b, n, c, y, x) > T(0))) return T(0);  // ReLU passes no gradient at <= 0
  const int k = br.kernel, d = br.dilation, s = br.stride;
  const int64_t pad = static_cast<int64_t>(d) * (k / 2);
  const T* weight = a.dw + (static_cast<int64_t>(b) * a.channels + c) * kSlab;
  T sum = T(0);
  for (int kh = 0; kh < k; ++kh) {
    const int64_t i = strided_source(y, kh * d - pad, s, a.height);
    if (i < 0) continue;
    for (int kw = 0; kw < k; ++kw) {
      const int64_t j = strided_source(x, kw * d - pad, s, a.width);
      if (j >= 0) sum += weight[kh * kMaxKernel + kw] * a.grad_mid[pre_offset(a, b, n, c, i, j)];
    }
  }
  return sum;
}

template <typename T>
BNAO_CELL_HD T reduce_input_grad(const RoundArgs<T>& a, int b, int64_t n, int64_t c, int64_t y, int64_t x) {
  // Even pixels feed rows :C/2, odd pixels rows C/2:; mixed pixels are never read.
  if ((y & 1) != (x & 1)) return T(0);
  const int64_t offset = y & 1, i = y >> 1, j = x >> 1;
  if (i >= a.height || j >= a.width) return T(0);
  const int64_t begin = offset ? a.channels / 2 : 0, end = offset ? a.channels : a.channels / 2;
  const T* column = a.pw + static_cast<int64_t>(b) * a.channels * a.channels + c;
  const T* grad = a.grad_total + pre_offset(a, b, n, 0, i, j);
  const int64_t plane = a.height * a.width;
  T sum = T(0);
  for (int64_t o = begin; o < end; ++o) sum += column[o * a.channels] * grad[o * plane];
  return sum;
}

template <typename T>
BNAO_CELL_HD T pool_input_grad(const RoundArgs<T>& a, const Branch<T>& br, int b, int64_t n, int64_t c, int64_t y,
                               int64_t x) {
  T sum = T(0);
  for (int dy = 0; dy < 3; ++dy) {
    const int64_t i = strided_source(y, dy - 1, br.stride, a.height);
    if (i < 0) continue;
    for (int dx = 0; dx < 3; ++dx) {
      const int64_t j = strided_source(x, dx - 1, br.stride, a.width);
      if (j < 0) continue;
      const T grad = a.grad_total[pre_offset(a, b, n, c, i, j)];
      if (br.op == kOpAvgPool) {
        const Window rows = pool_window(i, br.stride, br.in_height), cols = pool_window(j, br.stride, br.in_width);
        sum += grad / static_cast<T>((rows.end - rows.begin) * (cols.end - cols.begin));
      } else {
        const MaxAt<T> best = max_pool_at(a, br, b, n, c, i, j);
        if (best.y == y && best.x == x) sum += grad;  // only the window's first maximum gets it
      }
    }
  }
  return sum;
}

// Gradient of the branch's (normalised) input at an in-bounds pixel (y, x).
template <typename T>
BNAO_CELL_HD T branch_input_grad(const RoundArgs<T>& a, const Branch<T>& br, int b, int64_t n, int64_t c, int64_t y,
                                 int64_t x) {
  switch (br.op) {
    case kOpSepConv:
      return depthwise_input_grad(a, br, b, n, c, y, x);
    case kOpReduce:
      return reduce_input_grad(a, b, n, c, y, x);
    case kOpAvgPool:
    case kOpMaxPool:
      return pool_input_grad(a, br, b, n, c, y, x);
    case kOpCopy:
      return y < a.height && x < a.width ? a.grad_total[pre_offset(a, b, n, c, y, x)] : T(0);
    default:
      return T(0);
  }
}

// Round 1: gradient of source a.source_index, summed over the branches that read it (zero when none).
template <typename T>
struct SourceGrad {
  static BNAO_CELL_HD void run(const RoundArgs<T>& a, int64_t index) {
    const int s = a.source_index;
    const int64_t height = a.source_height[s], width = a.source_width[s];
    const int64_t x = index % width, y = (index / width) % height;
    const int64_t c = (index / (width * height)) % a.channels, n = index / (width * height * a.channels);
    T sum = T(0);
    for (int b = 0; b < kNumBranches; ++b) {
      const Branch<T> br = read_branch(a, b);
      if (br.source == s) sum += branch_input_grad(a, br, b, n, c, y, x);
    }
    a.grad_source[index] = sum;
  }
};

// Round 2, first pass: gradient of each branch's normalised input, into grad_source (scaled to
// pre1's gradient by ScaleNormGrad once the prologue's parameter gradients have read it).
template <typename T>
struct NormInputGrad {
  static BNAO_CELL_HD void run(const RoundArgs<T>& a, int64_t index) {
    const Position p = split_index(index, a.batch, a.channels, a.height, a.width);
    a.grad_source[index] = branch_input_grad(a, read_branch(a, p.b), p.b, p.n, p.c, p.i, p.j);
  }
};

template <typename T>
struct ScaleNormGrad {
  static BNAO_CELL_HD void run(const RoundArgs<T>& a, int64_t index) {
    const Position p = split_index(index, a.batch, a.channels, a.height, a.width);
    if (!read_branch(a, p.b).normalize) return;
    const int64_t bc = p.b * a.channels + p.c;
    a.grad_source[index] *= a.in_invstd[bc] * a.in_gamma[bc];
  }
};

// Prologue z = (x - mean) * invstd * gamma + beta, gz = dL/dz in grad_source:
// S1 = sum gz gives grad beta = S1 and grad mean = -S1 * invstd * gamma.
template <typename T>
struct NormShiftTerm {
  using Context = ChannelContext<T>;
  static BNAO_CELL_HD Context prepare(const RoundArgs<T>& a, int64_t output) {
    Context ctx = channel_context(a, output);
    ctx.active = ctx.br.normalize;
    return ctx;
  }
  static BNAO_CELL_HD T term(const RoundArgs<T>& a, const Context& ctx, int64_t k) {
    return a.grad_source[channel_element(a, ctx.b, ctx.c, k)];
  }
  template <typename Acc>
  static BNAO_CELL_HD void finish(const RoundArgs<T>& a, const Context& ctx, Acc sum) {
    const int64_t o = ctx.output;
    const T shift = ctx.active ? static_cast<T>(sum) : T(0);
    a.grad_in_beta[o] = shift;
    a.grad_in_mean[o] = -shift * a.in_invstd[o] * a.in_gamma[o];
  }
};

// S2 = sum gz * (x - mean) gives grad gamma = S2 * invstd and grad invstd = S2 * gamma.
template <typename T>
struct NormScaleTerm {
  using Context = ChannelContext<T>;
  static BNAO_CELL_HD Context prepare(const RoundArgs<T>& a, int64_t output) {
    return NormShiftTerm<T>::prepare(a, output);
  }
  static BNAO_CELL_HD T term(const RoundArgs<T>& a, const Context& ctx, int64_t k) {
    const int64_t offset = channel_element(a, ctx.b, ctx.c, k);
    return a.grad_source[offset] * (a.sources[0][offset] - a.in_mean[ctx.output]);
  }
  template <typename Acc>
  static BNAO_CELL_HD void finish(const RoundArgs<T>& a, const Context& ctx, Acc sum) {
    const int64_t o = ctx.output;
    const T scale = ctx.active ? static_cast<T>(sum) : T(0);
    a.grad_in_gamma[o] = scale * a.in_invstd[o];
    a.grad_in_invstd[o] = scale * a.in_gamma[o];
  }
};

// ------------------------------------------------------------------ phase sequences (host)
// `launcher.for_each<Body>(count, args)` runs Body<T>::run for every index < count;
// `launcher.reduce<Term>(outputs, length, args)` runs the reduction described above.
template <typename Launcher, typename T>
void run_forward(const Launcher& launcher, const RoundArgs<T>& a) {
  const int64_t elements = kNumBranches * a.batch * a.channels * a.height * a.width;
  const int64_t per_channel = a.batch * a.height * a.width;
  launcher.template for_each<DepthwiseForward>(elements, a);
  launcher.template for_each<BranchForward>(elements, a);
  launcher.template reduce<MeanTerm>(kNumBranches * a.channels, per_channel, a);
  launcher.template reduce<InvstdTerm>(kNumBranches * a.channels, per_channel, a);
}

// `grad_sources[s]` is where source s's gradient goes (round 2: one tensor shaped like pre1).
template <typename Launcher, typename T>
void run_backward(const Launcher& launcher, RoundArgs<T> a, T* const* grad_sources) {
  const int64_t elements = kNumBranches * a.batch * a.channels * a.height * a.width;
  const int64_t per_channel = a.batch * a.height * a.width;
  launcher.template for_each<GradTotal>(elements, a);
  launcher.template for_each<DepthwiseForward>(elements, a);  // recomputed rather than saved
  launcher.template for_each<GradMid>(elements, a);
  launcher.template reduce<GradPwTerm>(kNumBranches * a.channels * a.channels, per_channel, a);
  launcher.template reduce<GradDwTerm>(kNumBranches * a.channels * kSlab, per_channel, a);
  if (a.round == 1) {
    for (int s = 0; s < a.num_sources; ++s) {
      a.source_index = s;
      a.grad_source = grad_sources[s];
      launcher.template for_each<SourceGrad>(a.batch * a.channels * a.source_height[s] * a.source_width[s], a);
    }
    return;
  }
  a.source_index = 0;
  a.grad_source = grad_sources[0];
  launcher.template for_each<NormInputGrad>(elements, a);
  launcher.template reduce<NormShiftTerm>(kNumBranches * a.channels, per_channel, a);
  launcher.template reduce<NormScaleTerm>(kNumBranches * a.channels, per_channel, a);
  launcher.template for_each<ScaleNormGrad>(elements, a);
}

}  // namespace cell
}  // namespace bnao
