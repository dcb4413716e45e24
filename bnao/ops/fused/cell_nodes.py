"""The nodes of a fused cell as one autograd node (``csrc/cell/DESIGN.md``, "Cell-level backward").

Run op by op under autograd, a cell's backward adds the gradient of each state once per node that may
read it: ``branch_round``'s backward returns a dense gradient for every source of round 1, and autograd
sums them (about 20 additions per cell, each a kernel launch). :func:`fused_nodes` runs the same compiled
ops in one :class:`torch.autograd.Function` whose backward keeps one gradient buffer per state and lets
``branch_round_backward_accumulate`` add each node's contribution in place. Per node the forward is
``branch_round(1)``, ``branch_round(2)``, ``node_output`` and the backward their three backward ops; per
cell the backward adds one ``stack`` (the incoming gradients of the node states, copied into the buffer); the
cell inputs' buffers are written by the first round-1 backward (``overwrite_below=2``), not zero-filled.
:func:`fused_nodes_and_combine` takes the cell's combine into the same node: its backward starts the buffers
from ``combine_backward``'s state gradients, which removes that ``stack`` and, in normal cells (whose combine
reads the cell inputs themselves), autograd's addition of each cell input's two gradients.
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
    """Every node of a cell, and optionally its combine.

    Without a combine weight it outputs the node states, then the slot BNs' statistics (not differentiable).
    With one (``combine_weight``, ``loose``; ``c0``/``c1`` the combine's states 0 and 1, None where they are the
    cell inputs themselves) it outputs the combine's result instead of the node states: the backward then takes
    the states' gradients from ``combine_backward`` as its buffers (fresh tensors it may add into), so neither a
    copy of the incoming gradients nor autograd's addition of the cell inputs' two gradients is needed.
    """

    @staticmethod
    def forward(ctx, s0, s1, code, drop_mask, reduction, eps, c0, c1, combine_weight, loose, *weights):  # noqa: D102
        num_nodes = code.shape[0]
        states, saved, stats = _forward_nodes(s0, s1, code, drop_mask, reduction, eps, weights)
        ctx.reduction = reduction
        ctx.num_nodes = num_nodes
        ctx.num_weights = len(weights)
        ctx.combine = combine_weight is not None
        ctx.own_inputs = c0 is None  # fused_nodes_and_combine passes c0 and c1 together or neither
        extra = []
        if ctx.combine:
            combine_states = [s0 if c0 is None else c0, s1 if c1 is None else c1, *states[2:]]
            outputs = (torch.ops.bnao.combine(combine_states, combine_weight, loose),)
            extra = [combine_states[0], combine_states[1], combine_weight, loose]
        else:
            outputs = tuple(states[2:])
        ctx.save_for_backward(s0, s1, code, drop_mask, *weights, *saved, *states[2:], *extra)
        ctx.mark_non_differentiable(*stats)
        # The statistics get no gradient: no zero tensors for them (one launch each) in the backward.
        ctx.set_materialize_grads(False)
        return (*outputs, *stats)

    @staticmethod
    @torch.autograd.function.once_differentiable  # compiled ops without autograd, buffers written in place
    def backward(ctx, *grads):  # noqa: D102
        num_nodes = ctx.num_nodes
        s0, s1, code, drop_mask, *rest = ctx.saved_tensors
        weights = rest[: ctx.num_weights]
        saved = rest[ctx.num_weights : ctx.num_weights + _SAVED_PER_NODE * num_nodes]
        nodes_out = rest[ctx.num_weights + _SAVED_PER_NODE * num_nodes :][:num_nodes]
        grad_combine = (None, None, None)  # c0, c1, combine weight
        if ctx.combine:
            grad_states, grad_combine, overwrite = _combine_buffers(ctx, grads[0], s0, rest[-4:], nodes_out)
        else:
            grad_states, overwrite = _incoming_buffers(grads[:num_nodes], s0, nodes_out), 2
        flat = _backward_nodes(ctx, grad_states, overwrite, s0, s1, code, drop_mask, weights, saved, nodes_out)
        return (grad_states[0], grad_states[1], None, None, None, None, *grad_combine, None, *flat)


def _forward_nodes(s0: Tensor, s1: Tensor, code: Tensor, drop_mask: Optional[Tensor], reduction: bool, eps: float,
                   weights: Sequence[Tensor]) -> Tuple[List[Tensor], List[Tensor], List[Tensor]]:
    """``(states, saved, stats)``: the cell inputs then the node states; per node round 1's and round 2's
    ``(pre, mean, invstd)``; every node's means, then every node's inverse deviations."""
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
    return states, saved, stats_mean + stats_invstd


def _incoming_buffers(grads: Sequence[Optional[Tensor]], s0: Tensor, nodes_out: Sequence[Tensor]) -> List[Tensor]:
    """One gradient buffer per state when the node states are outputs: their incoming gradients (copied: they
    are autograd's) and, for the cell inputs, uninitialised memory that the last node's round-1 backward (every
    node reads the inputs' slots) writes rather than adds to."""
    incoming = [g if g is not None else torch.zeros_like(out) for g, out in zip(grads, nodes_out)]
    return [*torch.empty((2, *s0.shape), dtype=s0.dtype, device=s0.device).unbind(0),
            *torch.stack(incoming).unbind(0)]


def _combine_buffers(ctx, grad_out: Optional[Tensor], s0: Tensor, combine_saved: Sequence[Tensor],
                     nodes_out: Sequence[Tensor]) -> Tuple[List[Tensor], Tuple[Optional[Tensor], ...], int]:
    """The gradient buffers when the combine is inside: ``combine_backward``'s state gradients.

    Returns:
        ``(buffers, (grad c0, grad c1, grad weight), overwrite)``: ``overwrite`` is 0 when the combine read the
        cell inputs themselves (their buffers then start from its gradient and every node adds), else 2 (the
        cell inputs' buffers are uninitialised and the last node's round-1 backward writes them).
    """
    c0, c1, weight, loose = combine_saved
    if grad_out is None:  # the output fed nothing that needs a gradient
        grad_out = torch.zeros_like(nodes_out[0])
    combine_states = [c0, c1, *nodes_out]
    grad_states, grad_weight = torch.ops.bnao.combine_backward(grad_out.contiguous(), combine_states, weight, loose)
    grad_states = list(grad_states)
    if ctx.own_inputs:
        return grad_states, (None, None, grad_weight), 0
    inputs = list(torch.empty((2, *s0.shape), dtype=s0.dtype, device=s0.device).unbind(0))
    return inputs + grad_states[2:], (grad_states[0], grad_states[1], grad_weight), 2


def _backward_nodes(ctx, grad_states: List[Tensor], overwrite: int, s0: Tensor, s1: Tensor, code: Tensor,
                    drop_mask: Optional[Tensor], weights: Sequence[Tensor], saved: Sequence[Tensor],
                    nodes_out: Sequence[Tensor]) -> List[Optional[Tensor]]:
    """Every node's backward, last node first, adding the sources' gradients into ``grad_states`` in place;
    returns the weights' gradients, role-major. The last node's round-1 backward writes the first
    ``overwrite`` buffers instead of adding to them."""
    num_nodes = ctx.num_nodes
    dw1, pw1, g1, b1, dw2, pw2, g2, b2 = _split_roles(weights, num_nodes)
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
            dw1[node], pw1[node], pre1, mean1, invstd1, ctx.reduction, overwrite if node == num_nodes - 1 else 0)
        for role, grad in enumerate((grad_dw1, grad_pw1, grad_g1, grad_b1, grad_dw2, grad_pw2, grad_g2, grad_b2)):
            grad_weights[role][node] = grad
    return [grad for role in grad_weights for grad in role]


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
    outputs = _FusedNodes.apply(s0, s1, code, drop_mask, reduction, float(eps), None, None, None, None, *flat)
    return (list(outputs[:num_nodes]), list(outputs[num_nodes : 3 * num_nodes]),
            list(outputs[3 * num_nodes :]))


def fused_nodes_and_combine(s0: Tensor, s1: Tensor, code: Tensor, weights: Sequence[Sequence[Tensor]],
                            drop_mask: Optional[Tensor], reduction: bool, eps: float,
                            combine_inputs: Optional[Tuple[Tensor, Tensor]], combine_weight: Tensor,
                            loose: Tensor) -> Tuple[Tensor, List[Tensor], List[Tensor]]:
    """:func:`fused_nodes` followed by :func:`~bnao.ops.fused.combine.combine` of the states, as one autograd node.

    Args:
        s0, s1, code, weights, drop_mask, reduction, eps: As for :func:`fused_nodes`.
        combine_inputs: The combine's states 0 and 1 where they are not the cell inputs (a reduction cell's
            factorized-reduced inputs); None: the cell inputs themselves (their gradient buffers then start from
            the combine's gradient).
        combine_weight: ``[C, B + 2, C]`` combine weight (``param_dtype`` of the activations).
        loose: ``[B + 2]`` 0/1 mask of the loose ends, in the weight's dtype (takes no gradient).

    Returns:
        ``(out, means, invstds)``: the combine's result ``[N, C, Ho, Wo]`` (before the cell's BN) and the node
        statistics as :func:`fused_nodes` returns them.
    """
    num_nodes = code.shape[0]
    flat = [tensor for role in weights for tensor in role]
    c0, c1 = combine_inputs if combine_inputs is not None else (None, None)
    outputs = _FusedNodes.apply(s0, s1, code, drop_mask, reduction, float(eps), c0, c1, combine_weight, loose,
                                *flat)
    return outputs[0], list(outputs[1 : 1 + 2 * num_nodes]), list(outputs[1 + 2 * num_nodes :])
