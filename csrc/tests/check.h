// The one assertion helper of bnao's C++ unit tests (no framework: built by
// CMake, run by ctest). A failed check prints and is counted; a test's main()
// returns finish("name").
#pragma once

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

// Prints the tally; the process exit status (0 = all passed).
inline int finish(const char* test_name) {
  std::printf("%s: %d checks, %d failures\n", test_name, checks(), failures());
  return failures() == 0 ? 0 : 1;
}

}  // namespace bnao_test
