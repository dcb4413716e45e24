// How the CUDA launcher groups the work items of element and channel-tile bodies into blocks, so that a
// block decodes each row (or plane) once instead of once per element (cuda/branch_round_cuda.cu's
// for_each_rows_kernel and for_each_plane_kernel). Plain arithmetic shared by those kernels and by the CPU
// emulation of their launch order (csrc/tests/test_reduction_split.cpp).
//
// Why: a SIMT warp pays for an instruction whichever of its lanes need it, so a row's decoding (the branch
// code's reads, the index divisions) done per element costs a warp as much as decoding a row for every 32
// elements. Decoded once into shared memory, it is paid once per row, and rows a body skips (a branch kind
// with nothing to do, a source no branch reads) cost one test per element.
#pragma once

#include <cstdint>

#include "cell/cell_code.h"
#include "cell/reduction_split.h"

namespace bnao {
namespace cell {

// Rows decoded per block at most: the shared memory holds this many rows.
constexpr int kMaxGroupRows = 128;

// Threads per row of `columns` elements when a thread takes `per_thread` consecutive columns (the last
// thread of a row fewer when they do not divide).
BNAO_CELL_HD int64_t row_threads(int64_t columns, int per_thread) { return (columns + per_thread - 1) / per_thread; }

// Rows per block for rows of `threads` threads each (whole rows, thread t on the column group t % threads of
// row t / threads), 0 when a row does not fit in a block (then one element per thread, each decoding its row).
BNAO_CELL_HD int group_rows(int64_t threads) {
  if (threads <= 0 || threads > kThreads) return 0;
  const int64_t rows = kThreads / threads;
  return static_cast<int>(rows < kMaxGroupRows ? rows : kMaxGroupRows);
}

// Channel-tile items go in blocks of kThreads consecutive items, over planes of at least kMinPlanePixels items;
// a block decodes the planes it touches, at most kThreads / kMinPlanePixels + 1 of them.
constexpr int64_t kMinPlanePixels = 8;
constexpr int kMaxGroupPlanes = static_cast<int>(kThreads / kMinPlanePixels) + 1;

struct PlaneGroup {
  int64_t first_plane;
  int planes;
};

// The planes that items [start, min(start + kThreads, count)) touch (start < count, pixels >= kMinPlanePixels).
BNAO_CELL_HD PlaneGroup plane_group(int64_t start, int64_t count, int64_t pixels) {
  const int64_t last = start + kThreads < count ? start + kThreads - 1 : count - 1;
  PlaneGroup group;
  group.first_plane = start / pixels;
  group.planes = static_cast<int>(last / pixels - group.first_plane + 1);
  return group;
}

}  // namespace cell
}  // namespace bnao
