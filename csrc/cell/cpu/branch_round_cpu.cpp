// CPU kernels of bnao::branch_round and bnao::branch_round_backward: the
// bodies of cell/branch_round.h run under at::parallel_for.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstdint>

#include "cell/branch_round.h"
#include "cell/branch_round_ops.h"

namespace bnao {
namespace cell {
namespace {

// Rows per task: a row is Wo elements, each from a copy to a C-term dot product or a 7x7 tap
// loop, so a few rows already amortise a task.
constexpr int64_t kRowGrain = 16;

// Kept out of line (one symbol per body) so that profiles show which phase costs what.
#if defined(__GNUC__) || defined(__clang__)
#define BNAO_CELL_PHASE __attribute__((noinline))
#else
#define BNAO_CELL_PHASE
#endif

// Rows [begin, end): each row decoded once (Body::row), then its columns (Body::run_columns).
template <template <typename> class Body, typename T>
BNAO_CELL_PHASE void run_rows(const RoundArgs<T>& a, int64_t begin, int64_t end, int64_t columns) {
  for (int64_t index = begin; index < end; ++index) {
    const typename Body<T>::Row row = Body<T>::row(a, index);
    Body<T>::run_columns(a, row, 0, columns);
  }
}

// One output's terms: the row sums (in T) added in (n, i) order in double.
template <template <typename> class Term, typename T>
BNAO_CELL_PHASE double sum_terms(const RoundArgs<T>& a, const typename Term<T>::Context& ctx) {
  double sum = 0.0;
  for (int64_t n = 0; n < a.batch; ++n)
    for (int64_t i = 0; i < a.height; ++i) sum += static_cast<double>(Term<T>::row_sum(a, ctx, n, i));
  return sum;
}

struct CpuLauncher {
  template <template <typename> class Body, typename T>
  void for_each(int64_t rows, int64_t columns, const RoundArgs<T>& a) const {
    at::parallel_for(0, rows, kRowGrain, [&](int64_t begin, int64_t end) {
      run_rows<Body, T>(a, begin, end, columns);
    });
  }

  // One output per iteration, on one thread: the result does not depend on the thread count.
  template <template <typename> class Term, typename T>
  void reduce(int64_t outputs, const RoundArgs<T>& a) const {
    at::parallel_for(0, outputs, 1, [&](int64_t begin, int64_t end) {
      for (int64_t output = begin; output < end; ++output) {
        const auto ctx = Term<T>::prepare(a, output);
        const double sum = ctx.active ? sum_terms<Term, T>(a, ctx) : 0.0;
        Term<T>::finish(a, ctx, sum);
      }
    });
  }

  // The CPU runs Body itself: its row loops already stream each channel row once, vectorised.
  template <template <typename> class Body, template <typename> class Tiles, typename T>
  void for_each_tiled(int64_t rows, int64_t columns, const RoundArgs<T>& a) const {
    for_each<Body, T>(rows, columns, a);
  }

  // The CPU runs Term itself: its row sums already read each row once per output, vectorised.
  template <template <typename> class Term, template <typename, typename> class Tiles, typename T>
  void reduce_tiled(int64_t outputs, const RoundArgs<T>& a) const {
    reduce<Term, T>(outputs, a);
  }

  // Two independent reductions, one after the other (the CUDA launcher fuses their launches).
  template <template <typename> class First, template <typename> class Second, typename T>
  void reduce_two(int64_t outputs, const RoundArgs<T>& a) const {
    reduce<First, T>(outputs, a);
    reduce<Second, T>(outputs, a);
  }

  template <template <typename> class FirstTerm, template <typename, typename> class FirstTiles,
            template <typename> class SecondTerm, template <typename, typename> class SecondTiles, typename T>
  void reduce_tiled_two(int64_t first_outputs, int64_t second_outputs, const RoundArgs<T>& a) const {
    reduce<FirstTerm, T>(first_outputs, a);
    reduce<SecondTerm, T>(second_outputs, a);
  }
};

// The CPU backend of the kernels of cell/branch_round_ops.h.
struct CpuBackend {
  struct NoGuard {};
  static NoGuard guard(const at::Tensor&) { return {}; }
  static CpuLauncher launcher(const at::Tensor&) { return {}; }
};

}  // namespace

TORCH_LIBRARY_IMPL(bnao, CPU, m) { BNAO_REGISTER_BRANCH_ROUND(m, CpuBackend); }

}  // namespace cell
}  // namespace bnao
