// Argument checks of bnao::alias_draw, shared by the CPU and CUDA kernels so
// both refuse the same inputs with the same messages.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>

namespace bnao {

inline void check_alias_draw_args(const at::Tensor& table, int64_t num_draws, int64_t offset) {
  TORCH_CHECK(table.dim() == 1 && table.scalar_type() == at::kLong,
              "bnao::alias_draw: table must be the 1-D int64 tensor returned by bnao::alias_table, got ",
              table.scalar_type(), " of shape ", table.sizes());
  TORCH_CHECK(table.numel() > 0, "bnao::alias_draw: table is empty; build it from at least one weight");
  TORCH_CHECK(num_draws >= 0, "bnao::alias_draw: num_draws must be >= 0, got ", num_draws);
  TORCH_CHECK(offset >= 0, "bnao::alias_draw: offset must be >= 0, got ", offset,
              "; it counts the draws already taken from the stream");
}

}  // namespace bnao
