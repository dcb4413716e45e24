// Op kind codes of the NAO cell space, shared by every C++ area (size, fused
// cell). They must equal bnao/space/ops.py (KIND_ZERO .. KIND_MAX_POOL).
#pragma once

#include <cstdint>

namespace bnao {

enum OpKind : int32_t {
  kZero = 0,
  kIdentity = 1,
  kSepConv = 2,
  kDilSepConv = 3,
  kAvgPool = 4,
  kMaxPool = 5,
};

}  // namespace bnao
