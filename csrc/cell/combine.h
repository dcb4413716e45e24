// Shared host/device bodies of bnao::combine and its backward: a cell's output
// before its BN, sum over the loose states s of loose[s] * W[:, s, :] . ReLU(x_s)
// (csrc/cell/DESIGN.md, "combine"). Each function computes one work item from
// plain pointers; the CPU kernels run them under at::parallel_for, the CUDA
// kernels on a grid. States that are not loose are skipped on the device (their
// weight column would be zero), so they cost no reads and a NaN in one does not
// reach the output, as in the eager cell, which concatenates only the loose ends.
#pragma once

#include <cstdint>

#include "cell/cell_code.h"
#include "cell/compute_type.h"

namespace bnao {
namespace cell {

// At most this many states (the cell inputs and B nodes): B + 2 = 7 in the NAO spaces.
constexpr int kMaxCombineStates = 16;

// ReLU that lets NaN through (as torch.relu does), so a non-finite state still poisons the loss.
template <typename Acc>
BNAO_CELL_HD Acc relu_keep_nan(Acc v) {
  return v <= Acc(0) ? Acc(0) : v;
}

// Pointers and sizes of one call: states[s] [N, C, HW] (activations, T), weight [C, S, C] and loose [S]
// (Compute<T>), grad [N, C, HW] for the backward.
template <typename T>
struct CombineArgs {
  using P = Compute<T>;
  const T* states[kMaxCombineStates];
  const P* weight;
  const P* loose;
  const T* grad;
  int num_states;
  int64_t batch;
  int64_t channels;
  int64_t plane;  // H * W
};

// Output channels per work item: each ReLU'd input value is loaded once for this many outputs (a thread
// per output would load it C times), and their sums stay in registers.
constexpr int kCombineTile = 8;

// Work items of the forward: [N, ceil(C / kCombineTile), HW].
template <typename T>
BNAO_CELL_HD int64_t combine_items(const CombineArgs<T>& a) {
  return a.batch * ((a.channels + kCombineTile - 1) / kCombineTile) * a.plane;
}

// Item e over [N, ceil(C / kCombineTile), HW]: out[n, co, p] for the item's kCombineTile output channels co,
// each the sum over loose s of sum_ci W[co, s, ci] * loose[s] * ReLU(x_s[n, ci, p]).
template <typename T, typename Acc>
BNAO_CELL_HD void combine_item(int64_t e, const CombineArgs<T>& a, T* out) {
  const int64_t tiles = (a.channels + kCombineTile - 1) / kCombineTile;
  const int64_t p = e % a.plane;
  const int64_t tile = (e / a.plane) % tiles;
  const int64_t n = e / (a.plane * tiles);
  const int64_t per_sample = a.channels * a.plane;
  const int64_t co0 = tile * kCombineTile;
  const int width = static_cast<int>(a.channels - co0 < kCombineTile ? a.channels - co0 : kCombineTile);
  // Loops over the whole tile with a compile-time bound (the tail masked by `width`), so that the
  // compiler keeps sum[] in registers instead of local memory.
  Acc sum[kCombineTile];
BNAO_UNROLL
  for (int t = 0; t < kCombineTile; ++t) sum[t] = Acc(0);
  for (int s = 0; s < a.num_states; ++s) {
    const Acc loose = static_cast<Acc>(a.loose[s]);
    if (loose == Acc(0)) continue;
    const T* x = a.states[s] + n * per_sample + p;
    const Compute<T>* w = a.weight + (co0 * a.num_states + s) * a.channels;
    const int64_t w_stride = a.num_states * a.channels;  // from W[co, s, :] to W[co + 1, s, :]
    for (int64_t ci = 0; ci < a.channels; ++ci) {
      const Acc v = loose * relu_keep_nan(static_cast<Acc>(x[ci * a.plane]));
BNAO_UNROLL
      for (int t = 0; t < kCombineTile; ++t) {
        if (t < width) sum[t] += static_cast<Acc>(w[t * w_stride + ci]) * v;
      }
    }
  }
  T* o = out + n * per_sample + co0 * a.plane + p;
BNAO_UNROLL
  for (int t = 0; t < kCombineTile; ++t) {
    if (t < width) o[t * a.plane] = static_cast<T>(sum[t]);
  }
}

// Work items of the states' gradient: [S, N, ceil(C / kCombineTile), HW].
template <typename T>
BNAO_CELL_HD int64_t combine_grad_state_items(const CombineArgs<T>& a) {
  return a.num_states * combine_items(a);
}

// Item e over [S, N, ceil(C / kCombineTile), HW]: grad_states[s][n, ci, p] for the item's kCombineTile input
// channels ci, each loose[s] * ReLU'(x_s[n, ci, p]) * sum_co W[co, s, ci] * grad[n, co, p]; zero for states
// that are not loose. ReLU' passes where x > 0 or x is NaN (torch's threshold_backward). Each grad value is
// loaded once for the tile's kCombineTile sums (the transpose of combine_item).
template <typename T, typename Acc>
BNAO_CELL_HD void combine_grad_state_item(int64_t e, const CombineArgs<T>& a, T* const* grad_states) {
  const int64_t tiles = (a.channels + kCombineTile - 1) / kCombineTile;
  const int64_t p = e % a.plane;
  const int64_t tile = (e / a.plane) % tiles;
  const int64_t n = (e / (a.plane * tiles)) % a.batch;
  const int s = static_cast<int>(e / (a.plane * tiles * a.batch));
  const int64_t per_sample = a.channels * a.plane;
  const int64_t ci0 = tile * kCombineTile;
  const int width = static_cast<int>(a.channels - ci0 < kCombineTile ? a.channels - ci0 : kCombineTile);
  const int64_t first = n * per_sample + ci0 * a.plane + p;  // element (n, ci0, p)
  T* out = grad_states[s] + first;
  const Acc loose = static_cast<Acc>(a.loose[s]);
  if (loose == Acc(0)) {
BNAO_UNROLL
    for (int t = 0; t < kCombineTile; ++t) {
      if (t < width) out[t * a.plane] = T(0);
    }
    return;
  }
  Acc sum[kCombineTile];
BNAO_UNROLL
  for (int t = 0; t < kCombineTile; ++t) sum[t] = Acc(0);
  const T* g = a.grad + n * per_sample + p;
  for (int64_t co = 0; co < a.channels; ++co) {
    const Acc gv = static_cast<Acc>(g[co * a.plane]);
    const Compute<T>* w = a.weight + (co * a.num_states + s) * a.channels + ci0;  // W[co, s, ci0:]
BNAO_UNROLL
    for (int t = 0; t < kCombineTile; ++t) {
      if (t < width) sum[t] += static_cast<Acc>(w[t]) * gv;
    }
  }
  const T* x = a.states[s] + first;
BNAO_UNROLL
  for (int t = 0; t < kCombineTile; ++t) {
    if (t < width) {
      const Acc xv = static_cast<Acc>(x[t * a.plane]);
      out[t * a.plane] = xv <= Acc(0) ? T(0) : static_cast<T>(loose * sum[t]);
    }
  }
}

// The weight gradient, W[co, s, ci] <- loose[s] * sum over (n, p) of grad[n, co, p] * ReLU(x_s[n, ci, p]),
// in two passes, deterministic on every backend:
//  1. CombineWeightGradTiles, a multi-sum reduction (the launchers' reduce_many): output (s, co tile, ci tile,
//     chunk) is a kCombineTile x kCombineTile tile of (co, ci) summed over the chunk's (n, p) pairs. On a GPU one
//     block takes an output, its threads striding over the chunk's pixels (neighbouring threads, neighbouring
//     pixels: contiguous loads), then the block adds the threads' tiles in a fixed tree; on the CPU one thread
//     takes an output. Each loaded grad and state value serves kCombineTile products. The tile goes to
//     partial[chunk, co, s, ci].
//  2. CombineWeightGradFinish: item (co, s, ci) adds its chunks' partials in chunk order.
// States that are not loose are skipped in pass 1 (their partials are never read) and get 0 in pass 2.
constexpr int kTileSums = kCombineTile * kCombineTile;
// Chunks: about this many (n, p) pairs each (16 per thread of a 256-thread block), at most kMaxWeightGradChunks,
// so that a GPU gets S x tiles^2 x chunks blocks of real work and the partials (chunks x C x S x C) stay small.
constexpr int64_t kWeightGradChunkPairs = 4096;
constexpr int64_t kMaxWeightGradChunks = 64;

BNAO_CELL_HD int64_t weight_grad_chunks(int64_t pairs) {
  const int64_t wanted = pairs / kWeightGradChunkPairs;
  return wanted < 1 ? 1 : (wanted < kMaxWeightGradChunks ? wanted : kMaxWeightGradChunks);
}

template <typename T, typename Acc>
struct CombineWeightGradTiles {
  static constexpr int kSums = kTileSums;
  CombineArgs<T> args;
  Acc* partial;  // [chunks, C, S, C]
  int64_t chunks;

  struct Tile {
    int s;
    int64_t co0, ci0, chunk;
    int co_width, ci_width;
  };

  BNAO_CELL_HD int64_t outputs() const {
    const int64_t tiles = (args.channels + kCombineTile - 1) / kCombineTile;
    return args.num_states * tiles * tiles * chunks;
  }

  // Output o over [S, co tile, ci tile, chunk].
  BNAO_CELL_HD Tile tile(int64_t o) const {
    const int64_t tiles = (args.channels + kCombineTile - 1) / kCombineTile;
    Tile t;
    t.chunk = o % chunks;
    t.ci0 = ((o / chunks) % tiles) * kCombineTile;
    t.co0 = ((o / (chunks * tiles)) % tiles) * kCombineTile;
    t.s = static_cast<int>(o / (chunks * tiles * tiles));
    t.co_width = static_cast<int>(args.channels - t.co0 < kCombineTile ? args.channels - t.co0 : kCombineTile);
    t.ci_width = static_cast<int>(args.channels - t.ci0 < kCombineTile ? args.channels - t.ci0 : kCombineTile);
    return t;
  }

  // sums[i * kCombineTile + k] = sum over the chunk's pairs j = first + begin, first + begin + step, ... of
  // grad[co0 + i] * ReLU(x_s[ci0 + k]) at pixel j; all 0 for a state that is not loose.
  BNAO_CELL_HD void partial_sums(int64_t o, int64_t begin, int64_t step, Acc* sums) const {
BNAO_UNROLL
    for (int q = 0; q < kTileSums; ++q) sums[q] = Acc(0);
    const Tile t = tile(o);
    if (args.loose[t.s] == Compute<T>(0)) return;
    const int64_t pairs = args.batch * args.plane, per_sample = args.channels * args.plane;
    const int64_t first = t.chunk * pairs / chunks, last = (t.chunk + 1) * pairs / chunks;
    const T* g = args.grad + t.co0 * args.plane;
    const T* x = args.states[t.s] + t.ci0 * args.plane;
    // Tail rows and columns load 0 (never NaN), and their sums are not written.
    for (int64_t j = first + begin; j < last; j += step) {
      const int64_t offset = (j / args.plane) * per_sample + j % args.plane;
      Acc gv[kCombineTile], xv[kCombineTile];
BNAO_UNROLL
      for (int u = 0; u < kCombineTile; ++u) {
        gv[u] = u < t.co_width ? static_cast<Acc>(g[offset + u * args.plane]) : Acc(0);
        xv[u] = u < t.ci_width ? relu_keep_nan(static_cast<Acc>(x[offset + u * args.plane])) : Acc(0);
      }
BNAO_UNROLL
      for (int i = 0; i < kCombineTile; ++i) {
BNAO_UNROLL
        for (int k = 0; k < kCombineTile; ++k) sums[i * kCombineTile + k] += gv[i] * xv[k];
      }
    }
  }

  BNAO_CELL_HD void finish(int64_t o, const Acc* sums) const {
    const Tile t = tile(o);
    if (args.loose[t.s] == Compute<T>(0)) return;
    Acc* out = partial + t.chunk * args.channels * args.num_states * args.channels;
BNAO_UNROLL
    for (int i = 0; i < kCombineTile; ++i) {
BNAO_UNROLL
      for (int k = 0; k < kCombineTile; ++k) {
        if (i < t.co_width && k < t.ci_width) {
          out[((t.co0 + i) * args.num_states + t.s) * args.channels + t.ci0 + k] = sums[i * kCombineTile + k];
        }
      }
    }
  }
};

template <typename T, typename Acc>
struct CombineWeightGradFinish {
  CombineArgs<T> args;
  const Acc* partial;  // [chunks, C, S, C] from CombineWeightGradTiles
  int64_t chunks;
  Compute<T>* grad_weight;

  // Output o = (co, s, ci) of [C, S, C].
  BNAO_CELL_HD void operator()(int64_t o) const {
    const int s = static_cast<int>((o / args.channels) % args.num_states);
    const Acc loose = static_cast<Acc>(args.loose[s]);
    if (loose == Acc(0)) {
      grad_weight[o] = Compute<T>(0);
      return;
    }
    const int64_t outputs = args.channels * args.num_states * args.channels;
    Acc sum = Acc(0);
    for (int64_t chunk = 0; chunk < chunks; ++chunk) sum += partial[chunk * outputs + o];
    grad_weight[o] = static_cast<Compute<T>>(loose * sum);
  }
};

}  // namespace cell
}  // namespace bnao
