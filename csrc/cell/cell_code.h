// Branch codes of the fused mixed-cell kernels: a cell's arch as device data.
// One row of kNumFields int32 per (node, branch); field meanings and every
// op's semantics are in csrc/cell/DESIGN.md, mirrored by bnao/ops/fused/code.py
// (keep both in sync).
#pragma once

#include <cstdint>

#include "common/op_kinds.h"

#ifdef __CUDACC__
#define BNAO_CELL_HD __host__ __device__ __forceinline__
// Loop unrolling for nvcc (host compilers without the pragma would warn).
#define BNAO_UNROLL _Pragma("unroll")
#else
#define BNAO_CELL_HD inline
#define BNAO_UNROLL
#endif

namespace bnao {
namespace cell {

enum Field : int {
  kInput = 0,     // state id the branch reads
  kKind = 1,      // op kind (bnao::OpKind, = bnao.space.ops.KIND_*)
  kKernel = 2,    // kernel size (0 when none)
  kDilation = 3,  // 1, or 2 for dilated sep convs
  kStride = 4,    // 1, or 2 for reduction-cell branches reading inputs 0/1
  kOp = 5,        // op index in the op set
  kRow = 6,       // row of the branch's weights in its op's stacked tensors (-1: none)
  kFlags = 7,     // kFlag* bits
  kBnRow = 8,     // row of the branch's first slot BN in the stage's running stats (-1: none)
  kNumFields = 9,
};

// Op kinds under the names the cell kernels use (one definition: csrc/common/op_kinds.h).
constexpr int32_t kKindZero = kZero;
constexpr int32_t kKindIdentity = kIdentity;
constexpr int32_t kKindSepConv = kSepConv;
constexpr int32_t kKindDilSepConv = kDilSepConv;
constexpr int32_t kKindAvgPool = kAvgPool;
constexpr int32_t kKindMaxPool = kMaxPool;

constexpr int32_t kFlagDrop = 1;  // drop-path applies to the branch
constexpr int32_t kFlagBn1 = 2;   // round 1's result is batch-normalised
constexpr int32_t kFlagBn2 = 4;   // round 2's result is batch-normalised
constexpr int kMaxKernel = 7;     // gathered depthwise weights are [C, 7, 7], top-left k x k used

}  // namespace cell
}  // namespace bnao
