"""The nodes of a fused cell as one autograd node (``csrc/cell/DESIGN.md``, "Cell-level backward").

Run op by op under autograd, a cell's backward adds the gradient of each state once per node that may
read it: ``branch_round``'s backward returns a dense gradient for every source of round 1, and autograd
sums them (about 20 additions per cell, each a kernel launch). :func:`fused_nodes` runs the same compiled
ops in one :class:`torch.autograd.Function` whose backward keeps one gradient buffer per state and lets
``branch_round_backward_accumulate`` add each node's contribution in place. Per node the forward is
``branch_round(1)``, ``branch_round(2)``, ``node_output`` and the backward their three backward ops; per
cell the backward adds one ``stack`` (the incoming gradients of the node states, copied into the buffer); the
cell inputs' buffers are written by the first round-1 backward (``overwrite_below=2``), not zero-filled.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch

from ... import extension

Tensor = torch.Tensor

#: Per node, the tensors the backward needs: round 1's and round 2's (pre, mean, invstd).
_SAVED_PER_NODE = 6
#: Compiled ops :func:`fused_nodes` calls.
CELL_NODE_OPS = ("branch_round", "branch_round_backward", "branch_round_backward_accumulate", "node_output",
                 "node_output_backward")


def has_fused_nodes(device_type: str) -> bool:
    """Whether every op of :func:`fused_nodes` has a compiled kernel for ``device_type``."""
    return all(extension.has_kernel(op, device_type) for op in CELL_NODE_OPS)


def _node_mask(drop_mask: Optional[Tensor], node: int) -> Optional[Tensor]:
    return drop_mask[:, 2 * node : 2 * node + 2] if drop_mask is not None else None


def _split_roles(weights: Sequence[Tensor], num_nodes: int) -> List[Sequence[Tensor]]:
    """``weights`` holds 8 roles x ``num_nodes`` tensors, role-major; returns one per-node sequence per role."""
    return [weights[r * num_nodes : (r + 1) * num_nodes] for r in range(len(weights) // num_nodes)]


class _FusedNodes(torch.autograd.Function):
    """Every node of a cell: outputs the node states, then the slot BNs' statistics (not differentiable)."""

    @staticmethod
    def forward(ctx, s0, s1, code, drop_mask, reduction, eps, *weights):  # noqa: D102
        num_nodes = code.shape[0]
        dw1, pw1, g1, b1, dw2, pw2, g2, b2 = _split_roles(weights, num_nodes)
        ops = torch.ops.bnao
        states = [s0, s1]
        saved: List[Tensor] = []
        stats_mean: List[Tensor] = []
        stats_invstd: List[Tensor] = []
        for node in range(num_nodes):
            node_code = code[node]
            pre1, mean1, invstd1 = ops.branch_round(states, node_code, 1, dw1[node], pw1[node], None, None, None, None,
                                                    eps, reduction)
            pre2, mean2, invstd2 = ops.branch_round([pre1], node_code, 2, dw2[node], pw2[node], mean1, invstd1,
                                                    g1[node], b1[node], eps, reduction)
            states.append(ops.node_output(pre2, node_code, mean2, invstd2, g2[node], b2[node],
                                          _node_mask(drop_mask, node)))
            saved += [pre1, mean1, invstd1, pre2, mean2, invstd2]
            stats_mean += [mean1, mean2]
            stats_invstd += [invstd1, invstd2]
        ctx.reduction = reduction
        ctx.num_nodes = num_nodes
        ctx.num_weights = len(weights)
        ctx.save_for_backward(s0, s1, code, drop_mask, *weights, *saved, *states[2:])
        stats = stats_mean + stats_invstd
        ctx.mark_non_differentiable(*stats)
        # The statistics get no gradient: no zero tensors for them (one launch each) in the backward.
        ctx.set_materialize_grads(False)
        return (*states[2:], *stats)

    @staticmethod
    def backward(ctx, *grads):  # noqa: D102
        num_nodes = ctx.num_nodes
        s0, s1, code, drop_mask, *rest = ctx.saved_tensors
        weights = rest[: ctx.num_weights]
        saved = rest[ctx.num_weights : ctx.num_weights + _SAVED_PER_NODE * num_nodes]
        nodes_out = rest[ctx.num_weights + _SAVED_PER_NODE * num_nodes :]
        dw1, pw1, g1, b1, dw2, pw2, g2, b2 = _split_roles(weights, num_nodes)
        # One buffer per state: the incoming gradients of the node states (copied: they are autograd's) and,
        # for the cell inputs, uninitialised memory that the last node's round-1 backward (every node reads the
        # inputs' slots) writes rather than adds to; every other round-1 backward adds into the buffers.
        incoming = [g if g is not None else torch.zeros_like(out) for g, out in zip(grads[:num_nodes], nodes_out)]
        grad_states = [*torch.empty((2, *s0.shape), dtype=s0.dtype, device=s0.device).unbind(0),
                       *torch.stack(incoming).unbind(0)]
        states = [s0, s1, *nodes_out]
        grad_weights: List[List[Optional[Tensor]]] = [[None] * num_nodes for _ in range(8)]
        ops = torch.ops.bnao
        for node in reversed(range(num_nodes)):
            pre1, mean1, invstd1, pre2, mean2, invstd2 = saved[_SAVED_PER_NODE * node : _SAVED_PER_NODE * (node + 1)]
            node_code = code[node]
            grad_pre2, grad_mean2, grad_invstd2, grad_g2, grad_b2 = ops.node_output_backward(
                grad_states[node + 2], pre2, node_code, mean2, invstd2, g2[node], _node_mask(drop_mask, node))
            (grad_pre1,), grad_dw2, grad_pw2, grad_mean1, grad_invstd1, grad_g1, grad_b1 = ops.branch_round_backward(
                grad_pre2, grad_mean2, grad_invstd2, [pre1], node_code, 2, dw2[node], pw2[node], mean1, invstd1,
                g1[node], b1[node], pre2, mean2, invstd2, ctx.reduction)
            grad_dw1, grad_pw1 = ops.branch_round_backward_accumulate(
                grad_states[: node + 2], grad_pre1, grad_mean1, grad_invstd1, states[: node + 2], node_code,
                dw1[node], pw1[node], pre1, mean1, invstd1, ctx.reduction, 2 if node == num_nodes - 1 else 0)
            for role, grad in enumerate((grad_dw1, grad_pw1, grad_g1, grad_b1, grad_dw2, grad_pw2, grad_g2, grad_b2)):
                grad_weights[role][node] = grad
        flat = [grad for role in grad_weights for grad in role]
        return (grad_states[0], grad_states[1], None, None, None, None, *flat)


def fused_nodes(s0: Tensor, s1: Tensor, code: Tensor, weights: Sequence[Sequence[Tensor]],
                drop_mask: Optional[Tensor], reduction: bool, eps: float) -> Tuple[List[Tensor], List[Tensor],
                                                                                    List[Tensor]]:
    """Runs every node of a cell with the compiled ops, as one autograd node.

    Args:
        s0: Calibrated cell input 0 ``[N, C, H, W]`` (contiguous).
        s1: Calibrated cell input 1, same shape.
        code: int32 ``[B, 2, NUM_FIELDS]`` branch codes on the activations' device.
        weights: The 8 roles of :class:`~bnao.ops.fused.cell.NodeWeights`, each a sequence of ``B`` per-node
            tensors (``[2, ...]``).
        drop_mask: ``[N, 2B]`` drop-path multipliers or None.
        reduction: Reduction cell.
        eps: BN epsilon.

    Returns:
        ``(node states, means, invstds)``: ``B`` states ``[N, C, Ho, Wo]``; per node round 1's then round 2's
        batch statistics ``[2, C]`` (``2B`` each, not differentiable).
    """
    num_nodes = code.shape[0]
    flat = [tensor for role in weights for tensor in role]
    outputs = _FusedNodes.apply(s0, s1, code, drop_mask, reduction, float(eps), *flat)
    return (list(outputs[:num_nodes]), list(outputs[num_nodes : 3 * num_nodes]),
            list(outputs[3 * num_nodes :]))
