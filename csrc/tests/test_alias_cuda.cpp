// CUDA cases of the alias sampler: the CUDA kernels behind bnao::alias_table and
// bnao::alias_draw must give the CPU kernels' results bit for bit.
//
// Exit codes: 0 all checks passed, 1 a check failed, 77 skipped (built without
// CUDA, or no GPU visible); CMake marks 77 as "skipped" for ctest.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cstdint>
#include <cstdio>
#include <string>
#include <vector>

#include "tests/check.h"

#ifdef BNAO_WITH_CUDA
#include <cuda_runtime.h>
#endif

namespace {

constexpr int kSkipped = 77;

#ifdef BNAO_WITH_CUDA

using bnao_test::check;

using TableOp = at::Tensor(const at::Tensor&);
using DrawOp = at::Tensor(const at::Tensor&, int64_t, int64_t, int64_t);

c10::TypedOperatorHandle<TableOp> table_op() {
  return c10::Dispatcher::singleton().findSchemaOrThrow("bnao::alias_table", "").typed<TableOp>();
}

c10::TypedOperatorHandle<DrawOp> draw_op() {
  return c10::Dispatcher::singleton().findSchemaOrThrow("bnao::alias_draw", "").typed<DrawOp>();
}

// Draws of one full grid of the CUDA kernel on this GPU: blocks = 16 per SM,
// 256 threads, 4 draws each (constants of csrc/sampler/cuda/alias_cuda.cu).
// More draws than this make the kernel take a second grid-stride step.
int64_t one_grid_of_draws() {
  int sms = 0;
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0);
  return static_cast<int64_t>(sms) * 16 * 256 * 4;
}

// Weight vectors of different shapes: model-size-like, one heavy item, zeros.
std::vector<at::Tensor> weight_cases() {
  at::manual_seed(0);
  std::vector<at::Tensor> out;
  out.push_back(at::randint(100000, 5000000, {1000000}, at::kDouble));
  at::Tensor heavy = at::ones({4097}, at::kDouble);
  heavy[17].fill_(1e6);
  out.push_back(heavy);
  // Every third weight zero: those items must never be drawn, on either device.
  const at::Tensor keep = at::arange(513, at::kLong).remainder(3).ne(0).to(at::kDouble);
  out.push_back(at::rand({513}, at::kDouble) * keep);
  return out;
}

void test_tables_identical() {
  for (const at::Tensor& weights : weight_cases()) {
    const at::Tensor cpu = table_op().call(weights);
    const at::Tensor cuda = table_op().call(weights.to(at::kCUDA));
    check(cuda.is_cuda(), "alias_table of CUDA weights returns a CUDA tensor");
    check(at::equal(cuda.cpu(), cpu), "CUDA table == CPU table (n=" + std::to_string(weights.numel()) + ")");
  }
}

void test_draws_identical() {
  const int64_t grid = one_grid_of_draws();
  struct Case {
    int64_t seed, offset, count;
  };
  // Past one full grid in one call, a large offset and a seed near 2^64 (negative as int64).
  const Case cases[] = {{0, 0, 1}, {99, 5, grid + 12345}, {-3, int64_t{1} << 41, 70000}, {7, 0, 2 * grid + 1}};
  const std::vector<at::Tensor> weights = weight_cases();
  for (size_t w = 0; w < weights.size(); ++w) {
    const at::Tensor cpu_table = table_op().call(weights[w]);
    const at::Tensor cuda_table = cpu_table.to(at::kCUDA);
    for (const Case& c : cases) {
      const at::Tensor cpu = draw_op().call(cpu_table, c.count, c.seed, c.offset);
      const at::Tensor cuda = draw_op().call(cuda_table, c.count, c.seed, c.offset);
      check(at::equal(cuda.cpu(), cpu), "CUDA draws == CPU draws (weights " + std::to_string(w) + ", seed " +
                                            std::to_string(c.seed) + ", offset " + std::to_string(c.offset) +
                                            ", " + std::to_string(c.count) + " draws)");
    }
    // Chunking: one call equals two calls split at an odd point (counter-based stream).
    const int64_t total = grid + 777, split = 65537;
    const at::Tensor whole = draw_op().call(cuda_table, total, 11, 0);
    const at::Tensor parts = at::cat({draw_op().call(cuda_table, split, 11, 0),
                                      draw_op().call(cuda_table, total - split, 11, split)});
    check(at::equal(whole, parts), "CUDA draws do not depend on how the stream is chunked");
  }
}

void test_errors_match_cpu() {
  const at::Tensor table = table_op().call(at::ones({8}, at::kDouble)).to(at::kCUDA);
  bool threw = false;
  try {
    draw_op().call(table, -1, 0, 0);
  } catch (const c10::Error& err) {
    threw = std::string(err.what()).find("num_draws must be >= 0") != std::string::npos;
  }
  check(threw, "CUDA alias_draw rejects a negative count with the CPU kernel's message");
  const at::Tensor none = draw_op().call(table, 0, 0, 0);
  check(none.is_cuda() && none.numel() == 0, "zero CUDA draws give an empty CUDA tensor");
}

#endif  // BNAO_WITH_CUDA

}  // namespace

int main() {
#ifndef BNAO_WITH_CUDA
  std::printf("test_alias_cuda: SKIPPED (bnao_core built without CUDA; configure with -DBNAO_CUDA=ON)\n");
  return kSkipped;
#else
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    std::printf("test_alias_cuda: SKIPPED (no CUDA GPU visible)\n");
    return kSkipped;
  }
  test_tables_identical();
  test_draws_identical();
  test_errors_match_cpu();
  return bnao_test::finish("test_alias_cuda");
#endif
}
