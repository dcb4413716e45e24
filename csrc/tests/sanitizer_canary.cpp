// Built only in the Sanitize build (CMakeLists.txt) and expected to FAIL: it
// reads one element past a heap buffer, which AddressSanitizer must report.
// If this test ever "passes", the sanitizer build is not instrumented.
#include <cstdio>
#include <vector>

int main(int argc, char** argv) {
  std::vector<int> values(4, 1);
  // argc keeps the index opaque to the optimiser: 1 + 3 = 4, one past the end.
  volatile int* data = values.data();
  const int past_end = data[argc + 3];
  std::printf("read %d past the end without a report: the sanitizer is not active\n", past_end);
  (void)argv;
  return 0;
}
