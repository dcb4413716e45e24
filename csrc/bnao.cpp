// The op library of bnao: every op is declared here, once. Each backend's
// kernels live in csrc/<area>/cpu/*.cpp and csrc/<area>/cuda/*.cu and attach
// themselves with TORCH_LIBRARY_IMPL; autograd and fake (meta) kernels are
// attached in Python (bnao/ops/).
#include <torch/library.h>

TORCH_LIBRARY(bnao, m) {
  // --- samplers (csrc/sampler) -------------------------------------------
  // Vose alias table of a weight vector, packed one int64 per column:
  // (threshold << 32) | alias, threshold = min(floor(prob * 2^32), 2^32 - 1),
  // a column with prob >= 1 aliasing itself (see sampler/alias.h).
  m.def("alias_table(Tensor weights) -> Tensor");
  // num_draws indices from an alias table using counter-based Philox4x32-10
  // random numbers: draw i uses counter offset + i under key seed, so a
  // sequence is the same on every device and in every process.
  m.def("alias_draw(Tensor table, int num_draws, int seed, int offset) -> Tensor");

  // --- model size (csrc/size) --------------------------------------------
  // Closed-form parameter count and multiply-adds of the stand-alone network
  // of every arch of an [n, 8B] integer array; returns int64 [n, 2].
  m.def(
      "model_size(Tensor archs, int num_nodes, int[] op_kinds, int[] op_kernels, "
      "int skeleton, int layers, int channels, int num_classes, int in_channels, "
      "int image_size) -> Tensor");

  // --- fused cell: gather, node output, slot statistics (csrc/cell) -------
  // Semantics in csrc/cell/DESIGN.md ("Ops"); references in
  // bnao/ops/fused/reference.py. gather_rows: out[r] = the top-left corner of
  // stacks[select[r]][rows[r]] zero-padded to `shape` (zeros where select[r] < 0).
  // Precondition: rows are unique per stack within a call (the backward writes
  // without atomics; the CPU kernels check it). stack_sizes of the backward:
  // per stack its row count then its trailing sizes, flattened.
  m.def("gather_rows(Tensor[] stacks, Tensor select, Tensor rows, int[] shape) -> Tensor");
  m.def("gather_rows_backward(Tensor grad, Tensor select, Tensor rows, int[] stack_sizes) -> Tensor[]");
  // A node's state from its two round-2 results pre [2, N, C, H, W]: the sum
  // of the non-zero branches, BN2-normalised where flagged, times drop_mask
  // [N, 2] where the drop flag is set. The backward returns the gradients of
  // pre, mean, invstd, gamma and beta (zero for branches without BN2).
  m.def(
      "node_output(Tensor pre, Tensor code, Tensor mean, Tensor invstd, Tensor gamma, Tensor beta, "
      "Tensor? drop_mask) -> Tensor");
  m.def(
      "node_output_backward(Tensor grad, Tensor pre, Tensor code, Tensor mean, Tensor invstd, Tensor gamma, "
      "Tensor? drop_mask) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // Folds slot-BN batch statistics into a stage's running statistics in place,
  // as Supernet._update_slot_stats: for each k with bn_rows[k] >= 0,
  // lerp(mean) and lerp((1/invstd^2 - eps) * count/(count-1)) by momentum.
  m.def(
      "update_slot_stats(Tensor(a!) running_mean, Tensor(b!) running_var, Tensor bn_rows, Tensor mean, "
      "Tensor invstd, float momentum, float eps, int count) -> ()");
}
