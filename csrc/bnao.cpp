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

  // --- data (csrc/data) ----------------------------------------------------
  // A batch from a device-resident uint8 dataset [images, (H+2pad)*(W+2pad), C] (zero-padded storage):
  // output b reads image index[b], randomly cropped and flipped by params[b] = (dy, dx, flip, cy, cx)
  // (none: the plain images, pad 0), normalised as data * scale + shift (one fused multiply-add) and zeroed
  // in the cutout square; float32 [B, H, W, C]. Reference: bnao/ops/augment.py.
  m.def(
      "gather_augment(Tensor data, Tensor index, Tensor? params, int height, int width, int pad, int cutout, "
      "Tensor scale, Tensor shift) -> Tensor");

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

  // A cell's output before its BN from all its states (the inputs, then the B
  // nodes, each [N, C, H, W]): sum over the loose ends s (loose[s] != 0) of
  // loose[s] * weight[:, s, :] . ReLU(states[s]), weight [C, S, C]; states that
  // are not loose are not read. The backward returns the gradient of every
  // state (zeros where not loose) and of the weight (zero columns likewise).
  m.def("combine(Tensor[] states, Tensor weight, Tensor loose) -> Tensor");
  m.def("combine_backward(Tensor grad, Tensor[] states, Tensor weight, Tensor loose) -> (Tensor[], Tensor)");

  // --- fused cell: branch rounds (csrc/cell) -------------------------------
  // One round of the two branches of a node (csrc/cell/DESIGN.md, "branch_round"):
  // returns pre [2, N, C, Ho, Wo] and the batch statistics [2, C] of the round's
  // BN (mean, 1/sqrt(biased var + eps); 0 and 1 for branches without it). The
  // branch code is read on the device. `reduction` fixes the output resolution
  // without reading the code: ceil(H/2) of the cell inputs (sources 0 and 1).
  m.def(
      "branch_round(Tensor[] sources, Tensor code, int round, Tensor dw, Tensor pw, Tensor? in_mean, "
      "Tensor? in_invstd, Tensor? in_gamma, Tensor? in_beta, float eps, bool reduction=False) "
      "-> (Tensor, Tensor, Tensor)");
  // Gradients of every float input of branch_round given those of its outputs:
  // (sources (each dense, zeros where no branch read it), dw, pw, in_mean,
  // in_invstd, in_gamma, in_beta); the last four are empty [0] in round 1.
  m.def(
      "branch_round_backward(Tensor grad_pre, Tensor grad_mean, Tensor grad_invstd, Tensor[] sources, "
      "Tensor code, int round, Tensor dw, Tensor pw, Tensor? in_mean, Tensor? in_invstd, Tensor? in_gamma, "
      "Tensor? in_beta, Tensor pre, Tensor mean, Tensor invstd, bool reduction=False) "
      "-> (Tensor[], Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // Round 1's backward that adds each source's gradient to grad_sources[i] in
  // place (the fused cell sums every reader of a state into one buffer, with no
  // separate add per reader); the buffers of sources i < overwrite_below are
  // written instead (they may hold anything). Returns the gradients of dw, pw.
  m.def(
      "branch_round_backward_accumulate(Tensor(a!)[] grad_sources, Tensor grad_pre, Tensor grad_mean, "
      "Tensor grad_invstd, Tensor[] sources, Tensor code, Tensor dw, Tensor pw, Tensor pre, Tensor mean, "
      "Tensor invstd, bool reduction=False, int overwrite_below=0) -> (Tensor, Tensor)");
}
