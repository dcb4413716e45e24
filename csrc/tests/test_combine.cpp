// Unit tests of the shared bodies of bnao::combine and its backward
// (cell/combine.h): a small case derived by hand (a state that is not loose and
// holds NaN, ReLU on both signs, a partial tile of output channels), NaN in a
// loose state, and two-tile cases of the forward and of both gradients (the weight
// gradient over one and two chunks, as one thread and as several) against plain loops written here. Only
// the header is used, so the sanitizer build checks every index the bodies compute.
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include "cell/combine.h"
#include "tests/check.h"

namespace {

using bnao::cell::CombineArgs;
using bnao_test::check;

void check_near(double got, double want, const std::string& what) {
  check(std::fabs(got - want) <= 1e-12 * (1.0 + std::fabs(want)),
        what + ": got " + std::to_string(got) + ", want " + std::to_string(want));
}

CombineArgs<double> make_args(const std::vector<std::vector<double>>& states, const std::vector<double>& weight,
                              const std::vector<double>& loose, const double* grad, int64_t batch, int64_t channels,
                              int64_t plane) {
  CombineArgs<double> a{};
  a.num_states = static_cast<int>(states.size());
  for (int s = 0; s < a.num_states; ++s) a.states[s] = states[s].data();
  a.weight = weight.data();
  a.loose = loose.data();
  a.grad = grad;
  a.batch = batch;
  a.channels = channels;
  a.plane = plane;
  return a;
}

// The weight gradient through both passes of combine.h, pass 1 as `threads` threads of a block would run it
// (thread t sums the pairs t, t + threads, ... of each chunk; the threads' tiles then added in thread order).
std::vector<double> weight_grad(const CombineArgs<double>& a, int64_t threads = 1) {
  using Tiles = bnao::cell::CombineWeightGradTiles<double, double>;
  const int64_t outputs = a.channels * a.num_states * a.channels;
  const int64_t chunks = bnao::cell::weight_grad_chunks(a.batch * a.plane);
  std::vector<double> partial(static_cast<size_t>(chunks * outputs), std::numeric_limits<double>::quiet_NaN());
  std::vector<double> grad_weight(static_cast<size_t>(outputs), -1.0);
  const Tiles tiles{a, partial.data(), chunks};
  for (int64_t o = 0; o < tiles.outputs(); ++o) bnao_test::emulate_block(tiles, o, threads);
  const bnao::cell::CombineWeightGradFinish<double, double> second{a, partial.data(), chunks, grad_weight.data()};
  for (int64_t o = 0; o < outputs; ++o) second(o);
  return grad_weight;
}

std::vector<std::vector<double>> state_grads(const CombineArgs<double>& a) {
  std::vector<std::vector<double>> grads(a.num_states, std::vector<double>(a.batch * a.channels * a.plane, -1.0));
  double* grad_states[bnao::cell::kMaxCombineStates] = {};
  for (int s = 0; s < a.num_states; ++s) grad_states[s] = grads[s].data();
  for (int64_t e = 0; e < bnao::cell::combine_grad_state_items(a); ++e)
    bnao::cell::combine_grad_state_item<double, double>(e, a, grad_states);
  return grads;
}

std::vector<double> forward(const CombineArgs<double>& a) {
  std::vector<double> out(static_cast<size_t>(a.batch * a.channels * a.plane), -1.0);
  for (int64_t e = 0; e < bnao::cell::combine_items(a); ++e) bnao::cell::combine_item<double, double>(e, a, out.data());
  return out;
}

// N = 1, C = 2, H * W = 2, three states, loose = {1, 0, 1}; state 1 is all NaN. W[co][s][ci]:
// co 0: s0 (1, 2), s1 (100, 100), s2 (3, -1); co 1: s0 (-1, 1), s1 (7, 7), s2 (0.5, 2).
// ReLU'd states: x0 = ci0 (1, 0), ci1 (3, 4); x2 = ci0 (0, 2), ci1 (0.5, 0).
void test_hand_case() {
  const double nan = std::numeric_limits<double>::quiet_NaN();
  const std::vector<std::vector<double>> states = {{1, -2, 3, 4}, {nan, nan, nan, nan}, {-1, 2, 0.5, -3}};
  const std::vector<double> weight = {1, 2, 100, 100, 3, -1, -1, 1, 7, 7, 0.5, 2};
  const std::vector<double> loose = {1, 0, 1};
  const std::vector<double> grad = {1, 2, 3, 4};  // [co][p]
  const CombineArgs<double> a = make_args(states, weight, loose, grad.data(), 1, 2, 2);
  // out[co][p] = sum over s in {0, 2}, ci of W[co][s][ci] * x_s[ci][p].
  const std::vector<double> out = forward(a);
  const double want[4] = {1 * 1 + 2 * 3 + 3 * 0 - 1 * 0.5, 1 * 0 + 2 * 4 + 3 * 2 - 1 * 0,
                          -1 * 1 + 1 * 3 + 0.5 * 0 + 2 * 0.5, -1 * 0 + 1 * 4 + 0.5 * 2 + 2 * 0};
  for (int i = 0; i < 4; ++i) check_near(out[i], want[i], "hand case out[" + std::to_string(i) + "]");

  // Gradient of state s at (ci, p): [x > 0] * sum_co W[co][s][ci] * grad[co][p]; zero for state 1.
  const std::vector<std::vector<double>> grads = state_grads(a);
  const double want_grads[3][4] = {{1 * 1 - 1 * 3, 0, 2 * 1 + 1 * 3, 2 * 2 + 1 * 4},
                                   {0, 0, 0, 0},
                                   {0, 3 * 2 + 0.5 * 4, -1 * 1 + 2 * 3, 0}};
  for (int s = 0; s < 3; ++s)
    for (int i = 0; i < 4; ++i)
      check_near(grads[s][i], want_grads[s][i],
                 "hand case grad state " + std::to_string(s) + "[" + std::to_string(i) + "]");

  // Weight gradient [co][s][ci] = sum_p grad[co][p] * x_s[ci][p] for loose s, else 0.
  const std::vector<double> grad_weight = weight_grad(a);
  const double want_weight[12] = {1, 1 * 3 + 2 * 4, 0, 0, 2 * 2, 0.5, 3, 3 * 3 + 4 * 4, 0, 0, 4 * 2, 3 * 0.5};
  for (int o = 0; o < 12; ++o) {
    check_near(grad_weight[o], want_weight[o], "hand case grad weight[" + std::to_string(o) + "]");
  }
}

// A NaN in a loose state reaches every output channel at its pixel, and only there.
void test_nan_in_a_loose_state() {
  const double nan = std::numeric_limits<double>::quiet_NaN();
  const std::vector<std::vector<double>> states = {{nan, 1, 1, 1}};
  const std::vector<double> weight = {1, 1, 1, 1};
  const std::vector<double> loose = {1};
  const std::vector<double> out = forward(make_args(states, weight, loose, nullptr, 1, 2, 2));
  check(std::isnan(out[0]) && std::isnan(out[2]), "NaN in a loose state reaches both channels at its pixel");
  check(!std::isnan(out[1]) && !std::isnan(out[3]), "NaN stays at its pixel");
}

// N = 2, C = 10 (a full tile of 8 and a tail of 2), H * W = 3, two states, loose = {1, 0.5}: against a
// plain loop over (n, co, p, s, ci).
void test_two_tiles_against_a_plain_loop() {
  const int64_t batch = 2, channels = 10, plane = 3, count = 2;
  std::vector<std::vector<double>> states(count, std::vector<double>(batch * channels * plane));
  for (int s = 0; s < count; ++s)
    for (size_t i = 0; i < states[s].size(); ++i) states[s][i] = std::sin(1.7 * i + s) * 3.0;
  std::vector<double> weight(channels * count * channels);
  for (size_t i = 0; i < weight.size(); ++i) weight[i] = std::cos(0.9 * i);
  const std::vector<double> loose = {1.0, 0.5};
  const std::vector<double> out = forward(make_args(states, weight, loose, nullptr, batch, channels, plane));
  for (int64_t n = 0; n < batch; ++n)
    for (int64_t co = 0; co < channels; ++co)
      for (int64_t p = 0; p < plane; ++p) {
        double want = 0.0;
        for (int s = 0; s < count; ++s)
          for (int64_t ci = 0; ci < channels; ++ci) {
            const double x = states[s][(n * channels + ci) * plane + p];
            want += weight[(co * count + s) * channels + ci] * loose[s] * (x > 0 ? x : 0.0);
          }
        check_near(out[(n * channels + co) * plane + p], want,
                   "two tiles out[" + std::to_string(n) + "][" + std::to_string(co) + "][" + std::to_string(p) + "]");
      }
}

// Both gradients with two channel tiles (C = 10), three states, loose = {1, 0, 0.5}, against plain loops, in
// two sizes: 300 (n, p) pairs (N = 3, H * W = 100: one chunk) and 9,000 (N = 2, H * W = 4,500: two chunks of
// 4,500), the weight gradient's first pass run as 1 thread and as 7 threads striding over each chunk.
void check_gradients_against_plain_loops(int64_t batch, int64_t plane, int64_t want_chunks) {
  const int64_t channels = 10, count = 3, size = batch * channels * plane;
  std::vector<std::vector<double>> states(count, std::vector<double>(size));
  for (int s = 0; s < count; ++s)
    for (int64_t i = 0; i < size; ++i) states[s][i] = std::sin(0.37 * i + 2.0 * s) * 2.0;
  std::vector<double> weight(channels * count * channels), grad(size);
  for (size_t i = 0; i < weight.size(); ++i) weight[i] = std::cos(0.9 * i);
  for (int64_t i = 0; i < size; ++i) grad[i] = std::cos(0.23 * i + 1.0);
  const std::vector<double> loose = {1.0, 0.0, 0.5};
  const CombineArgs<double> a = make_args(states, weight, loose, grad.data(), batch, channels, plane);
  const std::string where = " (" + std::to_string(batch * plane) + " pairs)";
  check(bnao::cell::weight_grad_chunks(batch * plane) == want_chunks, "chunks" + where);
  auto at = [&](int64_t n, int64_t c, int64_t p) { return (n * channels + c) * plane + p; };
  for (int64_t threads : {1, 7}) {
    const std::vector<double> grad_weight = weight_grad(a, threads);
    for (int64_t co = 0; co < channels; ++co)
      for (int s = 0; s < count; ++s)
        for (int64_t ci = 0; ci < channels; ++ci) {
          double want = 0.0;
          for (int64_t n = 0; n < batch; ++n)
            for (int64_t p = 0; p < plane; ++p) {
              const double x = states[s][at(n, ci, p)];
              want += grad[at(n, co, p)] * (x > 0 ? x : 0.0);
            }
          check_near(grad_weight[(co * count + s) * channels + ci], loose[s] * want,
                     "grad weight[" + std::to_string(co) + "][" + std::to_string(s) + "][" + std::to_string(ci) +
                         "], " + std::to_string(threads) + " threads" + where);
        }
  }
  const std::vector<std::vector<double>> grads = state_grads(a);
  for (int s = 0; s < count; ++s)
    for (int64_t n = 0; n < batch; ++n)
      for (int64_t ci = 0; ci < channels; ++ci)
        for (int64_t p = 0; p < plane; ++p) {
          double want = 0.0;
          for (int64_t co = 0; co < channels; ++co) want += weight[(co * count + s) * channels + ci] * grad[at(n, co, p)];
          const bool passes = states[s][at(n, ci, p)] > 0;
          check_near(grads[s][at(n, ci, p)], passes ? loose[s] * want : 0.0,
                     "grad state " + std::to_string(s) + " at " + std::to_string(at(n, ci, p)) + where);
        }
}

void test_gradients_against_plain_loops() {
  check_gradients_against_plain_loops(3, 100, 1);
  check_gradients_against_plain_loops(2, 4500, 2);
}

}  // namespace

int main() {
  test_hand_case();
  test_nan_in_a_loose_state();
  test_two_tiles_against_a_plain_loop();
  test_gradients_against_plain_loops();
  return bnao_test::finish("test_combine");
}
