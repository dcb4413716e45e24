// The CUDA launch order of bnao::branch_round and its backward, and of bnao::node_output_backward, run on the
// CPU against the registered CPU kernels: element bodies one element at a time (Body::row + Body::run, as
// the CUDA grid runs them; the CPU kernels run rows through run_columns), channel-tile bodies one work item
// at a time (Tiles::run), one-sum reductions split over chunks and 256 threads the way the CUDA launchers
// split them (cell/reduction_split.h; strided_term_sum, the node reduction's partial(begin, step)), and the
// tile reductions through their partial_sums, finish and chunk pass. Also the split itself, against hand
// counts. This is the arithmetic a GPU runs, checked where no GPU is; CUDA-only: the thread trees inside a
// block, float accumulation inside the sums (these add in double), and the launches themselves.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "cell/branch_round.h"
#include "cell/branch_round_ops.h"
#include "cell/launch_groups.h"
#include "cell/node_ops_host.h"
#include "cell/reduction_split.h"
#include "tests/check.h"

namespace {

using namespace bnao::cell;
using bnao_test::check;
using Optional = std::optional<at::Tensor>;

// Runs the phase sequences of cell/branch_round.h in the CUDA launcher's order, sequentially.
struct EmulatedCudaLauncher {
  int64_t* most_chunks;  // the largest split seen, so a test can tell that it reached several chunks
  bool* index_types_agree;  // every thread's sum is the same with 32-bit and with 64-bit index arithmetic
  bool* groups_fit;  // every block's rows or planes fit its shared memory (cell/launch_groups.h)

  // As for_each_rows_kernel (cell/launch_groups.h): rows decoded a block's group at a time, then each
  // thread's column group of its row (Body::run_group); one element at a time (for_each_kernel) where a row
  // does not fit a block.
  template <template <typename> class Body, typename T>
  void for_each(int64_t rows, int64_t columns, const RoundArgs<T>& a) const {
    constexpr int kPerThread = Body<T>::kColumnsPerThread;
    const int64_t threads = row_threads(columns, kPerThread);
    const int per_block = group_rows(threads);
    if (per_block == 0) {
      for (int64_t index = 0; index < rows * columns; ++index) {
        const int64_t row = index / columns;
        Body<T>::run(a, Body<T>::row(a, row), index - row * columns);
      }
      return;
    }
    *groups_fit &= per_block <= kMaxGroupRows && per_block * threads <= kThreads;
    std::vector<typename Body<T>::Row> decoded;
    for (int64_t first = 0; first < rows; first += per_block) {
      decoded.clear();
      for (int t = 0; t < per_block && first + t < rows; ++t) decoded.push_back(Body<T>::row(a, first + t));
      for (int thread = 0; thread < kThreads; ++thread) {
        const int local_row = thread / static_cast<int>(threads);
        const int first_column = (thread - local_row * static_cast<int>(threads)) * kPerThread;
        if (local_row >= per_block || first + local_row >= rows) continue;
        if constexpr (kPerThread == 1) {
          Body<T>::run(a, decoded[local_row], first_column);
        } else {
          Body<T>::run_group(a, decoded[local_row], first_column,
                             std::min<int>(kPerThread, static_cast<int>(columns) - first_column));
        }
      }
    }
  }

  // As the CUDA launcher: the channel-tile form, in blocks of kThreads items whose planes are decoded once
  // (for_each_plane_kernel), or one work item at a time for planes under kMinPlanePixels items.
  template <template <typename> class Body, template <typename> class Tiles, typename T>
  void for_each_tiled(int64_t, int64_t, const RoundArgs<T>& a) const {
    const int64_t count = channel_tile_items(a), pixels = a.height * a.width;
    if (pixels < kMinPlanePixels) {
      for (int64_t e = 0; e < count; ++e) Tiles<T>::run(a, e);
      return;
    }
    std::vector<typename Tiles<T>::Plane> decoded;
    for (int64_t start = 0; start < count; start += kThreads) {
      const PlaneGroup group = plane_group(start, count, pixels);
      *groups_fit &= group.planes >= 1 && group.planes <= kMaxGroupPlanes;
      decoded.clear();
      for (int t = 0; t < group.planes; ++t) decoded.push_back(Tiles<T>::plane(a, group.first_plane + t));
      for (int64_t e = start; e < std::min(start + kThreads, count); ++e) {
        const int64_t p = e / pixels;
        Tiles<T>::run_pixel(a, decoded.at(p - group.first_plane), e - p * pixels);
      }
    }
  }

  // Block (output, chunk): thread t's strided_term_sum, the threads added in thread order (a block's tree in
  // double is exact enough to compare at 1e-10); then the chunks in chunk order, as finish_chunks_kernel.
  template <template <typename> class Term, typename T>
  void reduce(int64_t outputs, const RoundArgs<T>& a) const {
    for (int64_t output = 0; output < outputs; ++output) reduce_output<Term, T>(output, outputs, a);
  }

  // As the CUDA launcher's reduce_two: blocks x < outputs are First's output x, the others Second's.
  template <template <typename> class First, template <typename> class Second, typename T>
  void reduce_two(int64_t outputs, const RoundArgs<T>& a) const {
    for (int64_t x = 0; x < 2 * outputs; ++x) {
      if (x < outputs) {
        reduce_output<First, T>(x, outputs, a);
      } else {
        reduce_output<Second, T>(x - outputs, outputs, a);
      }
    }
  }

  template <template <typename> class Term, typename T>
  void reduce_output(int64_t output, int64_t outputs, const RoundArgs<T>& a) const {
    const int64_t chunks = reduction_chunks(outputs, a.batch * a.height * a.width);
    *most_chunks = std::max(*most_chunks, chunks);
    const auto ctx = Term<T>::prepare(a, output);
    double sum = 0.0;
    for (int64_t chunk = 0; chunk < chunks; ++chunk) {
      double block = 0.0;
      for (int64_t t = 0; t < kThreads && ctx.active; ++t) {
        const int64_t first = chunk * kThreads + t, step = chunks * kThreads;
        const double thread_sum = strided_term_sum<Term<T>, double>(a, ctx, first, step);
        // The 64-bit path (taken only past 2^32 indices) must give the same bits.
        *index_types_agree &= thread_sum == strided_term_sum_as<int64_t, Term<T>, double>(a, ctx, first, step);
        block += thread_sum;
      }
      sum += block;
    }
    Term<T>::finish(a, ctx, sum);
  }

  // As the CUDA launcher's reduce_tiled: block (tile, chunk) of 256 threads writes the chunk's sums of the
  // tile's outputs (threads added in thread order), then each output's chunks are added in chunk order and
  // handed to Term::finish.
  template <template <typename> class Term, template <typename, typename> class Tiles, typename T>
  void reduce_tiled(int64_t outputs, const RoundArgs<T>& a) const {
    const int64_t chunks = tiled_chunks<Tiles>(outputs, a);
    std::vector<double> partial(static_cast<size_t>(outputs * chunks), std::nan(""));
    const Tiles<T, double> reduction{a, partial.data(), chunks};
    for (int64_t o = 0; o < Tiles<T, double>::tiles(a) * chunks; ++o) tile_block(reduction, o);
    for (int64_t output = 0; output < outputs; ++output) finish_tiled<Term>(a, partial.data(), output, chunks);
  }

  // As the CUDA launcher's reduce_tiled_two: one buffer, First's partials then Second's; First's tile blocks,
  // then Second's (two launches there); then one chunk pass over First's outputs and Second's.
  template <template <typename> class FirstTerm, template <typename, typename> class FirstTiles,
            template <typename> class SecondTerm, template <typename, typename> class SecondTiles, typename T>
  void reduce_tiled_two(int64_t first_outputs, int64_t second_outputs, const RoundArgs<T>& a) const {
    const int64_t first_chunks = tiled_chunks<FirstTiles>(first_outputs, a);
    const int64_t second_chunks = tiled_chunks<SecondTiles>(second_outputs, a);
    std::vector<double> partial(static_cast<size_t>(first_outputs * first_chunks + second_outputs * second_chunks),
                                std::nan(""));
    double* second_partial = partial.data() + first_outputs * first_chunks;
    const FirstTiles<T, double> first{a, partial.data(), first_chunks};
    const SecondTiles<T, double> second{a, second_partial, second_chunks};
    const int64_t first_blocks = FirstTiles<T, double>::tiles(a) * first_chunks;
    const int64_t blocks = first_blocks + SecondTiles<T, double>::tiles(a) * second_chunks;
    for (int64_t block = 0; block < blocks; ++block) {
      if (block < first_blocks) {
        tile_block(first, block);
      } else {
        tile_block(second, block - first_blocks);
      }
    }
    for (int64_t output = 0; output < first_outputs + second_outputs; ++output) {
      if (output < first_outputs) {
        finish_tiled<FirstTerm>(a, partial.data(), output, first_chunks);
      } else {
        finish_tiled<SecondTerm>(a, second_partial, output - first_outputs, second_chunks);
      }
    }
  }

  template <template <typename, typename> class Tiles, typename T>
  int64_t tiled_chunks(int64_t outputs, const RoundArgs<T>& a) const {
    check(outputs == Tiles<T, double>::covered_outputs(a), "reduce_tiled's outputs are those the tiles cover");
    const int64_t chunks = reduction_chunks(Tiles<T, double>::tiles(a), a.batch * a.height * a.width);
    *most_chunks = std::max(*most_chunks, chunks);
    return chunks;
  }

  // Block o of a multi-sum reduction: its 256 threads' sums added in thread order, then its finish.
  template <typename Reduction>
  static void tile_block(const Reduction& reduction, int64_t o) {
    bnao_test::emulate_block(reduction, o, kThreads);
  }

  // An output's chunks in chunk order, handed to Term::finish (finish_output of the CUDA launcher).
  template <template <typename> class Term, typename T>
  static void finish_tiled(const RoundArgs<T>& a, const double* partial, int64_t output, int64_t chunks) {
    double sum = partial[output * chunks];
    for (int64_t chunk = 1; chunk < chunks; ++chunk) sum += partial[output * chunks + chunk];
    Term<T>::finish(a, Term<T>::prepare(a, output), sum);
  }
};

int64_t g_most_node_chunks = 1;  // the largest split the node-op emulation ran

// The node ops' launcher in the CUDA order: items one by one, two-sum reductions split over chunks of
// 256 threads (as reduce_pair_chunk_kernel + finish_pair_chunks_kernel).
struct EmulatedNodeLauncher {
  template <typename Item>
  void for_each(int64_t count, const Item& item) const {
    for (int64_t e = 0; e < count; ++e) item(e);
  }

  template <typename Acc, typename Reduction>
  void reduce_pairs(int64_t outputs, const Reduction& reduction) const {
    const int64_t chunks = reduction_chunks(outputs, reduction.terms());
    g_most_node_chunks = std::max(g_most_node_chunks, chunks);
    for (int64_t output = 0; output < outputs; ++output) {
      Acc first = Acc(0), second = Acc(0);
      for (int64_t chunk = 0; chunk < chunks; ++chunk) {
        Acc block_first = Acc(0), block_second = Acc(0);
        for (int64_t t = 0; t < kThreads; ++t) {
          Acc a, b;
          reduction.partial(output, chunk * kThreads + t, chunks * kThreads, &a, &b);
          block_first += a;
          block_second += b;
        }
        first += block_first;
        second += block_second;
      }
      reduction.finish(output, first, second);
    }
  }
};

struct EmulatedNodeBackend {
  static constexpr bool is_cuda = false;
  struct NoGuard {};
  static NoGuard guard(const at::Tensor&) { return {}; }
  static EmulatedNodeLauncher launcher(const at::Tensor&) { return {}; }
  static void check_gather_indices(const char*, const at::Tensor&, const at::Tensor&, const std::vector<int64_t>&) {}
  static void check_slot_rows(const at::Tensor&, int64_t) {}
};

double g_tolerance = 1e-10;  // relative to the largest magnitude compared; looser for float32 and bfloat16

void check_close(const at::Tensor& got_in, const at::Tensor& want_in, const std::string& what) {
  const at::Tensor got = got_in.to(at::kDouble), want = want_in.to(at::kDouble);
  const bool same_shape = got.sizes() == want.sizes();
  const double error = same_shape && got.numel() > 0 ? (got - want).abs().max().item<double>() : 0.0;
  const double scale = want.numel() > 0 ? 1.0 + want.abs().max().item<double>() : 1.0;
  check(same_shape && error <= g_tolerance * scale, what + ": max error " + std::to_string(error));
}

// A node code of two branches: kind, kernel, dilation, input, flags and (optionally, else 1) stride per branch.
at::Tensor node_code(const std::vector<std::vector<int32_t>>& branches) {
  at::Tensor code = at::zeros({kNumBranches, kNumFields}, at::kInt);
  for (int b = 0; b < kNumBranches; ++b) {
    int32_t* row = code.data_ptr<int32_t>() + b * kNumFields;
    row[kKind] = branches[b][0];
    row[kKernel] = branches[b][1];
    row[kDilation] = branches[b][2];
    row[kInput] = branches[b][3];
    row[kFlags] = branches[b][4];
    row[kStride] = branches[b].size() > 5 ? branches[b][5] : 1;
    row[kRow] = b;
    row[kBnRow] = -1;
  }
  return code;
}

using ForwardOp = std::tuple<at::Tensor, at::Tensor, at::Tensor>(at::TensorList, const at::Tensor&, int64_t,
                                                                 const at::Tensor&, const at::Tensor&, const Optional&,
                                                                 const Optional&, const Optional&, const Optional&,
                                                                 double, bool);
using BackwardOp = BackwardResult(const at::Tensor&, const at::Tensor&, const at::Tensor&, at::TensorList,
                                  const at::Tensor&, int64_t, const at::Tensor&, const at::Tensor&, const Optional&,
                                  const Optional&, const Optional&, const Optional&, const at::Tensor&,
                                  const at::Tensor&, const at::Tensor&, bool);

using AccumulateOp = std::tuple<at::Tensor, at::Tensor>(at::TensorList, const at::Tensor&, const at::Tensor&,
                                                         const at::Tensor&, at::TensorList, const at::Tensor&,
                                                         const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                         const at::Tensor&, const at::Tensor&, bool, int64_t);

// Round 1's backward adding into gradient buffers (branch_round_backward_accumulate, SourceGrad's one launch per
// run of same-shaped sources), the emulated CUDA order against the CPU kernel: the buffers start from the same
// random values; those below overwrite_below = 1 are overwritten, the others added to (untouched where no
// branch reads the source).
void check_accumulate(const std::string& name, const std::vector<at::Tensor>& sources, const at::Tensor& code,
                      const at::Tensor& dw, const at::Tensor& pw, const at::Tensor& grad_pre,
                      const at::Tensor& grad_mean, const at::Tensor& grad_invstd,
                      const std::tuple<at::Tensor, at::Tensor, at::Tensor>& forward, bool reduction) {
  static const auto accumulate_op =
      c10::Dispatcher::singleton().findSchemaOrThrow("bnao::branch_round_backward_accumulate", "").typed<AccumulateOp>();
  std::vector<at::Tensor> want, got;
  for (const at::Tensor& source : sources) {
    want.push_back(at::randn(source.sizes(), source.options()));
    got.push_back(want.back().clone());
  }
  const auto& [pre, mean, invstd] = forward;
  accumulate_op.call(want, grad_pre, grad_mean, grad_invstd, sources, code, dw, pw, pre, mean, invstd, reduction, 1);
  int64_t most_chunks = 1;
  bool index_types_agree = true, groups_fit = true;
  const EmulatedCudaLauncher emulated{&most_chunks, &index_types_agree, &groups_fit};
  branch_round_backward_impl(emulated, grad_pre, grad_mean, grad_invstd, sources, code, 1, dw, pw, {}, {}, {}, {}, pre,
                             mean, invstd, reduction, got, 1);
  for (size_t s = 0; s < sources.size(); ++s)
    check_close(got[s], want[s], name + " accumulated grad source " + std::to_string(s));
}

// One round forward and backward, the emulated CUDA order against the CPU kernels; returns the largest split.
int64_t check_round(const std::string& name, const std::vector<at::Tensor>& sources, const at::Tensor& code,
                    int64_t round, const std::vector<Optional>& norm, bool reduction = false) {
  static const auto forward_op =
      c10::Dispatcher::singleton().findSchemaOrThrow("bnao::branch_round", "").typed<ForwardOp>();
  static const auto backward_op =
      c10::Dispatcher::singleton().findSchemaOrThrow("bnao::branch_round_backward", "").typed<BackwardOp>();
  const int64_t channels = sources[0].size(round == 1 ? 1 : 2);
  const auto options = at::TensorOptions().dtype(sources[0].scalar_type());
  const auto param_options = at::TensorOptions().dtype(param_dtype(sources[0].scalar_type()));
  const at::Tensor dw = at::randn({kNumBranches, channels, kMaxKernel, kMaxKernel}, param_options);
  const at::Tensor pw = at::randn({kNumBranches, channels, channels}, param_options);
  const double eps = 1e-5;
  int64_t most_chunks = 1;
  bool index_types_agree = true, groups_fit = true;
  const EmulatedCudaLauncher emulated{&most_chunks, &index_types_agree, &groups_fit};

  const auto want =
      forward_op.call(sources, code, round, dw, pw, norm[0], norm[1], norm[2], norm[3], eps, reduction);
  const auto got = branch_round_forward(emulated, sources, code, round, dw, pw, norm[0], norm[1], norm[2], norm[3],
                                        eps, reduction);
  const char* forward_names[] = {"pre", "mean", "invstd"};
  check_close(std::get<0>(got), std::get<0>(want), name + " " + forward_names[0]);
  check_close(std::get<1>(got), std::get<1>(want), name + " " + forward_names[1]);
  check_close(std::get<2>(got), std::get<2>(want), name + " " + forward_names[2]);

  const at::Tensor& pre = std::get<0>(want);
  const at::Tensor grad_pre = at::randn(pre.sizes(), options);
  const at::Tensor grad_mean = at::randn({kNumBranches, channels}, param_options);
  const at::Tensor grad_invstd = at::randn({kNumBranches, channels}, param_options);
  const BackwardResult grads_want =
      backward_op.call(grad_pre, grad_mean, grad_invstd, sources, code, round, dw, pw, norm[0], norm[1], norm[2],
                       norm[3], pre, std::get<1>(want), std::get<2>(want), reduction);
  const BackwardResult grads_got =
      branch_round_backward_impl(emulated, grad_pre, grad_mean, grad_invstd, sources, code, round, dw, pw, norm[0],
                                 norm[1], norm[2], norm[3], pre, std::get<1>(want), std::get<2>(want), reduction);
  const auto& sources_got = std::get<0>(grads_got);
  const auto& sources_want = std::get<0>(grads_want);
  check(sources_got.size() == sources_want.size(), name + ": one source gradient per source");
  for (size_t s = 0; s < std::min(sources_got.size(), sources_want.size()); ++s)
    check_close(sources_got[s], sources_want[s], name + " grad source " + std::to_string(s));
  check_close(std::get<1>(grads_got), std::get<1>(grads_want), name + " grad dw");
  check_close(std::get<2>(grads_got), std::get<2>(grads_want), name + " grad pw");
  check_close(std::get<3>(grads_got), std::get<3>(grads_want), name + " grad in_mean");
  check_close(std::get<4>(grads_got), std::get<4>(grads_want), name + " grad in_invstd");
  check_close(std::get<5>(grads_got), std::get<5>(grads_want), name + " grad in_gamma");
  check_close(std::get<6>(grads_got), std::get<6>(grads_want), name + " grad in_beta");
  check(index_types_agree, name + ": 32-bit and 64-bit index arithmetic give different sums");
  check(groups_fit, name + ": a block's rows or planes overflow its shared memory");
  if (round == 1) check_accumulate(name, sources, code, dw, pw, grad_pre, grad_mean, grad_invstd, want, reduction);
  return most_chunks;
}

// Hand counts of reduction_chunks (kThreads 256, 16 terms per thread at least, 1,024 blocks aimed at, 64 at most).
void test_split() {
  struct Case {
    int64_t outputs, terms, chunks;
    const char* why;
  };
  const Case cases[] = {
      {40, 65536, 16, "BN statistics at C=20, 32x32, batch 64: 65536 / 4096 terms"},
      {40, 262144, 25, "the same at batch 256: floor(1024 / 40)"},
      {800, 65536, 1, "800 outputs: a second chunk would not fill the grid more"},
      {512, 65536, 2, "floor(1024 / 512)"},
      {513, 65536, 1, "floor(1024 / 513)"},
      {1960, 65536, 1, "depthwise weight gradient: the outputs alone fill the target"},
      {40, 4095, 1, "fewer terms than one chunk's minimum"},
      {40, 8192, 2, "exactly two chunks' minimum"},
      {1, int64_t(1) << 40, 64, "the cap"},
      {0, 100, 1, "no outputs"},
      {5, 0, 1, "no terms"},
  };
  for (const Case& c : cases) {
    const int64_t got = reduction_chunks(c.outputs, c.terms);
    check(got == c.chunks, std::string(c.why) + ": got " + std::to_string(got) + ", want " + std::to_string(c.chunks));
  }
}

void test_rounds() {
  at::manual_seed(0);
  const auto options = at::TensorOptions().dtype(at::kDouble);
  // N=5, C=3, 48x48: 11,520 terms per statistic, so every reduction of the round runs as two chunks (4,096
  // terms per chunk at least), the last chunk partial; a 5x5 sep conv and a 3x3 conv of dilation 2.
  const int64_t batch = 5, channels = 3, side = 48;
  const std::vector<at::Tensor> inputs = {at::randn({batch, channels, side, side}, options),
                                          at::randn({batch, channels, side, side}, options)};
  const at::Tensor round1_code = node_code({{kKindSepConv, 5, 1, 0, kFlagBn1}, {kKindDilSepConv, 3, 2, 1, kFlagBn1}});
  const int64_t round1_chunks = check_round("round 1", inputs, round1_code, 1, {{}, {}, {}, {}});
  check(round1_chunks == 2, "round 1 split its reductions in two chunks, got " + std::to_string(round1_chunks));

  // Round 2 with BN1's normalisation applied in the prologue and BN2 (NormShift/NormScale terms); pool
  // branches pass round 1's result through.
  const at::Tensor pre1 = at::randn({kNumBranches, batch, channels, side, side}, options);
  const std::vector<Optional> norm = {at::randn({kNumBranches, channels}, options),
                                      at::rand({kNumBranches, channels}, options) + 0.5,
                                      at::randn({kNumBranches, channels}, options),
                                      at::randn({kNumBranches, channels}, options)};
  const int32_t both = kFlagBn1 | kFlagBn2;
  const at::Tensor round2_code = node_code({{kKindSepConv, 3, 1, 0, both}, {kKindDilSepConv, 5, 2, 1, both}});
  const int64_t round2_chunks = check_round("round 2", {pre1}, round2_code, 2, norm);
  check(round2_chunks == 2, "round 2 split its reductions in two chunks, got " + std::to_string(round2_chunks));
  const at::Tensor pool_code = node_code({{kKindAvgPool, 0, 1, 0, both}, {kKindMaxPool, 0, 1, 1, kFlagBn1}});
  check_round("round 2, pools", {pre1}, pool_code, 2, norm);

  // A reduction cell's round 1 at C=10 (two 8 x 8 tiles per side of the pointwise gradient, the reduce's even and
  // odd halves meeting inside the first tile) from 127 x 127 inputs (64 x 64 out, the last odd pixel past the
  // edge): a factorized reduce and a stride-2 sep conv.
  const std::vector<at::Tensor> wide = {at::randn({2, 10, 127, 127}, options), at::randn({2, 10, 127, 127}, options)};
  const at::Tensor reduce_code =
      node_code({{kKindIdentity, 0, 1, 0, kFlagBn1, 2}, {kKindSepConv, 3, 1, 1, kFlagBn1, 2}});
  const int64_t reduce_chunks = check_round("reduction round 1", wide, reduce_code, 1, {{}, {}, {}, {}}, true);
  check(reduce_chunks == 2, "the reduction round split its reductions in two chunks, got " +
                                std::to_string(reduce_chunks));
  // C=16: the reduce's halves meet exactly at a tile edge; a dilated 5x5 sep conv at stride 2.
  const std::vector<at::Tensor> sixteen = {at::randn({2, 16, 127, 127}, options),
                                           at::randn({2, 16, 127, 127}, options)};
  const at::Tensor dilated_code =
      node_code({{kKindIdentity, 0, 1, 1, kFlagBn1, 2}, {kKindDilSepConv, 5, 2, 0, kFlagBn1, 2}});
  check_round("reduction round 1, C=16", sixteen, dilated_code, 1, {{}, {}, {}, {}}, true);

  // Node 2 of a normal cell (4 sources of one shape: one SourceGrad launch) and of a reduction cell (the
  // 12 x 12 inputs, then the 6 x 6 nodes: two launches), the branches reading a node and an input.
  const auto states = [&](int64_t input_side, int64_t node_side) {
    return std::vector<at::Tensor>{at::randn({2, channels, input_side, input_side}, options),
                                   at::randn({2, channels, input_side, input_side}, options),
                                   at::randn({2, channels, node_side, node_side}, options),
                                   at::randn({2, channels, node_side, node_side}, options)};
  };
  check_round("node 2 of a normal cell", states(12, 12),
              node_code({{kKindSepConv, 3, 1, 3, kFlagBn1}, {kKindMaxPool, 0, 1, 1, 0}}), 1, {{}, {}, {}, {}});
  check_round("node 2 of a reduction cell", states(12, 6),
              node_code({{kKindSepConv, 5, 1, 2, kFlagBn1, 1}, {kKindAvgPool, 0, 1, 0, 0, 2}}), 1, {{}, {}, {}, {}},
              true);

  // A small round: one chunk, the one-block-per-output path.
  const std::vector<at::Tensor> small = {at::randn({2, channels, 6, 6}, options), at::randn({2, channels, 6, 6}, options)};
  const int64_t small_chunks = check_round("small round 1", small, round1_code, 1, {{}, {}, {}, {}});
  check(small_chunks == 1, "a small round runs one chunk, got " + std::to_string(small_chunks));
  // Kernel sizes without their own unrolling of the depthwise weight gradient's taps (GradDwTiles): the
  // whole 7 x 7 slab, with the taps past a 1 x 1 corner adding nothing.
  const at::Tensor slab_code = node_code({{kKindSepConv, 7, 1, 0, kFlagBn1}, {kKindSepConv, 1, 1, 1, kFlagBn1}});
  check_round("small round 1, 7x7 and 1x1 sep convs", small, slab_code, 1, {{}, {}, {}, {}});
}

// The same emulation in float32 and bfloat16 (the dtypes a GPU trains in): the tile bodies' loads, casts and
// stores of each activation type, against the CPU kernels at a tolerance for the type (the emulated sums
// are in double, so this does not check float accumulation).
void test_float_rounds() {
  at::manual_seed(2);
  const auto options = at::TensorOptions().dtype(at::kDouble);
  const at::Tensor normal_code = node_code({{kKindSepConv, 5, 1, 0, kFlagBn1}, {kKindDilSepConv, 3, 2, 1, kFlagBn1}});
  const at::Tensor reduce_code =
      node_code({{kKindIdentity, 0, 1, 0, kFlagBn1, 2}, {kKindSepConv, 3, 1, 1, kFlagBn1, 2}});
  const int32_t both = kFlagBn1 | kFlagBn2;
  const at::Tensor round2_code = node_code({{kKindSepConv, 3, 1, 0, both}, {kKindSepConv, 5, 1, 1, both}});
  const std::vector<at::Tensor> inputs = {at::randn({3, 10, 40, 40}, options), at::randn({3, 10, 40, 40}, options)};
  const at::Tensor pre1 = at::randn({kNumBranches, 3, 10, 40, 40}, options);
  const std::vector<Optional> norm = {at::randn({kNumBranches, 10}), at::rand({kNumBranches, 10}) + 0.5,
                                      at::randn({kNumBranches, 10}), at::randn({kNumBranches, 10})};
  const std::pair<at::ScalarType, double> types[] = {{at::kFloat, 1e-5}, {at::kBFloat16, 1e-3}};
  for (const auto& [type, tolerance] : types) {
    g_tolerance = tolerance;
    const std::string name = type == at::kFloat ? "float32" : "bfloat16";
    const std::vector<at::Tensor> sources = {inputs[0].to(type), inputs[1].to(type)};
    check_round(name + " round 1", sources, normal_code, 1, {{}, {}, {}, {}});
    check_round(name + " reduction round 1", sources, reduce_code, 1, {{}, {}, {}, {}}, true);
    check_round(name + " round 2", {pre1.to(type)}, round2_code, 2, norm);
  }
  g_tolerance = 1e-10;
}

// node_output's backward at N=5, C=3, 50x50: 12,500 terms per (branch, channel), three chunks with a short last
// one; BN2 on one branch or both, drop-path masks.
void test_node_output_backward() {
  using NodeBackwardOp = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
      const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
      const at::Tensor&, const Optional&);
  static const auto backward_op =
      c10::Dispatcher::singleton().findSchemaOrThrow("bnao::node_output_backward", "").typed<NodeBackwardOp>();
  at::manual_seed(1);
  const auto options = at::TensorOptions().dtype(at::kDouble);
  const int64_t batch = 5, channels = 3, side = 50;
  const int32_t bn_drop = kFlagBn1 | kFlagBn2 | kFlagDrop;
  const std::vector<at::Tensor> codes = {
      node_code({{kKindSepConv, 3, 1, 0, bn_drop}, {kKindAvgPool, 0, 1, 1, kFlagDrop}}),
      node_code({{kKindSepConv, 5, 1, 0, bn_drop}, {kKindSepConv, 3, 1, 1, kFlagBn1 | kFlagBn2}})};
  for (size_t k = 0; k < codes.size(); ++k) {
    const at::Tensor pre = at::randn({kNumBranches, batch, channels, side, side}, options);
    const at::Tensor grad = at::randn({batch, channels, side, side}, options);
    const at::Tensor mean = at::randn({kNumBranches, channels}, options);
    const at::Tensor invstd = at::rand({kNumBranches, channels}, options) + 0.5;
    const at::Tensor gamma = at::randn({kNumBranches, channels}, options);
    const Optional mask = (at::rand({batch, kNumBranches}, options) > 0.3).to(at::kDouble) * 1.5;
    const auto want = backward_op.call(grad, pre, codes[k], mean, invstd, gamma, mask);
    const auto got = node_output_backward_kernel<EmulatedNodeBackend>(grad, pre, codes[k], mean, invstd, gamma, mask);
    const std::string name = "node_output_backward code " + std::to_string(k);
    check_close(std::get<0>(got), std::get<0>(want), name + " grad pre");
    check_close(std::get<1>(got), std::get<1>(want), name + " grad mean");
    check_close(std::get<2>(got), std::get<2>(want), name + " grad invstd");
    check_close(std::get<3>(got), std::get<3>(want), name + " grad gamma");
    check_close(std::get<4>(got), std::get<4>(want), name + " grad beta");
  }
  check(g_most_node_chunks == 3, "node_output_backward split its sums in three chunks, got " +
                                     std::to_string(g_most_node_chunks));
}

}  // namespace

int main() {
  test_split();
  test_rounds();
  test_float_rounds();
  test_node_output_backward();
  return bnao_test::finish("test_reduction_split");
}
