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
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> branch_round_cpu(
    at::TensorList sources, const at::Tensor& code, int64_t round, const at::Tensor& dw, const at::Tensor& pw,
    const OptionalTensor& in_mean, const OptionalTensor& in_invstd, const OptionalTensor& in_gamma,
    const OptionalTensor& in_beta, double eps, bool reduction) {
  return branch_round_forward(CpuLauncher{}, sources, code, round, dw, pw, in_mean, in_invstd, in_gamma, in_beta,
                              eps, reduction);
}

BackwardResult branch_round_backward_cpu(const at::Tensor& grad_pre, const at::Tensor& grad_mean,
                                         const at::Tensor& grad_invstd, at::TensorList sources,
                                         const at::Tensor& code, int64_t round, const at::Tensor& dw,
                                         const at::Tensor& pw, const OptionalTensor& in_mean,
                                         const OptionalTensor& in_invstd, const OptionalTensor& in_gamma,
                                         const OptionalTensor& in_beta, const at::Tensor& pre,
                                         const at::Tensor& mean, const at::Tensor& invstd, bool reduction) {
  return branch_round_backward_impl(CpuLauncher{}, grad_pre, grad_mean, grad_invstd, sources, code, round, dw, pw,
                                    in_mean, in_invstd, in_gamma, in_beta, pre, mean, invstd, reduction);
}

std::tuple<at::Tensor, at::Tensor> branch_round_backward_accumulate_cpu(
    at::TensorList grad_sources, const at::Tensor& grad_pre, const at::Tensor& grad_mean,
    const at::Tensor& grad_invstd, at::TensorList sources, const at::Tensor& code, const at::Tensor& dw,
    const at::Tensor& pw, const at::Tensor& pre, const at::Tensor& mean, const at::Tensor& invstd, bool reduction,
    int64_t overwrite_below) {
  TORCH_CHECK(!grad_sources.empty(), "bnao::branch_round_backward_accumulate: grad_sources is empty");
  const BackwardResult grads =
      branch_round_backward_impl(CpuLauncher{}, grad_pre, grad_mean, grad_invstd, sources, code, 1, dw, pw, {}, {},
                                 {}, {}, pre, mean, invstd, reduction, grad_sources,
                                 overwrite_below);
  return {std::get<1>(grads), std::get<2>(grads)};
}

}  // namespace

TORCH_LIBRARY_IMPL(bnao, CPU, m) {
  m.impl("branch_round", &branch_round_cpu);
  m.impl("branch_round_backward", &branch_round_backward_cpu);
  m.impl("branch_round_backward_accumulate", &branch_round_backward_accumulate_cpu);
}

}  // namespace cell
}  // namespace bnao
