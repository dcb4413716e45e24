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
//
// The bodies live in round_values.h (arguments, branch decoding, forward values), round_forward.h,
// round_input_grad.h, round_backward.h and round_tiles.h; this header adds the phase sequences.
#pragma once

#include <cstdint>

#include "cell/round_tiles.h"

namespace bnao {
namespace cell {

// ------------------------------------------------------------------ phase sequences (host)
// `launcher.for_each<Body>(rows, columns, args)` runs Body<T> on every element of a
// [rows, columns] tensor; `launcher.reduce<Term>(outputs, args)` runs Term<T> for every output
// (its terms over every (n, i, j) of pre's shape); `launcher.reduce_tiled<Term, Tiles>(outputs, args)`
// gives the same outputs, which a backend may compute through the multi-sum reduction Tiles<T, Acc>
// (the CUDA launcher does; the CPU runs Term); `launcher.for_each_tiled<Body, Tiles>(rows, columns, args)`
// likewise for an element body and its channel-tile form. `reduce_two<First, Second>(outputs, args)` and
// `reduce_tiled_two<FirstTerm, FirstTiles, SecondTerm, SecondTiles>(first_outputs, second_outputs, args)` are
// two independent reductions, which the CUDA launcher runs in one launch (and one chunk pass) and the CPU one
// after the other: the same sums either way.
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
  launcher.template for_each<GradTotalAndRecompute>(rows, a.width, a);
  launcher.template for_each_tiled<GradMid, GradMidTiles>(rows, a.width, a);
  launcher.template reduce_tiled_two<GradPwTerm, GradPwTiles, GradDwTerm, GradDwTiles>(
      kNumBranches * a.channels * a.channels, kNumBranches * a.channels * kSlab, a);
  if (a.round == 1) {
    for (int s = 0; s < a.num_sources; ++s) a.grad_sources[s] = grad_sources[s];
    // One launch per run of sources of one shape (the buffers are distinct: branch_round_ops.h checks).
    for (int first = 0, last = 0; first < a.num_sources; first = last) {
      while (last < a.num_sources && a.source_height[last] == a.source_height[first] &&
             a.source_width[last] == a.source_width[first])
        ++last;
      a.source_index = first;
      a.source_count = last - first;
      launcher.template for_each<SourceGrad>(a.source_count * a.batch * a.channels * a.source_height[first],
                                             a.source_width[first], a);
    }
    return;
  }
  a.grad_source = grad_sources[0];
  launcher.template for_each<NormInputGrad>(rows, a.width, a);
  launcher.template reduce_two<NormShiftTerm, NormScaleTerm>(kNumBranches * a.channels, a);
  launcher.template for_each<ScaleNormGrad>(rows, a.width, a);
}

}  // namespace cell
}  // namespace bnao
