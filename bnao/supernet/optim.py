"""SGD with momentum that leaves untouched weight-sharing slots alone.

NAO keeps every (op, input id) slot in its own parameter. Under PyTorch >= 2
an unused parameter's ``.grad`` stays None after ``zero_grad()`` and SGD skips
it: no weight decay, no momentum step, the momentum buffer is kept. The
supernet stacks slots into a few tensors, whose unused rows get a zero
gradient instead; plain SGD would decay them and keep moving them with their
momentum. :class:`MaskedSGD` takes, per step, the row masks of
:meth:`bnao.supernet.Supernet.touched_masks` and updates only the used rows:

    d   = g + wd * p                 (rows used this step)
    buf = momentum * buf + d         (rows used; others keep their buffer)
    p   = p - lr * buf               (rows used; others unchanged)

which is exactly ``torch.optim.SGD`` (dampening 0, no Nesterov) applied to the
per-slot parameters that got a gradient. All updates are ``torch._foreach_*``
calls over the few stacked tensors, with no host synchronisation.
"""

from __future__ import annotations

from typing import Dict, Iterable, List, Optional, Tuple, Union

import torch

MaskEntry = Union[bool, torch.Tensor]


class MaskedSGD(torch.optim.Optimizer):
    """SGD with momentum and weight decay, restricted to the rows a step used.

    Args:
        params: Parameters (one group).
        lr: Learning rate (changed per step through ``param_groups[0]["lr"]``).
        momentum: Momentum factor.
        weight_decay: L2 penalty added to the gradient.
    """

    def __init__(self, params: Iterable[torch.nn.Parameter], lr: float = 0.025, momentum: float = 0.9,
                 weight_decay: float = 3e-4):
        if lr < 0 or momentum < 0 or weight_decay < 0:
            raise ValueError(f"lr, momentum and weight_decay must be >= 0 (got {lr}, {momentum}, {weight_decay})")
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, masks: Optional[Dict[torch.nn.Parameter, MaskEntry]] = None, closure=None):  # noqa: D417
        """One update.

        Args:
            masks: ``param -> False`` (skip), ``param -> mask`` (0/1 tensor broadcastable to the parameter:
                update only the rows where it is 1). Parameters not in ``masks`` are updated fully;
                parameters whose ``.grad`` is None are skipped.
        """
        if closure is not None:
            raise ValueError("MaskedSGD does not take a closure")
        masks = masks or {}
        for group in self.param_groups:
            lr, mom, wd = group["lr"], group["momentum"], group["weight_decay"]
            full: Tuple[list, list, list] = ([], [], [])
            part: Tuple[list, list, list, list] = ([], [], [], [])
            for p in group["params"]:
                if p.grad is None:
                    continue
                m = masks.get(p)
                if m is False:
                    continue
                state = self.state[p]
                buf = state.get("momentum_buffer")
                if buf is None:
                    buf = state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                if m is None or m is True:
                    full[0].append(p)
                    full[1].append(p.grad)
                    full[2].append(buf)
                else:
                    part[0].append(p)
                    part[1].append(p.grad)
                    part[2].append(buf)
                    part[3].append(m)
            if full[0]:
                masked_sgd_update(*full, None, lr, mom, wd)
            if part[0]:
                masked_sgd_update(*part, lr, mom, wd)
        return None


def masked_sgd_update(params: List[torch.Tensor], grads: List[torch.Tensor], buffers: List[torch.Tensor],
                      masks: Optional[List[torch.Tensor]], lr: Union[float, torch.Tensor], momentum: float,
                      weight_decay: float) -> None:
    """SGD with momentum on the rows where ``masks`` is 1; rows where it is 0 do not change (buffers included).

    The one formula of :class:`MaskedSGD` and of the captured step (``bnao.supernet.graph_step``), with the
    same ops for a float and a 0-dim tensor ``lr`` (so both give the same bits). Where a mask is 1 the
    momentum factor ``1 + (momentum - 1) * mask`` is ``momentum`` (exactly, for momenta in [0.5, 1]: the
    subtraction is exact), so a fully used parameter moves as it would unmasked.

    Args:
        params: Parameters, updated in place.
        grads: Their gradients (finite), overwritten with ``d`` (times the mask).
        buffers: Momentum buffers, updated in place.
        masks: 0/1 tensors broadcastable to each parameter; None: every row.
        lr: Learning rate, a float or a 0-dim tensor on the parameters' device (what a CUDA graph replays).
        momentum: Momentum factor.
        weight_decay: L2 penalty added to the gradient.
    """
    if weight_decay:
        torch._foreach_add_(grads, params, alpha=weight_decay)
    if masks is not None:
        torch._foreach_mul_(grads, masks)  # d on used rows, 0 elsewhere
    if momentum:
        if masks is None:
            torch._foreach_mul_(buffers, momentum)
        else:
            factors = torch._foreach_mul(masks, momentum - 1.0)
            torch._foreach_add_(factors, 1.0)
            torch._foreach_mul_(buffers, factors)
        torch._foreach_add_(buffers, grads)
        steps = buffers
    else:
        steps = grads
    if masks is None:
        torch._foreach_add_(params, torch._foreach_mul(steps, -lr))
    else:
        torch._foreach_addcmul_(params, steps, torch._foreach_mul(masks, -lr))
