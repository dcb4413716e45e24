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

// grad_states[s][n, ci, p], e over [S, N, C, HW]: loose[s] * ReLU'(x) * sum_co W[co, s, ci] * grad[n, co, p];
// zero for states that are not loose. ReLU' passes where x > 0 or x is NaN (torch's threshold_backward).
template <typename T, typename Acc>
BNAO_CELL_HD void combine_grad_state_item(int64_t e, const CombineArgs<T>& a, T* const* grad_states) {
  const int64_t per_sample = a.channels * a.plane;
  const int64_t per_state = a.batch * per_sample;
  const int s = static_cast<int>(e / per_state);
  const int64_t i = e - s * per_state;
  const int64_t n = i / per_sample;
  const int64_t ci = (i / a.plane) % a.channels;
  const int64_t p = i % a.plane;
  const Acc loose = static_cast<Acc>(a.loose[s]);
  const Acc x = static_cast<Acc>(a.states[s][i]);
  if (loose == Acc(0) || x <= Acc(0)) {
    grad_states[s][i] = T(0);
    return;
  }
  const T* g = a.grad + n * per_sample + p;
  Acc sum = Acc(0);
  for (int64_t co = 0; co < a.channels; ++co) {
    sum += static_cast<Acc>(a.weight[(co * a.num_states + s) * a.channels + ci]) * static_cast<Acc>(g[co * a.plane]);
  }
  grad_states[s][i] = static_cast<T>(loose * sum);
}

// Output o = (co, s, ci) of the weight gradient: loose[s] * sum over (n, p) of grad[n, co, p] * ReLU(x_s[n, ci, p]).
// partial() sums the (n, p) pairs j = begin, begin + step, ... < N * HW; inactive outputs (s not loose) are
// zero and read nothing.
template <typename T, typename Acc>
struct CombineWeightGrad {
  CombineArgs<T> args;
  Compute<T>* grad_weight;

  BNAO_CELL_HD bool active(int64_t output) const {
    const int s = static_cast<int>((output / args.channels) % args.num_states);
    return args.loose[s] != Compute<T>(0);
  }

  BNAO_CELL_HD Acc partial(int64_t output, int64_t begin, int64_t step) const {
    if (!active(output)) return Acc(0);
    const int64_t ci = output % args.channels;
    const int s = static_cast<int>((output / args.channels) % args.num_states);
    const int64_t co = output / (args.channels * args.num_states);
    const int64_t per_sample = args.channels * args.plane;
    const T* x = args.states[s] + ci * args.plane;
    const T* g = args.grad + co * args.plane;
    Acc sum = Acc(0);
    for (int64_t j = begin; j < args.batch * args.plane; j += step) {
      const int64_t offset = (j / args.plane) * per_sample + j % args.plane;
      sum += static_cast<Acc>(g[offset]) * relu_keep_nan(static_cast<Acc>(x[offset]));
    }
    return sum;
  }

  BNAO_CELL_HD void finish(int64_t output, Acc sum) const {
    const int s = static_cast<int>((output / args.channels) % args.num_states);
    grad_weight[output] = active(output) ? static_cast<Compute<T>>(static_cast<Acc>(args.loose[s]) * sum)
                                         : Compute<T>(0);
  }
};

}  // namespace cell
}  // namespace bnao
