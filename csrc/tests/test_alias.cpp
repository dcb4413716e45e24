// Unit tests of the alias-method core (sampler/alias.h) and of the CPU kernels
// behind torch.ops.bnao.alias_table / alias_draw. Plain executable: prints each
// failure and returns non-zero when any check failed.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "sampler/alias.h"
#include "tests/check.h"

namespace {

using bnao_test::check;

std::string hex4(const bnao::alias::Philox4& r) {
  char buf[64];
  std::snprintf(buf, sizeof(buf), "%08x %08x %08x %08x", r.v[0], r.v[1], r.v[2], r.v[3]);
  return buf;
}

// Known-answer vectors of philox4x32-10 from Random123 (kat_vectors).
void test_philox_known_answers() {
  struct Kat {
    uint32_t ctr[4];
    uint32_t key[2];
    uint32_t expected[4];
  };
  const Kat kats[] = {
      {{0u, 0u, 0u, 0u}, {0u, 0u}, {0x6627e8d5u, 0xe169c58du, 0xbc57ac4cu, 0x9b00dbd8u}},
      {{0xffffffffu, 0xffffffffu, 0xffffffffu, 0xffffffffu},
       {0xffffffffu, 0xffffffffu},
       {0x408f276du, 0x41c83b0eu, 0xa20bc7c6u, 0x6d5451fdu}},
      {{0x243f6a88u, 0x85a308d3u, 0x13198a2eu, 0x03707344u},
       {0xa4093822u, 0x299f31d0u},
       {0xd16cfe09u, 0x94fdccebu, 0x5001e420u, 0x24126ea1u}},
  };
  for (const Kat& kat : kats) {
    bnao::alias::Philox4 ctr{{kat.ctr[0], kat.ctr[1], kat.ctr[2], kat.ctr[3]}};
    const bnao::alias::Philox4 got = bnao::alias::philox4x32_10(ctr, kat.key[0], kat.key[1]);
    const bnao::alias::Philox4 want{{kat.expected[0], kat.expected[1], kat.expected[2], kat.expected[3]}};
    check(got.v[0] == want.v[0] && got.v[1] == want.v[1] && got.v[2] == want.v[2] && got.v[3] == want.v[3],
          "philox KAT: got " + hex4(got) + ", want " + hex4(want));
  }
  // The draw layout: counter = {index lo, index hi, 0, 0}, key = {seed lo, seed hi}.
  const uint64_t seed = 0x299f31d0a4093822ull, index = 0x85a308d3243f6a88ull;
  const bnao::alias::Philox4 a = bnao::alias::philox_for_draw(seed, index);
  const bnao::alias::Philox4 b =
      bnao::alias::philox4x32_10({{0x243f6a88u, 0x85a308d3u, 0u, 0u}}, 0xa4093822u, 0x299f31d0u);
  check(a.v[0] == b.v[0] && a.v[1] == b.v[1] && a.v[2] == b.v[2] && a.v[3] == b.v[3],
        "philox_for_draw splits seed and index into low/high words");
}

void test_mulhi64() {
  using bnao::alias::mulhi64;
  check(mulhi64(0, 12345) == 0, "mulhi64(0, x) == 0");
  check(mulhi64(~0ull, ~0ull) == 0xfffffffffffffffeull, "mulhi64(max, max)");
  check(mulhi64(1ull << 63, 10) == 5, "mulhi64(2^63, 10) == 5");
  check(mulhi64(~0ull, 1000) == 999, "mulhi64(2^64-1, n) == n - 1 (column stays below n)");
}

// Probability of each item implied by a packed table, times n * 2^32 (exact in
// long double for the sizes tested here).
std::vector<long double> implied_mass(const std::vector<uint64_t>& table) {
  const size_t n = table.size();
  std::vector<long double> mass(n, 0.0L);
  for (size_t c = 0; c < n; ++c) {
    const uint32_t t = bnao::alias::column_threshold(table[c]);
    const uint32_t a = bnao::alias::column_alias(table[c]);
    if (a >= n) continue;  // reported by the caller
    if (a == c) {
      mass[c] += 4294967296.0L;  // aliasing itself: the whole column, whatever the coin
    } else {
      mass[c] += t;
      mass[a] += 4294967296.0L - t;
    }
  }
  return mass;
}

// Checks that the column masses of `table` reconstruct `weights` to within the
// flooring of each threshold.
void check_mass_reconstructs(const std::vector<uint64_t>& table, const std::vector<double>& weights,
                             const std::string& name) {
  const size_t n = weights.size();
  check(table.size() == n, name + ": one column per weight");
  if (table.size() != n) return;
  long double sum = 0.0L;
  for (double w : weights) sum += w;
  const std::vector<long double> mass = implied_mass(table);
  // Columns donating to each item: every donation loses at most one 2^-32 unit
  // to the floor of its threshold (plus double rounding far below that).
  std::vector<int> donors(n, 0);
  bool aliases_in_range = true;
  for (size_t c = 0; c < n; ++c) {
    const uint32_t a = bnao::alias::column_alias(table[c]);
    aliases_in_range &= a < n;
    if (a < n && a != c) ++donors[a];
  }
  check(aliases_in_range, name + ": every alias is an item index");
  if (!aliases_in_range) return;
  bool zeros_massless = true;
  int bad = 0;
  long double worst = 0.0L;
  for (size_t i = 0; i < n; ++i) {
    const long double target = weights[i] / sum * n * 4294967296.0L;
    const long double err = std::fabs(mass[i] - target);
    const long double allowed = (donors[i] + 1) * 1.0L + 1e-6L * n;
    if (err > worst) worst = err;
    if (err > allowed) ++bad;
    if (weights[i] == 0.0) zeros_massless &= mass[i] == 0.0L;
  }
  check(zeros_massless, name + ": zero-weight items have zero mass");
  char msg[160];
  std::snprintf(msg, sizeof(msg), "%s: column masses reconstruct the weights (worst %.3Lg units of 2^-32/n, %d bad)",
                name.c_str(), worst, bad);
  check(bad == 0, msg);
}

void check_table_reconstructs(const std::vector<double>& weights, const std::string& name) {
  std::vector<uint64_t> table;
  const auto problem = bnao::alias::build_table(weights, &table);
  check(problem == bnao::alias::WeightsProblem::kNone, name + ": build accepted the weights");
  if (problem != bnao::alias::WeightsProblem::kNone) return;
  check_mass_reconstructs(table, weights, name);
}

// A table built by hand for weights {1, 0, 2, 7}: n = 4, scale = 4 / 10 = 0.4,
// scaled weights {0.4, 0, 0.8, 2.8}. Small stack [0, 1, 2], large stack [3];
// Vose pops small from the top: column 2 keeps 0.8 and aliases 3 (3 keeps 2.6),
// column 1 keeps 0 and aliases 3 (1.6 left), column 0 keeps 0.4 and aliases 3
// (1.0 left: column 3 aliases itself with the full threshold).
// Thresholds: floor(0.4 * 2^32) = floor(1717986918.4) = 1717986918,
//             floor(0.8 * 2^32) = floor(3435973836.8) = 3435973836.
const std::vector<double> kHandWeights = {1.0, 0.0, 2.0, 7.0};
const std::vector<uint64_t> kHandTable = {
    (uint64_t{1717986918u} << 32) | 3u,
    (uint64_t{0u} << 32) | 3u,
    (uint64_t{3435973836u} << 32) | 3u,
    (uint64_t{0xffffffffu} << 32) | 3u,
};

// Draw `index` of stream `seed` from kHandTable, written out independently of
// draw_one: Philox4x32-10 of counter {index lo, index hi, 0, 0} under key
// {seed lo, seed hi}; with n = 4 the column, hi64(((r1 << 32) | r0) * 4), is the
// top two bits of r1; the coin r2 keeps the column below its threshold.
int64_t hand_draw(uint64_t seed, uint64_t index) {
  const bnao::alias::Philox4 r = bnao::alias::philox4x32_10(
      {{static_cast<uint32_t>(index), static_cast<uint32_t>(index >> 32), 0u, 0u}}, static_cast<uint32_t>(seed),
      static_cast<uint32_t>(seed >> 32));
  const uint32_t column = r.v[1] >> 30;
  const uint32_t threshold = static_cast<uint32_t>(kHandTable[column] >> 32);
  return r.v[2] < threshold ? column : 3;
}

// Draws 1000..1015 of stream 42 from kHandTable, from the Philox words
// (r1, r2) = (ae44bf6c, b9b0a1bb): column 2, 0xb9b0a1bb < 3435973836 -> 2;
// (c7ab26e1, ...) column 3 -> 3; (3e653544, 257c25ff): column 0, kept -> 0;
// (7de38665, ...) column 1 (threshold 0) -> 3; (1a4bbc65, d647ff7a): column 0,
// 0xd647ff7a >= 1717986918 -> 3; ... (words from the NumPy Philox of
// bnao/ops/sampler.py, itself checked against the Random123 known answers).
const int64_t kHandDraws42From1000[16] = {2, 3, 0, 3, 3, 3, 3, 3, 3, 3, 3, 3, 2, 3, 2, 2};

void test_table_properties() {
  std::mt19937_64 rng(7);
  check_table_reconstructs({1.0}, "n=1");
  check_table_reconstructs(std::vector<double>(1000, 3.5), "flat");
  {
    std::vector<double> w(5000);
    std::exponential_distribution<double> e(1.0);
    for (double& x : w) x = std::exp(3.0 * e(rng));  // Pareto-like heavy tail
    check_table_reconstructs(w, "heavy-tailed");
  }
  {
    std::vector<double> w(1000, 1e-6);
    w[17] = 1e6;
    check_table_reconstructs(w, "one dominant");
  }
  {
    std::vector<double> w(2000);
    std::uniform_real_distribution<double> u(0.0, 1.0);
    for (size_t i = 0; i < w.size(); ++i) w[i] = (i % 3 == 0) ? 0.0 : u(rng);
    check_table_reconstructs(w, "some zeros");
  }
  {
    std::vector<double> w(100000);
    std::uniform_int_distribution<int64_t> sizes(100000, 5000000);
    for (double& x : w) x = static_cast<double>(sizes(rng));
    check_table_reconstructs(w, "model sizes 1e5");
  }
  // Rejected inputs.
  std::vector<uint64_t> table;
  check(bnao::alias::build_table({}, &table) == bnao::alias::WeightsProblem::kEmpty, "empty rejected");
  check(bnao::alias::build_table({1.0, -1.0}, &table) == bnao::alias::WeightsProblem::kNegative, "negative rejected");
  check(bnao::alias::build_table({1.0, NAN}, &table) == bnao::alias::WeightsProblem::kNotFinite, "NaN rejected");
  check(bnao::alias::build_table({INFINITY}, &table) == bnao::alias::WeightsProblem::kNotFinite, "inf rejected");
  check(bnao::alias::build_table({0.0, 0.0}, &table) == bnao::alias::WeightsProblem::kZeroSum, "all-zero rejected");
  check(bnao::alias::build_table({1e308, 1e308}, &table) == bnao::alias::WeightsProblem::kNotFinite,
        "overflowing sum rejected");
}

void test_draw_determinism_and_fit() {
  const std::vector<double>& w = kHandWeights;
  std::vector<uint64_t> table;
  check(bnao::alias::build_table(w, &table) == bnao::alias::WeightsProblem::kNone, "hand weights accepted");
  bool same_as_hand = table.size() == kHandTable.size();
  for (size_t c = 0; same_as_hand && c < table.size(); ++c) same_as_hand = table[c] == kHandTable[c];
  check(same_as_hand, "build_table of {1, 0, 2, 7} equals the table built by hand");
  const uint64_t n = kHandTable.size();
  bool known = true;
  for (int64_t i = 0; i < 16; ++i) {
    known &= bnao::alias::draw_one(kHandTable.data(), n, 42, 1000 + i) == kHandDraws42From1000[i];
  }
  check(known, "draw_one gives the hand-derived draws 1000..1015 of stream 42");
  const int64_t draws = 400000;
  std::vector<int64_t> counts(n, 0);
  int64_t differs = 0;
  for (int64_t i = 0; i < draws; ++i) {
    const int64_t a = bnao::alias::draw_one(kHandTable.data(), n, 42, 1000 + i);
    differs += a != hand_draw(42, 1000 + i);
    if (a >= 0 && a < static_cast<int64_t>(n)) ++counts[a];
  }
  check(differs == 0, "draw_one equals the draw written out by hand (" + std::to_string(differs) + " differ)");
  check(counts[1] == 0, "zero-weight item never drawn");
  // Chi-square with 2 degrees of freedom (item 1 excluded); 13.8 is the 0.999 quantile.
  double chi2 = 0.0;
  for (size_t i = 0; i < n; ++i) {
    if (w[i] == 0.0) continue;
    const double expected = draws * w[i] / 10.0;
    chi2 += (counts[i] - expected) * (counts[i] - expected) / expected;
  }
  check(chi2 < 13.8, "draw frequencies fit the weights (chi2=" + std::to_string(chi2) + ")");
  // Different seeds give different streams.
  int same = 0;
  for (int64_t i = 0; i < 1000; ++i) {
    same += bnao::alias::draw_one(kHandTable.data(), n, 1, i) == bnao::alias::draw_one(kHandTable.data(), n, 2, i);
  }
  check(same < 900, "seeds 1 and 2 give different streams");
}

// The registered ops, called through the dispatcher as a C++ user would.
c10::TypedOperatorHandle<at::Tensor(const at::Tensor&)> alias_table_op() {
  return c10::Dispatcher::singleton().findSchemaOrThrow("bnao::alias_table", "").typed<at::Tensor(const at::Tensor&)>();
}

c10::TypedOperatorHandle<at::Tensor(const at::Tensor&, int64_t, int64_t, int64_t)> alias_draw_op() {
  return c10::Dispatcher::singleton()
      .findSchemaOrThrow("bnao::alias_draw", "")
      .typed<at::Tensor(const at::Tensor&, int64_t, int64_t, int64_t)>();
}

// The registered CPU kernels (bnao_core links csrc/bnao.cpp and the CPU sources).
void test_registered_ops() {
  const auto table_op = alias_table_op();
  const auto draw_op = alias_draw_op();
  auto to_vector = [](const at::Tensor& t) {
    std::vector<uint64_t> out(static_cast<size_t>(t.numel()));
    for (int64_t i = 0; i < t.numel(); ++i) out[i] = static_cast<uint64_t>(t[i].item<int64_t>());
    return out;
  };
  // The hand-built table, from float64 and float32 weights (all exact in float).
  const at::Tensor hand_weights = at::tensor(at::ArrayRef<double>(kHandWeights), at::kDouble);
  const at::Tensor hand = table_op.call(hand_weights);
  check(to_vector(hand) == kHandTable, "op alias_table of {1, 0, 2, 7} equals the table built by hand");
  check(to_vector(table_op.call(hand_weights.to(at::kFloat))) == kHandTable,
        "op alias_table of float32 {1, 0, 2, 7} equals the table built by hand");
  const at::Tensor hand_draws = draw_op.call(hand, 5000, 123, 5);
  int64_t differs = 0;
  for (int64_t i = 0; i < hand_draws.numel(); ++i) differs += hand_draws[i].item<int64_t>() != hand_draw(123, 5 + i);
  check(differs == 0, "op alias_draw equals the draws written out by hand (" + std::to_string(differs) + " differ)");
  const at::Tensor known = draw_op.call(hand, 16, 42, 1000);
  bool same_known = true;
  for (int64_t i = 0; i < 16; ++i) same_known &= known[i].item<int64_t>() == kHandDraws42From1000[i];
  check(same_known, "op alias_draw gives the hand-derived draws 1000..1015 of stream 42");

  // A bigger table: its column masses reconstruct the weights; float32 weights give the same table.
  const std::vector<double> w = {5.0, 1.0, 0.0, 3.0, 2.5, 9.0, 0.5};
  const at::Tensor weights = at::tensor(at::ArrayRef<double>(w), at::kDouble);
  const at::Tensor table = table_op.call(weights);
  check_mass_reconstructs(to_vector(table), w, "op alias_table of 7 weights");
  check(table_op.call(weights.to(at::kFloat)).equal(table), "float32 and float64 weights give the same table");

  const at::Tensor all = draw_op.call(table, 100000, 123, 5);
  const at::Tensor head = draw_op.call(table, 40000, 123, 5);
  const at::Tensor tail = draw_op.call(table, 60000, 123, 40005);
  check(at::cat({head, tail}).equal(all), "chunked draws equal one big draw");
  check((all != 2).all().item<bool>(), "op never draws the zero-weight item");
  // Frequencies of the 100000 draws against the weights (5 degrees of freedom; 20.5 is the 0.999 quantile).
  const at::Tensor counts = at::bincount(all, {}, static_cast<int64_t>(w.size()));
  double chi2 = 0.0;
  for (size_t i = 0; i < w.size(); ++i) {
    if (w[i] == 0.0) continue;
    const double expected = 100000.0 * w[i] / 21.0;
    const double got = static_cast<double>(counts[static_cast<int64_t>(i)].item<int64_t>());
    chi2 += (got - expected) * (got - expected) / expected;
  }
  check(chi2 < 20.5, "op draw frequencies fit the weights (chi2=" + std::to_string(chi2) + ")");

  bool threw = false;
  try {
    table_op.call(at::tensor({1.0, -2.0}, at::kDouble));
  } catch (const c10::Error& err) {
    threw = std::string(err.what()).find("negative") != std::string::npos;
  }
  check(threw, "op rejects a negative weight with a message naming it");
}

// Hostile inputs: every one is refused with a c10::Error whose message contains `expected`.
template <typename Call>
void check_refused(Call call, const std::string& expected, const std::string& what) {
  bool refused = false;
  try {
    call();
  } catch (const c10::Error& err) {
    refused = std::string(err.what()).find(expected) != std::string::npos;
  }
  check(refused, what + " is refused with a message containing '" + expected + "'");
}

void test_hostile_inputs() {
  const auto table_op = alias_table_op();
  const auto draw_op = alias_draw_op();
  const at::Tensor hand = table_op.call(at::tensor(at::ArrayRef<double>(kHandWeights), at::kDouble));
  const int64_t n = hand.numel();

  // A forged table whose column 1 always takes its alias 99, outside the 4 items: refused.
  at::Tensor forged = hand.clone();
  forged[1] = static_cast<int64_t>(bnao::alias::pack_column(0u, 99u));
  check_refused([&] { draw_op.call(forged, 1000, 7, 0); }, "outside the table's 4 items", "a table aliasing item 99");
  // The same alias behind a full threshold is never taken: every draw stays inside the pool.
  forged[1] = static_cast<int64_t>(bnao::alias::pack_column(0xffffffffu, 0xfffffffeu));
  const at::Tensor kept = draw_op.call(forged, 1000, 7, 0);
  check((kept >= 0).all().item<bool>() && (kept < n).all().item<bool>(), "an unused forged alias yields no bad index");

  check_refused([&] { draw_op.call(hand.to(at::kInt), 4, 0, 0); }, "1-D int64", "an int32 table");
  check_refused([&] { draw_op.call(hand.reshape({2, 2}), 4, 0, 0); }, "1-D int64", "a 2-D table");
  check_refused([&] { draw_op.call(hand.slice(0, 0, 0), 4, 0, 0); }, "empty", "an empty table");
  check_refused([&] { draw_op.call(hand, -1, 0, 0); }, "num_draws must be >= 0", "a negative draw count");
  check_refused([&] { draw_op.call(hand, 4, 0, -5); }, "offset must be >= 0", "a negative offset");
  // A strided view draws like its contiguous copy.
  const at::Tensor doubled = at::stack({hand, hand}, 1).reshape({-1});
  check(draw_op.call(doubled.slice(0, 0, 2 * n, 2), 500, 3, 9).equal(draw_op.call(hand, 500, 3, 9)),
        "a strided table draws like its contiguous copy");

  const double inf = std::numeric_limits<double>::infinity();
  check_refused([&] { table_op.call(at::tensor({1.0, std::nan(""), 2.0}, at::kDouble)); }, "finite", "a NaN weight");
  check_refused([&] { table_op.call(at::tensor({1.0, inf}, at::kDouble)); }, "finite", "an infinite weight");
  check_refused([&] { table_op.call(at::tensor({1e308, 1e308}, at::kDouble)); }, "infinity", "weights summing to inf");
  check_refused([&] { table_op.call(at::zeros({3}, at::kDouble)); }, "all weights are zero", "zero weights");
  check_refused([&] { table_op.call(at::ones({2, 2}, at::kDouble)); }, "1-D", "2-D weights");
  check_refused([&] { table_op.call(at::ones({3}, at::kLong)); }, "floating-point", "int64 weights");
  check_refused([&] { table_op.call(at::ones({0}, at::kDouble)); }, "empty", "no weights");
}

}  // namespace

int main() {
  test_philox_known_answers();
  test_mulhi64();
  test_table_properties();
  test_draw_determinism_and_fit();
  test_registered_ops();
  test_hostile_inputs();
  return bnao_test::finish("test_alias");
}
