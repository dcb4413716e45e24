// The gradient of a branch's input at one pixel (depthwise, factorized reduce, pooling), gathered from the
// outputs that read it, and its column loops for the CPU launcher: what SourceGrad and NormInputGrad
// (cell/round_backward.h) add up (overview: cell/branch_round.h).
#pragma once

#include <cstdint>

#include "cell/round_forward.h"

namespace bnao {
namespace cell {

// Output index i of a tap of a strided window reaching input row y through tap offset `reach`
// (i * stride + reach == y), or -1 when none.
// Strides are 1 or 2 (read_branch clamps them), so no division is needed.
BNAO_CELL_HD int64_t strided_source(int64_t y, int64_t reach, int stride, int64_t size) {
  const int64_t scaled = y - reach;
  if (scaled < 0 || (stride == 2 && (scaled & 1))) return -1;
  const int64_t i = stride == 2 ? scaled >> 1 : scaled;
  return i < size ? i : -1;
}

// depthwise_input_grad's sum at an interior pixel at stride 1 with the kernel size and dilation as constants
// (with_constant_kernel): the same products in the same order as its generic loop.
template <int K, int D, typename T>
BNAO_CELL_HD Compute<T> depthwise_input_grad_interior(const Compute<T>* weight, const T* grad, int64_t width,
                                                      int64_t bottom, int64_t right) {
  using C = Compute<T>;
  const T* origin = grad + bottom * width + right;
  C sum = C(0);
  BNAO_UNROLL
  for (int kh = 0; kh < K; ++kh) {
    const T* row = origin - static_cast<int64_t>(kh * D) * width;
    BNAO_UNROLL
    for (int kw = 0; kw < K; ++kw) sum += weight[kh * kMaxKernel + kw] * static_cast<C>(row[-kw * D]);
  }
  return sum;
}

// depthwise_input_grad_interior for kDepthwiseGroup consecutive input columns (right, right + 1, ... are the
// columns + pad): each gradient row's values loaded once for the group and each weight once, every column's
// products added in depthwise_input_grad_interior's order, so the same bits.
template <int K, int D, typename T>
BNAO_CELL_HD void depthwise_input_grad_interior_group(const Compute<T>* weight, const T* grad, int64_t width,
                                                      int64_t bottom, int64_t right, Compute<T>* sums) {
  using C = Compute<T>;
  constexpr int kReach = (K - 1) * D, kSpan = kDepthwiseGroup + kReach;
  const T* origin = grad + bottom * width + right - kReach;  // the leftmost value the group reads
  BNAO_UNROLL
  for (int q = 0; q < kDepthwiseGroup; ++q) sums[q] = C(0);
  BNAO_UNROLL
  for (int kh = 0; kh < K; ++kh) {
    const T* row = origin - static_cast<int64_t>(kh * D) * width;
    C g[kSpan];
    BNAO_UNROLL
    for (int m = 0; m < kSpan; ++m) g[m] = static_cast<C>(row[m]);
    BNAO_UNROLL
    for (int kw = 0; kw < K; ++kw) {
      const C w = weight[kh * kMaxKernel + kw];
      BNAO_UNROLL
      for (int q = 0; q < kDepthwiseGroup; ++q) sums[q] += w * g[q + kReach - kw * D];
    }
  }
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
      if (with_constant_kernel(k, d, [&]<int K, int D>() {
            sum = depthwise_input_grad_interior<K, D>(weight, grad, a.width, bottom, right);
          }))
        return sum;
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

// depthwise_input_grad of `count` (<= kDepthwiseGroup) consecutive columns x0, x0 + 1, ... of input row y into
// values[0 .. count) (the rest zero): a whole group of interior columns at stride 1 of the space's shapes
// through depthwise_input_grad_interior_group (then ReLU's gate), any other group column by column; each
// value the same either way. The CUDA launcher's form (a thread per group, SourceGrad::run_group).
template <typename T>
BNAO_CELL_HD void depthwise_input_grad_group(const RoundArgs<T>& a, const Branch<T>& br, int b, int64_t n, int64_t c,
                                            int64_t y, int64_t x0, int count, Compute<T>* values) {
  using C = Compute<T>;
  const int k = br.kernel, d = br.dilation;
  const int64_t pad = static_cast<int64_t>(d) * (k / 2), span = static_cast<int64_t>(k - 1) * d;
  const int64_t bottom = y + pad, right = x0 + pad;
  bool done = false;
  if (count == kDepthwiseGroup && br.stride == 1 && bottom - span >= 0 && bottom < a.height && right - span >= 0 &&
      right + kDepthwiseGroup - 1 < a.width) {
    const C* weight = a.dw + (static_cast<int64_t>(b) * a.channels + c) * kSlab;
    const T* grad = a.grad_mid + pre_offset(a, b, n, c, 0, 0);
    done = with_constant_kernel(k, d, [&]<int K, int D>() {
      depthwise_input_grad_interior_group<K, D>(weight, grad, a.width, bottom, right, values);
    });
    if (done) {
      BNAO_UNROLL
      for (int q = 0; q < kDepthwiseGroup; ++q)  // ReLU passes no gradient at <= 0 (nor at NaN)
        if (!(load_input(a, br, b, n, c, y, x0 + q) > C(0))) values[q] = C(0);
    }
  }
  if (!done) {
    BNAO_UNROLL
    for (int q = 0; q < kDepthwiseGroup; ++q)
      values[q] = q < count ? depthwise_input_grad(a, br, b, n, c, y, x0 + q) : C(0);
  }
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

}  // namespace cell
}  // namespace bnao
