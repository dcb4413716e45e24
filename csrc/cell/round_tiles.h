// The CUDA launcher's tile forms: the pointwise products over 8-channel tiles (BranchForwardTiles,
// GradMidTiles) and the weight gradients as multi-sum reductions (GradPwTiles, GradDwTiles), each giving
// the same values as its element body or term (overview: cell/branch_round.h; the CPU runs the plain
// forms, csrc/tests/test_reduction_split.cpp checks these on the CPU).
#pragma once

#include <cstdint>

#include "cell/round_backward.h"

namespace bnao {
namespace cell {

// ------------------------------------------------------------------ channel tiles (the CUDA launcher's)
// BranchForward and GradMid compute each output element as a C-term dot product over channels, so run one
// element per thread they read every channel value C times (from L2 on a GPU: the other channels' threads
// sit in other blocks). Their tile forms compute kChannelTile output channels of one pixel per work item and
// read each channel value once for all of them, with the same per-element sums in the same order (so the
// same values as the element bodies). A backend's `for_each_tiled<Body, Tiles>` runs them (the CUDA
// launcher); the CPU runs the element bodies, whose row loops already stream each channel row once.
constexpr int kChannelTile = 8;

// Work item e = ((b * N + n) * tiles + tile) * H * W + pixel of a channel-tile body over pre's shape; a body
// `Tiles<T>::run(args, e)` covers e < channel_tile_items(args). The items of one (b, n, tile) form a *plane*:
// `Tiles<T>::plane(args, p)` decodes plane p (its indices and its branch, read from the code) and
// `Tiles<T>::run_pixel(args, plane, pixel)` computes one item, so a launcher may decode each plane once for
// all of its pixels (the CUDA launcher does, in shared memory); `run` is the two in a row.
struct ChannelTileItem {
  int b;
  int64_t n, c0, i, j;
};

template <typename T>
struct ChannelTilePlane {
  int b;
  int64_t n, c0;
  Branch<T> br;
};

template <typename T>
BNAO_CELL_HD int64_t channel_tiles(const RoundArgs<T>& a) { return (a.channels + kChannelTile - 1) / kChannelTile; }

template <typename T>
BNAO_CELL_HD int64_t channel_tile_items(const RoundArgs<T>& a) {
  return kNumBranches * a.batch * channel_tiles(a) * a.height * a.width;
}

// Plane p = (b * N + n) * tiles + tile, with its branch.
template <typename T>
BNAO_CELL_HD ChannelTilePlane<T> channel_tile_plane(const RoundArgs<T>& a, int64_t p) {
  ChannelTilePlane<T> plane;
  const int64_t tiles = channel_tiles(a);
  plane.c0 = p % tiles * kChannelTile;
  p /= tiles;
  plane.n = p % a.batch;
  plane.b = static_cast<int>(p / a.batch);
  plane.br = read_branch(a, plane.b);
  return plane;
}

template <typename T>
BNAO_CELL_HD ChannelTileItem channel_tile_item(const RoundArgs<T>& a, const ChannelTilePlane<T>& plane,
                                               int64_t pixel) {
  ChannelTileItem t;
  t.b = plane.b;
  t.n = plane.n;
  t.c0 = plane.c0;
  t.i = pixel / a.width;
  t.j = pixel - t.i * a.width;
  return t;
}

// The plane-and-pixel split of a tile body: `run(args, e)` for launchers that take one item at a time.
template <typename T, typename Derived>
struct ChannelTileBody {
  using Plane = ChannelTilePlane<T>;
  static BNAO_CELL_HD Plane plane(const RoundArgs<T>& a, int64_t p) { return channel_tile_plane(a, p); }
  static BNAO_CELL_HD void run(const RoundArgs<T>& a, int64_t e) {
    const int64_t pixels = a.height * a.width, p = e / pixels;
    Derived::run_pixel(a, Derived::plane(a, p), e - p * pixels);
  }
};

// The pointwise products of a sep-conv branch for the tile's kChannelTile output channels of one pixel:
// each mid value loaded once, the rows' sums in registers, over c in order (pointwise_value's sums). Its own
// loop, apart from the factorized reduce's, so that the per-channel work is a load and kChannelTile FMAs.
template <typename T>
BNAO_CELL_HD void separable_pointwise_tile(const RoundArgs<T>& a, const ChannelTileItem& t, const Compute<T>* weight,
                                           T* out) {
  using C = Compute<T>;
  const int64_t plane = a.height * a.width;
  const T* column = a.mid + pre_offset(a, t.b, t.n, 0, t.i, t.j);
  const C* rows[kChannelTile];  // past C: the last row again, computed, not stored
  C sum[kChannelTile];
  BNAO_UNROLL
  for (int r = 0; r < kChannelTile; ++r) {
    rows[r] = weight + (t.c0 + r < a.channels ? t.c0 + r : a.channels - 1) * a.channels;
    sum[r] = C(0);
  }
  for (int64_t c = 0; c < a.channels; ++c) {
    const C x = static_cast<C>(column[c * plane]);
    BNAO_UNROLL
    for (int r = 0; r < kChannelTile; ++r) sum[r] += rows[r][c] * x;
  }
  BNAO_UNROLL
  for (int r = 0; r < kChannelTile; ++r)
    if (t.c0 + r < a.channels) out[(t.c0 + r) * plane] = sum[r];
}

// BranchForward over channel tiles: sep convs and the factorized reduce read their C inputs once per
// pixel; other branches compute each channel as BranchForward does.
template <typename T>
struct BranchForwardTiles : ChannelTileBody<T, BranchForwardTiles<T>> {
  static BNAO_CELL_HD void run_pixel(const RoundArgs<T>& a, const ChannelTilePlane<T>& tile_plane, int64_t pixel) {
    using C = Compute<T>;
    const ChannelTileItem t = channel_tile_item(a, tile_plane, pixel);
    const Branch<T>& br = tile_plane.br;
    const int64_t plane = a.height * a.width;
    T* out = a.pre + pre_offset(a, t.b, t.n, 0, t.i, t.j);
    if (br.op != kOpSepConv && br.op != kOpReduce) {
      for (int r = 0; r < kChannelTile && t.c0 + r < a.channels; ++r)
        out[(t.c0 + r) * plane] = branch_value(a, br, t.b, t.n, t.c0 + r, t.i, t.j);
      return;
    }
    const C* weight = a.pw + static_cast<int64_t>(t.b) * a.channels * a.channels;  // pw[b], rows o, columns c
    if (br.op == kOpSepConv) {
      separable_pointwise_tile(a, t, weight, out);
      return;
    }
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
struct GradMidTiles : ChannelTileBody<T, GradMidTiles<T>> {
  static BNAO_CELL_HD void run_pixel(const RoundArgs<T>& a, const ChannelTilePlane<T>& tile_plane, int64_t pixel) {
    using C = Compute<T>;
    if (tile_plane.br.op != kOpSepConv) return;
    const ChannelTileItem t = channel_tile_item(a, tile_plane, pixel);
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
    if (br.op == kOpSepConv) {
      separable_sums(b, o0, c0, chunk * threads + thread, chunks * threads, sums);
      return;
    }
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

  // partial_sums of a sep-conv branch: grad_total times mid, without the factorized reduce's selects between
  // its even and odd halves (64 per term); the same products added in the same order.
  BNAO_CELL_HD void separable_sums(int b, int64_t o0, int64_t c0, int64_t first, int64_t step, Acc* sums) const {
    using C = Compute<T>;
    const RoundArgs<T>& a = args;
    const int64_t plane = a.height * a.width, length = a.batch * plane;
    for (int64_t index = first; index < length; index += step) {
      const int64_t n = index / plane, pixel = index - n * plane;
      const T* grad_column = a.grad_total + pre_offset(a, b, n, 0, 0, 0) + pixel;
      const T* mid_column = a.mid + pre_offset(a, b, n, 0, 0, 0) + pixel;
      C grad[kTile], value[kTile];
      BNAO_UNROLL
      for (int r = 0; r < kTile; ++r) {
        grad[r] = o0 + r < a.channels ? static_cast<C>(grad_column[(o0 + r) * plane]) : C(0);
        value[r] = c0 + r < a.channels ? static_cast<C>(mid_column[(c0 + r) * plane]) : C(0);
      }
      BNAO_UNROLL
      for (int r = 0; r < kTile; ++r) {
        BNAO_UNROLL
        for (int q = 0; q < kTile; ++q) sums[r * kTile + q] += static_cast<Acc>(grad[r] * value[q]);
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

}  // namespace cell
}  // namespace bnao
