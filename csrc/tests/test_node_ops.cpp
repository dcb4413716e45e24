// Unit tests of the shared bodies of the fused cell's gather, node-output and
// slot-statistics kernels (cell/node_ops.h), against values derived by hand.
// Plain executable: prints each failure and returns non-zero when any check
// failed. Only the header is used, so the sanitizer build checks every index
// the bodies compute.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <string>
#include <vector>

#include "cell/node_ops.h"

namespace {

using namespace bnao::cell;

int g_failures = 0;

void check(bool ok, const std::string& what) {
  if (!ok) {
    ++g_failures;
    std::printf("FAIL: %s\n", what.c_str());
  }
}

void check_near(double got, double want, const std::string& what) {
  check(std::fabs(got - want) <= 1e-12 * (1.0 + std::fabs(want)),
        what + ": got " + std::to_string(got) + ", want " + std::to_string(want));
}

// Two stacks gathered into rows of shape [2, 3, 3]: stack 0 holds 2x2 kernels
// (padded), stack 1 full 3x3 kernels. Stack element (row, c, i, j) = 1000 * stack
// + 100 * row + 10 * c + 3 * i + j, so each value names its source.
void test_gather() {
  std::vector<double> stack0(3 * 2 * 2 * 2), stack1(2 * 2 * 3 * 3);
  for (int row = 0; row < 3; ++row)
    for (int c = 0; c < 2; ++c)
      for (int i = 0; i < 2; ++i)
        for (int j = 0; j < 2; ++j) stack0[((row * 2 + c) * 2 + i) * 2 + j] = 100 * row + 10 * c + 3 * i + j;
  for (int row = 0; row < 2; ++row)
    for (int c = 0; c < 2; ++c)
      for (int i = 0; i < 3; ++i)
        for (int j = 0; j < 3; ++j) stack1[((row * 2 + c) * 3 + i) * 3 + j] = 1000 + 100 * row + 10 * c + 3 * i + j;
  StackTable<const double*> table{};
  table.num_stacks = 2;
  table.data[0] = stack0.data();
  table.data[1] = stack1.data();
  const int64_t sizes[2][3] = {{2, 2, 2}, {2, 3, 3}};
  for (int s = 0; s < 2; ++s) {
    table.rows[s] = s == 0 ? 3 : 2;
    table.row_numel[s] = sizes[s][0] * sizes[s][1] * sizes[s][2];
    for (int d = 0; d < 3; ++d) table.sizes[s][d] = sizes[s][d];
  }
  GatherShape shape{};
  shape.dims = 3;
  shape.sizes[0] = 2;
  shape.sizes[1] = 3;
  shape.sizes[2] = 3;
  shape.inner = 18;
  const int64_t select[3] = {1, -1, 0};
  const int64_t rows[3] = {1, 0, 2};
  std::vector<double> out(3 * 18, -1.0);
  for (int64_t e = 0; e < 3 * 18; ++e) gather_rows_item(e, table, shape, select, rows, out.data());
  for (int c = 0; c < 2; ++c) {
    for (int i = 0; i < 3; ++i) {
      for (int j = 0; j < 3; ++j) {
        const int k = (c * 3 + i) * 3 + j;
        check_near(out[k], 1100 + 10 * c + 3 * i + j, "gather: full row of stack 1");
        check_near(out[18 + k], 0.0, "gather: select -1 gives zeros");
        const double want = (i < 2 && j < 2) ? 200 + 10 * c + 3 * i + j : 0.0;
        check_near(out[36 + k], want, "gather: stack 0 row 2 in the top-left corner, zero padding");
      }
    }
  }
  // Backward: every gathered element lands back where it came from; the rest stays zero.
  std::vector<double> grad0(stack0.size(), 0.0), grad1(stack1.size(), 0.0);
  StackTable<double*> grads{};
  grads.num_stacks = 2;
  grads.data[0] = grad0.data();
  grads.data[1] = grad1.data();
  for (int s = 0; s < 2; ++s) {
    grads.rows[s] = table.rows[s];
    grads.row_numel[s] = table.row_numel[s];
    for (int d = 0; d < 3; ++d) grads.sizes[s][d] = table.sizes[s][d];
  }
  for (int64_t e = 0; e < 3 * 18; ++e) gather_rows_backward_item(e, grads, shape, select, rows, out.data());
  for (size_t i = 0; i < stack0.size(); ++i) {
    check_near(grad0[i], i >= 16 ? stack0[i] : 0.0, "gather backward: stack 0 (row 2 only)");
  }
  for (size_t i = 0; i < stack1.size(); ++i) {
    check_near(grad1[i], i >= 18 ? stack1[i] : 0.0, "gather backward: stack 1 (row 1 only)");
  }
}

// A node of N = 2, C = 1, one pixel: branch 0 a sep conv (BN2, drop), branch 1
// an identity whose drop flag is off. mean 1, invstd 2, gamma 3, beta 0.5 on branch 0.
void test_node_output() {
  int32_t code[2 * kNumFields] = {};
  code[kKind] = kKindSepConv;
  code[kFlags] = kFlagDrop | kFlagBn1 | kFlagBn2;
  code[kNumFields + kKind] = kKindIdentity;
  code[kNumFields + kFlags] = 0;
  const double pre[4] = {2.0, 4.0, 10.0, 20.0};  // [b][n]
  const double mean[2] = {1.0, 0.0}, invstd[2] = {2.0, 1.0}, gamma[2] = {3.0, 1.0}, beta[2] = {0.5, 0.0};
  const double mask[4] = {2.0, 7.0, 0.0, 7.0};  // [n][b]; branch 1 ignores it
  NodeArgs<double> args{pre, code, mean, invstd, gamma, beta, mask, 2, 1, 1};
  double out[2];
  for (int e = 0; e < 2; ++e) node_output_item(e, args, out);
  // n = 0: (2 - 1) * 6 + 0.5 = 6.5, times 2, plus 10; n = 1: dropped, plus 20.
  check_near(out[0], 23.0, "node_output n=0");
  check_near(out[1], 20.0, "node_output n=1");

  const double grad[2] = {1.0, 5.0};
  double grad_pre[4];
  for (int e = 0; e < 4; ++e) node_output_grad_pre_item(e, args, grad, grad_pre);
  check_near(grad_pre[0], 12.0, "grad_pre b=0 n=0 (1 * mask 2 * invstd 2 * gamma 3)");
  check_near(grad_pre[1], 0.0, "grad_pre b=0 n=1 (dropped)");
  check_near(grad_pre[2], 1.0, "grad_pre b=1 n=0 (identity)");
  check_near(grad_pre[3], 5.0, "grad_pre b=1 n=1 (identity)");

  double grad_mean[2], grad_invstd[2], grad_gamma[2], grad_beta[2];
  for (int b = 0; b < 2; ++b) {
    double s1 = 0.0, s2 = 0.0;
    node_output_param_partial<double, double>(b, 0, 0, 1, args, grad, &s1, &s2);
    node_output_param_finish<double, double>(b, 0, s1, s2, args, grad_mean, grad_invstd, grad_gamma, grad_beta);
  }
  // Branch 0: g = grad * mask = (2, 0); sum g = 2; sum g * (pre - mean) = 2 * 1 = 2.
  check_near(grad_beta[0], 2.0, "grad_beta");
  check_near(grad_mean[0], -12.0, "grad_mean = -2 * invstd * gamma");
  check_near(grad_gamma[0], 4.0, "grad_gamma = 2 * invstd");
  check_near(grad_invstd[0], 6.0, "grad_invstd = 2 * gamma");
  check(grad_beta[1] == 0.0 && grad_mean[1] == 0.0 && grad_gamma[1] == 0.0 && grad_invstd[1] == 0.0,
        "no statistics gradients for a branch without BN2");

  // A zero branch contributes nothing and gets no gradient, even with flags set.
  code[kKind] = kKindZero;
  for (int e = 0; e < 2; ++e) node_output_item(e, args, out);
  check_near(out[0], 10.0, "zero branch skipped n=0");
  node_output_grad_pre_item(0, args, grad, grad_pre);
  check_near(grad_pre[0], 0.0, "zero branch: no gradient");
}

void test_update_slot_stats() {
  // Two statistics rows, C = 2, into 3 running rows; the second statistics row is skipped.
  const int64_t bn_rows[2] = {2, -1};
  const double mean[4] = {1.0, -1.0, 9.0, 9.0};
  const double invstd[4] = {0.5, 1.0, 9.0, 9.0};
  double running_mean[6] = {0, 0, 0, 0, 10, 20};
  double running_var[6] = {1, 1, 1, 1, 2, 4};
  const double eps = 0.25, momentum = 0.1, unbias = 5.0 / 4.0;  // count 5
  for (int e = 0; e < 4; ++e) {
    update_slot_stats_item(e, 2, bn_rows, mean, invstd, momentum, eps, unbias, running_mean, running_var);
  }
  // var = (1/invstd^2 - eps) * 5/4: (4 - 0.25) * 1.25 = 4.6875 and (1 - 0.25) * 1.25 = 0.9375.
  check_near(running_mean[4], 10.0 + 0.1 * (1.0 - 10.0), "running mean c=0");
  check_near(running_mean[5], 20.0 + 0.1 * (-1.0 - 20.0), "running mean c=1");
  check_near(running_var[4], 2.0 + 0.1 * (4.6875 - 2.0), "running var c=0");
  check_near(running_var[5], 4.0 + 0.1 * (0.9375 - 4.0), "running var c=1");
  for (int i = 0; i < 4; ++i) {
    check(running_mean[i] == 0.0 && running_var[i] == 1.0, "rows not named stay untouched");
  }
  check_near(lerp(1.0, 3.0, 0.75), 2.5, "lerp above one half");
}

}  // namespace

int main() {
  test_gather();
  test_node_output();
  test_update_slot_stats();
  if (g_failures > 0) {
    std::printf("%d check(s) failed\n", g_failures);
    return 1;
  }
  std::printf("test_node_ops: all checks passed\n");
  return 0;
}
