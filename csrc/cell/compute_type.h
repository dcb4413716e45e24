// The arithmetic type of the fused-cell kernels for activations stored as T.
//
// Activations (states, branch results, their gradients) are stored as T: float32, float64 or
// bfloat16. Arithmetic, and every per-channel or per-weight tensor of the ops (depthwise and
// pointwise weights, BN statistics and affine parameters, drop-path multipliers, and their
// gradients), use Compute<T>: float32 for bfloat16 activations (bf16 storage, fp32 accumulation),
// T itself otherwise, so the float32 and float64 kernels are unchanged by it.
#pragma once

#include <c10/core/ScalarType.h>
#include <c10/util/BFloat16.h>

namespace bnao {
namespace cell {

template <typename T>
struct ComputeTypeOf {
  using type = T;
};

template <>
struct ComputeTypeOf<c10::BFloat16> {
  using type = float;
};

template <typename T>
using Compute = typename ComputeTypeOf<T>::type;

// Compute<T> as a dtype: what the ops take and return for weights, BN statistics and affine
// parameters (and their gradients) when the activations are `activations`.
inline c10::ScalarType param_dtype(c10::ScalarType activations) {
  return activations == c10::ScalarType::BFloat16 ? c10::ScalarType::Float : activations;
}

}  // namespace cell
}  // namespace bnao
