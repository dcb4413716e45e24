"""``branch_round``: one round of the two branches of a node (``csrc/cell/DESIGN.md``, "branch_round").

:func:`branch_round` runs ``torch.ops.bnao.branch_round`` when the compiled core has a kernel for the
activations' device, and otherwise the pure-PyTorch reference
(:func:`~bnao.ops.fused.reference.branch_round_reference`), which defines the semantics. The compiled
op reads the branch code on the device, so its launches do not depend on the arch; its gradient is
``torch.ops.bnao.branch_round_backward``, attached here with ``torch.library.register_autograd``, and
both ops get fake (meta) kernels for ``torch.compile`` and ``opcheck``.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch

from ... import extension
from .code import NUM_FIELDS
from .reference import Norm, branch_round_reference

Tensor = torch.Tensor

__all__ = ["ACTIVATION_DTYPES", "branch_round", "has_compiled_branch_round", "param_dtype"]

#: Activation dtypes the compiled fused-cell ops take.
ACTIVATION_DTYPES = (torch.float32, torch.float64, torch.bfloat16)


def param_dtype(activations: torch.dtype) -> torch.dtype:
    """The dtype of the weights, BN statistics and affine parameters (and their gradients) of the fused-cell ops
    for activations of dtype ``activations``: float32 under bfloat16 (bf16 storage, fp32 arithmetic), else the
    same (``csrc/cell/compute_type.h``)."""
    return torch.float32 if activations == torch.bfloat16 else activations


def has_compiled_branch_round(device: torch.device | str = "cpu") -> bool:
    """True when ``torch.ops.bnao.branch_round`` has a kernel for ``device``'s type."""
    return extension.has_kernel("branch_round", torch.device(device).type)


def branch_round(sources: Sequence[Tensor], code: Tensor, round_index: int, dw: Tensor, pw: Tensor,
                 in_norm: Optional[Norm] = None, eps: float = 1e-5, *,
                 reduction: bool = False) -> Tuple[Tensor, Tensor, Tensor]:
    """One round of a node's two branches; differentiable in every float argument.

    Args:
        sources: Round 1: the states the node may read (``[N, C, H, W]``; in a reduction cell the cell
            inputs 0 and 1 are ``H x W`` and the nodes ``ceil(H/2) x ceil(W/2)``). Round 2: ``[pre1]``.
        code: The node's ``[2, NUM_FIELDS]`` int32 branch code, on the activations' device.
        round_index: 1 or 2.
        dw: ``[2, C, 7, 7]`` depthwise weights (top-left ``k x k`` used), in :func:`param_dtype` of the sources'
            dtype (float32 for bfloat16 sources, whose arithmetic runs in float32).
        pw: ``[2, C, C]`` pointwise weights (round 1: also the factorized reduce's), like ``dw``.
        in_norm: Round 2 only: round 1's ``(mean, invstd, gamma, beta)`` (``[2, C]`` each, like ``dw``).
        eps: BN epsilon.
        reduction: The node belongs to a reduction cell: round 1's result has half the resolution
            (rounded up) of the cell inputs. The compiled op needs it because it does not read the
            code on the host; the reference ignores it.

    Returns:
        ``(pre [2, N, C, Ho, Wo], mean [2, C], invstd [2, C])``, as ``branch_round_reference``; ``pre`` in the
        sources' dtype, the statistics in :func:`param_dtype` of it.
    """
    device = sources[0].device
    if has_compiled_branch_round(device):
        mean, invstd, gamma, beta = in_norm if in_norm is not None else (None,) * 4
        return torch.ops.bnao.branch_round(list(sources), code, round_index, dw, pw, mean, invstd, gamma, beta,
                                           float(eps), reduction)
    return branch_round_reference(sources, code, round_index, dw, pw, in_norm, eps)


# --------------------------------------------------------------------------- fake kernels
def _round_shape(sources: Sequence[Tensor], round_index: int, reduction: bool):
    """``(N, C, Ho, Wo)`` of the round's result (mirrors ``check_sources`` in branch_round_ops.h)."""
    torch._check(round_index in (1, 2), lambda: f"round must be 1 or 2, got {round_index}")
    torch._check(len(sources) >= 1, lambda: "at least one source expected")
    first = sources[0]
    torch._check(first.dtype in ACTIVATION_DTYPES,
                 lambda: f"sources must be float32, float64 or bfloat16, got {first.dtype}")
    if round_index == 2:
        torch._check(len(sources) == 1 and first.dim() == 5 and first.shape[0] == 2,
                     lambda: "round 2 takes one source, pre1 [2, N, C, Ho, Wo]")
        return tuple(first.shape[1:])
    torch._check(first.dim() == 4, lambda: f"round-1 sources must be [N, C, H, W], got {tuple(first.shape)}")
    batch, channels, height, width = first.shape
    if reduction:
        height, width = (height + 1) // 2, (width + 1) // 2
    return batch, channels, height, width


def _check_fake_args(sources, code, dw, pw, channels) -> None:
    first = sources[0]
    torch._check(code.dtype == torch.int32 and tuple(code.shape) == (2, NUM_FIELDS),
                 lambda: f"code must be int32 [2, {NUM_FIELDS}], got {code.dtype} {tuple(code.shape)}")
    for name, t, shape in (("dw", dw, (2, channels, 7, 7)), ("pw", pw, (2, channels, channels))):
        torch._check(t.dtype == param_dtype(first.dtype),
                     lambda: f"{name} must be {param_dtype(first.dtype)} for {first.dtype} sources")
        torch._check(t.dim() == len(shape), lambda: f"{name} must have shape {shape}")


def _register_fakes() -> None:
    @torch.library.register_fake("bnao::branch_round")
    def _branch_round_fake(sources, code, round_index, dw, pw, in_mean, in_invstd, in_gamma, in_beta, eps,
                           reduction=False):
        batch, channels, height, width = _round_shape(sources, round_index, reduction)
        _check_fake_args(sources, code, dw, pw, channels)
        first = sources[0]
        stats = param_dtype(first.dtype)
        return (first.new_empty((2, batch, channels, height, width)), first.new_empty((2, channels), dtype=stats),
                first.new_empty((2, channels), dtype=stats))

    @torch.library.register_fake("bnao::branch_round_backward")
    def _branch_round_backward_fake(grad_pre, grad_mean, grad_invstd, sources, code, round_index, dw, pw, in_mean,
                                    in_invstd, in_gamma, in_beta, pre, mean, invstd, reduction=False):
        _, channels, _, _ = _round_shape(sources, round_index, reduction)
        _check_fake_args(sources, code, dw, pw, channels)
        norm_shape = (2, channels) if round_index == 2 else (0,)
        grads_norm = tuple(dw.new_empty(norm_shape) for _ in range(4))
        return ([torch.empty_like(s) for s in sources], torch.empty_like(dw), torch.empty_like(pw)) + grads_norm

    @torch.library.register_fake("bnao::branch_round_backward_accumulate")
    def _branch_round_backward_accumulate_fake(grad_sources, grad_pre, grad_mean, grad_invstd, sources, code, dw, pw,
                                               pre, mean, invstd, reduction=False, overwrite_below=0):
        _, channels, _, _ = _round_shape(sources, 1, reduction)
        _check_fake_args(sources, code, dw, pw, channels)
        torch._check(len(grad_sources) == len(sources),
                     lambda: "bnao::branch_round_backward_accumulate: one gradient buffer per source expected")
        return torch.empty_like(dw), torch.empty_like(pw)


# --------------------------------------------------------------------------- autograd
_NORM_SLOTS = 4


def _setup_context(ctx, inputs, output) -> None:
    sources, code, round_index, dw, pw, in_mean, in_invstd, in_gamma, in_beta, _eps, *rest = inputs
    pre, mean, invstd = output
    ctx.round_index = round_index
    ctx.reduction = bool(rest[0]) if rest else False
    ctx.num_sources = len(sources)
    ctx.save_for_backward(code, dw, pw, in_mean, in_invstd, in_gamma, in_beta, pre, mean, invstd, *sources)


def _backward(ctx, grad_pre, grad_mean, grad_invstd):
    code, dw, pw, in_mean, in_invstd, in_gamma, in_beta, pre, mean, invstd, *sources = ctx.saved_tensors
    # An output that does not reach the loss has no gradient: it contributes nothing.
    grad_pre = torch.zeros_like(pre) if grad_pre is None else grad_pre
    grad_mean = torch.zeros_like(mean) if grad_mean is None else grad_mean
    grad_invstd = torch.zeros_like(invstd) if grad_invstd is None else grad_invstd
    grads = torch.ops.bnao.branch_round_backward(grad_pre, grad_mean, grad_invstd, sources, code, ctx.round_index,
                                                 dw, pw, in_mean, in_invstd, in_gamma, in_beta, pre, mean, invstd,
                                                 ctx.reduction)
    grad_sources, grad_dw, grad_pw = grads[:3]
    grad_norm: List[Optional[Tensor]] = list(grads[3:]) if ctx.round_index == 2 else [None] * _NORM_SLOTS
    # One gradient per argument the caller passed: `inputs` above has the defaults filled in, but the dispatcher
    # drops a trailing `reduction` equal to its default from the call that register_autograd compares the
    # backward's result with (torch 2.11 to 2.14), and needs_input_grad has that call's structure.
    return (list(grad_sources), None, None, grad_dw, grad_pw, *grad_norm, None, None)[:len(ctx.needs_input_grad)]


if extension.has_ops() and hasattr(torch.ops.bnao, "branch_round"):
    _register_fakes()
    torch.library.register_autograd("bnao::branch_round", _backward, setup_context=_setup_context)
