// How the CUDA launchers split a reduction's outputs over blocks (plain C++: the CPU tests include it).
//
// One block per output leaves most of a GPU idle when there are few outputs: the BN statistics of a
// node round have 2 C outputs (40 at the reference's first stage, for 132 SMs on an H100), each a
// sum of N x H x W terms (65,536 at batch 64). So each output is split over `chunks` blocks: block
// (output, chunk) adds the terms chunk * kThreads + t, + chunks * kThreads, ... (thread t), writes
// its sum to partial[output * chunks + chunk], and a second pass adds an output's chunks in chunk
// order. The split depends on the shapes only (not on the GPU), so a given input gives the same bits
// on every GPU and every run.
#pragma once

#include <algorithm>
#include <cstdint>

namespace bnao {
namespace cell {

// Threads per block of every fused-cell launch (cuda/launch.cuh launches with it).
constexpr int kThreads = 256;

// Blocks a split reduction aims for: an H100 holds 132 SMs x 8 resident blocks of 256 threads.
constexpr int64_t kTargetReductionBlocks = 1024;
// Each thread still adds at least this many terms, so a chunk is worth its launch and its partial.
constexpr int64_t kMinTermsPerThread = 16;
// At most this many chunks per output (bounds the second pass and the partial buffer).
constexpr int64_t kMaxReductionChunks = 64;

// Chunks per output for `outputs` outputs (or tiles of outputs) of `terms` terms each: 1 when the outputs
// alone come near the target or the terms are too few to share (then a one-sum reduction's block finishes
// its output itself; the tile reductions still run their chunk pass). Both quotients round down: a second
// chunk for 513 to 1,023 outputs would add a pass without a fuller grid.
inline int64_t reduction_chunks(int64_t outputs, int64_t terms) {
  if (outputs <= 0 || terms <= 0) return 1;
  const int64_t by_work = terms / (kThreads * kMinTermsPerThread);
  const int64_t by_grid = kTargetReductionBlocks / outputs;
  return std::clamp<int64_t>(std::min(by_work, by_grid), 1, kMaxReductionChunks);
}

}  // namespace cell
}  // namespace bnao
