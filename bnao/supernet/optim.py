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

from typing import Dict, Iterable, Optional, Tuple, Union

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
                ps, gs, bs = full
                if wd:
                    torch._foreach_add_(gs, ps, alpha=wd)
                if mom:
                    torch._foreach_mul_(bs, mom)
                    torch._foreach_add_(bs, gs)
                    torch._foreach_add_(ps, bs, alpha=-lr)
                else:
                    torch._foreach_add_(ps, gs, alpha=-lr)
            if part[0]:
                ps, gs, bs, ms = part
                if wd:
                    torch._foreach_add_(gs, ps, alpha=wd)
                torch._foreach_mul_(gs, ms)  # d on used rows, 0 elsewhere
                if mom:
                    # buf += (mom - 1) * mask * buf, i.e. momentum decay on used rows only; then += d.
                    torch._foreach_addcmul_(bs, bs, ms, value=mom - 1.0)
                    torch._foreach_add_(bs, gs)
                    torch._foreach_addcmul_(ps, bs, ms, value=-lr)
                else:
                    torch._foreach_add_(ps, gs, alpha=-lr)
        return None
