// CPU kernels of bnao::alias_table and bnao::alias_draw (see sampler/alias.h
// for the table layout and the random-number contract).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <vector>

#include "sampler/alias.h"
#include "sampler/alias_checks.h"

namespace bnao {
namespace {

using alias::WeightsProblem;

at::Tensor alias_table_cpu(const at::Tensor& weights) {
  TORCH_CHECK(weights.dim() == 1,
              "bnao::alias_table: weights must be a 1-D tensor with one weight per item, got shape ",
              weights.sizes(), "; flatten it (weights.reshape(-1)) or pass one row");
  TORCH_CHECK(at::isFloatingType(weights.scalar_type()),
              "bnao::alias_table: weights must be a floating-point tensor, got ", weights.scalar_type(),
              "; convert it with weights.double()");
  TORCH_CHECK(weights.numel() > 0, "bnao::alias_table: weights are empty; pass at least one item");
  TORCH_CHECK(static_cast<uint64_t>(weights.numel()) <= alias::kMaxItems,
              "bnao::alias_table: at most 2^32 - 1 items are supported, got ", weights.numel(),
              "; split the pool");
  // The build works in double whatever the input type, so float32 and float64
  // weights of the same values give the same table.
  const at::Tensor w = weights.to(at::kDouble).contiguous();
  const uint64_t n = static_cast<uint64_t>(w.numel());
  const double* data = w.data_ptr<double>();

  double sum = 0.0;
  uint64_t bad = 0;
  const WeightsProblem problem = alias::check_weights(data, n, &sum, &bad);
  switch (problem) {
    case WeightsProblem::kNone:
      break;
    case WeightsProblem::kEmpty:
      TORCH_CHECK(false, "bnao::alias_table: weights are empty; pass at least one item");
    case WeightsProblem::kTooMany:
      TORCH_CHECK(false, "bnao::alias_table: too many items; split the pool");
    case WeightsProblem::kNotFinite:
      if (bad == n) {
        TORCH_CHECK(false, "bnao::alias_table: the weights sum to infinity; divide them by their maximum");
      }
      TORCH_CHECK(false, "bnao::alias_table: weight ", bad, " is ", data[bad],
                  "; every weight must be finite (replace NaN/inf, e.g. with torch.nan_to_num)");
    case WeightsProblem::kNegative:
      TORCH_CHECK(false, "bnao::alias_table: weight ", bad, " is negative (", data[bad],
                  "); weights must be >= 0 (use 0 to exclude an item)");
    case WeightsProblem::kZeroSum:
      TORCH_CHECK(false, "bnao::alias_table: all weights are zero; give at least one item a positive weight");
  }

  at::Tensor table = at::empty({static_cast<int64_t>(n)}, w.options().dtype(at::kLong));
  std::vector<double> work(n);
  std::vector<uint32_t> stack(n);
  alias::build_table(data, n, sum, reinterpret_cast<uint64_t*>(table.data_ptr<int64_t>()), work.data(),
                     stack.data());
  return table;
}

// Draws [begin, end) of the stream into result. Same indices as
// alias::draw_one, computed in two passes per block: first the random words and
// columns (with a prefetch of each column), then the table lookups. A large
// table (8 MB at 1e6 items) misses the caches on every draw; issuing a block
// of prefetches before the first lookup overlaps those misses instead of
// paying them one after another behind the Philox arithmetic.
//
// A column whose alias is not below n (a table not built by alias_table) is
// never returned: the draw yields the column itself and the column is recorded
// in `first_bad` (the smallest such column wins, so the error is the same at any
// thread count), for the caller to raise.
void draw_range(const uint64_t* columns, uint64_t n, uint64_t key, uint64_t base, int64_t begin, int64_t end,
                int64_t* result, std::atomic<uint64_t>* first_bad) {
  constexpr int64_t kBlock = 64;
  uint64_t picked[kBlock];
  uint32_t coins[kBlock];
  for (int64_t start = begin; start < end; start += kBlock) {
    const int64_t count = std::min<int64_t>(kBlock, end - start);
    for (int64_t j = 0; j < count; ++j) {
      const alias::Philox4 r = alias::philox_for_draw(key, base + static_cast<uint64_t>(start + j));
      picked[j] = alias::draw_column(r, n);
      coins[j] = r.v[2];
#if defined(__GNUC__) || defined(__clang__)
      __builtin_prefetch(columns + picked[j]);
#endif
    }
    for (int64_t j = 0; j < count; ++j) {
      const uint64_t packed = columns[picked[j]];
      const uint64_t alias_index = alias::column_alias(packed);
      const bool keep = coins[j] < alias::column_threshold(packed);
      if (!keep && alias_index >= n) {
        uint64_t seen = first_bad->load();
        while (picked[j] < seen && !first_bad->compare_exchange_weak(seen, picked[j])) {
        }
        result[start + j] = static_cast<int64_t>(picked[j]);
        continue;
      }
      result[start + j] = keep ? static_cast<int64_t>(picked[j]) : static_cast<int64_t>(alias_index);
    }
  }
}

at::Tensor alias_draw_cpu(const at::Tensor& table, int64_t num_draws, int64_t seed, int64_t offset) {
  check_alias_draw_args(table, num_draws, offset);
  const at::Tensor t = table.contiguous();
  at::Tensor out = at::empty({num_draws}, t.options());
  if (num_draws == 0) return out;
  const uint64_t* columns = reinterpret_cast<const uint64_t*>(t.data_ptr<int64_t>());
  const uint64_t n = static_cast<uint64_t>(t.numel());
  // The seed is a 64-bit key: negative Python ints map to their two's complement.
  const uint64_t key = static_cast<uint64_t>(seed);
  const uint64_t base = static_cast<uint64_t>(offset);
  int64_t* result = out.data_ptr<int64_t>();
  // Draws are independent (counter-based), so any split gives the same output;
  // the grain keeps small requests (the sampler's buffer refills) on one thread.
  constexpr int64_t kGrain = 32768;
  std::atomic<uint64_t> first_bad{n};
  at::parallel_for(0, num_draws, kGrain, [&](int64_t begin, int64_t end) {
    draw_range(columns, n, key, base, begin, end, result, &first_bad);
  });
  const uint64_t bad = first_bad.load();
  TORCH_CHECK(bad == n, "bnao::alias_draw: table column ", bad, " aliases item ",
              alias::column_alias(columns[bad]), ", outside the table's ", n,
              " items; the table was not built by bnao::alias_table (rebuild it from the weights)");
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(bnao, CPU, m) {
  m.impl("alias_table", &alias_table_cpu);
  m.impl("alias_draw", &alias_draw_cpu);
}

}  // namespace bnao
