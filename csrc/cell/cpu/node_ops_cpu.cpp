// CPU kernels of bnao::gather_rows, bnao::node_output, bnao::update_slot_stats and
// bnao::combine (and their backwards): the host side of cell/node_ops_host.h and cell/combine_ops.h on a backend of
// at::parallel_for. Every output element is written by exactly one work item and
// every reduction runs in a fixed order, so results do not depend on the thread
// count. Index values are checked here, on the host, before any write.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <cstdint>
#include <vector>

#include "cell/combine_ops.h"
#include "cell/node_ops_host.h"

namespace bnao {
namespace cell {
namespace {

constexpr int64_t kGrain = 16384;

struct CpuLauncher {
  template <typename Item>
  void for_each(int64_t count, const Item& item) const {
    at::parallel_for(0, count, kGrain, [&](int64_t begin, int64_t end) {
      for (int64_t e = begin; e < end; ++e) item(e);
    });
  }

  // Reductions with Reduction::kSums sums per output (a tile of weights): each output on one thread, and
  // outputs spread one by one over the threads (each is heavy: a grain of kGrain would serialise them).
  template <typename Acc, typename Reduction>
  void reduce_many(int64_t outputs, const Reduction& reduction) const {
    at::parallel_for(0, outputs, 1, [&](int64_t begin, int64_t end) {
      for (int64_t output = begin; output < end; ++output) {
        Acc sums[Reduction::kSums];
        reduction.partial_sums(output, 0, 1, sums);
        reduction.finish(output, sums);
      }
    });
  }

  // The same for reductions with two sums per output.
  template <typename Acc, typename Reduction>
  void reduce_pairs(int64_t outputs, const Reduction& reduction) const {
    at::parallel_for(0, outputs, 1, [&](int64_t begin, int64_t end) {
      for (int64_t output = begin; output < end; ++output) {
        Acc first, second;
        reduction.partial(output, 0, 1, &first, &second);
        reduction.finish(output, first, second);
      }
    });
  }
};

struct CpuBackend {
  static constexpr bool is_cuda = false;
  struct NoGuard {};
  static NoGuard guard(const at::Tensor&) { return {}; }
  static CpuLauncher launcher(const at::Tensor&) { return {}; }

  // Bounds, and unique rows per stack: the precondition of the backward's plain writes.
  static void check_gather_indices(const char* op, const at::Tensor& select, const at::Tensor& rows,
                                   const std::vector<int64_t>& stack_rows) {
    const int64_t* sel = select.data_ptr<int64_t>();
    const int64_t* row = rows.data_ptr<int64_t>();
    std::vector<std::vector<bool>> seen(stack_rows.size());
    for (size_t s = 0; s < stack_rows.size(); ++s) seen[s].assign(static_cast<size_t>(stack_rows[s]), false);
    const int64_t num_stacks = static_cast<int64_t>(stack_rows.size());
    for (int64_t r = 0; r < select.numel(); ++r) {
      const int64_t s = sel[r];
      if (s < 0) continue;
      TORCH_CHECK(s < num_stacks, "bnao::", op, ": select[", r, "] = ", s, " but there are ", num_stacks, " stacks");
      TORCH_CHECK(row[r] >= 0 && row[r] < stack_rows[s], "bnao::", op, ": rows[", r, "] = ", row[r],
                  " is outside stack ", s, "'s ", stack_rows[s], " rows");
      TORCH_CHECK(!seen[s][row[r]], "bnao::", op, ": row ", row[r], " of stack ", s,
                  " is selected twice; rows must be unique per stack (a slot is used once per cell)");
      seen[s][row[r]] = true;
    }
  }

  // Bounds, and each running-statistics row updated at most once per call.
  static void check_slot_rows(const at::Tensor& bn_rows, int64_t num_rows) {
    const int64_t* row = bn_rows.data_ptr<int64_t>();
    std::vector<bool> seen(static_cast<size_t>(num_rows), false);
    for (int64_t k = 0; k < bn_rows.numel(); ++k) {
      if (row[k] < 0) continue;
      TORCH_CHECK(row[k] < num_rows, "bnao::update_slot_stats: bn_rows[", k, "] = ", row[k], " is outside the ",
                  num_rows, " running-statistics rows");
      TORCH_CHECK(!seen[row[k]], "bnao::update_slot_stats: row ", row[k],
                  " appears twice in bn_rows; each slot BN is updated once per call");
      seen[row[k]] = true;
    }
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(bnao, CPU, m) {
  BNAO_REGISTER_NODE_OPS(m, CpuBackend);
  BNAO_REGISTER_COMBINE(m, CpuBackend);
}

}  // namespace cell
}  // namespace bnao
