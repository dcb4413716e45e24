// The one assertion helper of bnao's C++ unit tests (no framework: built by
// CMake, run by ctest). A failed check prints and is counted; a test's main()
// returns finish("name").
#pragma once

#include <cstdint>
#include <cstdio>
#include <string>

namespace bnao_test {

inline int& failures() {
  static int count = 0;
  return count;
}

inline int& checks() {
  static int count = 0;
  return count;
}

inline void check(bool ok, const std::string& what) {
  ++checks();
  if (!ok) {
    ++failures();
    std::printf("FAIL: %s\n", what.c_str());
  }
}

// Output o of a multi-sum reduction (launch.cuh's reduce_many_kernel contract: partial_sums(o, t, threads, sums),
// then finish(o, sums)) as a block of `threads` threads would compute it, the threads' sums added in thread order
// in double: the CPU emulation of a block that the tests of the CUDA forms share.
template <typename Reduction>
void emulate_block(const Reduction& reduction, int64_t o, int64_t threads) {
  double block[Reduction::kSums] = {};
  for (int64_t t = 0; t < threads; ++t) {
    double sums[Reduction::kSums];
    reduction.partial_sums(o, t, threads, sums);
    for (int q = 0; q < Reduction::kSums; ++q) block[q] += sums[q];
  }
  reduction.finish(o, block);
}

// Prints the tally; the process exit status (0 = all passed).
inline int finish(const char* test_name) {
  std::printf("%s: %d checks, %d failures\n", test_name, checks(), failures());
  return failures() == 0 ? 0 : 1;
}

}  // namespace bnao_test
