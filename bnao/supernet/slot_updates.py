"""The supernet trainer's eager optimizer step under ``unused_slot_update`` (see :mod:`bnao.supernet.trainer`).

Both policies go through :class:`~bnao.supernet.optim.MaskedSGD`, which
updates only the rows a step's masks select:

* ``"freeze"``: the masks are the step arch's own
  (:meth:`~bnao.supernet.Supernet.touched_masks`), so slots it does not use
  stay put.
* ``"decay"``: the masks are the slots used at least once so far (kept in the
  trainer's ``ever_used``), and such slots unused by this step get the zero
  gradient the reference's PyTorch kept for them, so momentum and weight
  decay still move them.
"""

from __future__ import annotations

from typing import Any, Dict, List, Tuple

import torch

#: Values of ``unused_slot_update`` (see the :mod:`bnao.supernet.trainer` docstring).
UNUSED_SLOT_UPDATES = ("decay", "freeze")


class SlotUpdateMixin:
    """Gradient clipping and the masked SGD update of :class:`~bnao.supernet.trainer.SupernetTrainer`.

    The host class provides ``model``, ``params``, ``optimizer`` (a :class:`~bnao.supernet.optim.MaskedSGD`),
    ``grad_clip``, ``unused_slot_update`` and ``ever_used`` (per parameter in ``params`` order: None, True or a
    0/1 row mask tensor).
    """

    def _optimizer_step(self, arch, lr: float) -> None:
        """Clips the gradients (when ``grad_clip``) and applies one masked SGD step at learning rate ``lr``.

        Args:
            arch: The step's arch (a tuple of ints), whose slots were trained.
            lr: The step's learning rate.
        """
        if self.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip, foreach=True)
        self.optimizer.param_groups[0]["lr"] = lr
        self.optimizer.step(self._update_masks(arch))

    def _update_masks(self, arch) -> Dict[torch.nn.Parameter, Any]:
        """The MaskedSGD masks of one step under :attr:`unused_slot_update`."""
        touched = self.model.touched_masks(arch)
        if self.unused_slot_update == "freeze":
            return touched
        masks: Dict[torch.nn.Parameter, Any] = {}
        grow: Tuple[List[torch.Tensor], List[torch.Tensor]] = ([], [])  # (ever, used) pairs: one foreach max
        for i, param in enumerate(self.params):
            used, ever = touched.get(param, True), self.ever_used[i]
            if used is True or ever is True:
                ever = True
            elif used is not False:
                if ever is None:
                    ever = used.clone()
                else:
                    grow[0].append(ever)
                    grow[1].append(used)
            self.ever_used[i] = ever
            if ever is None:
                masks[param] = False
                continue
            if ever is not True:
                masks[param] = ever
            if param.grad is None:
                # Unused by this step's arch but used before: the reference's kept zero gradient.
                param.grad = torch.zeros_like(param)
        if grow[0]:
            torch._foreach_maximum_(grow[0], grow[1])  # in place: the masks above alias these tensors
        return masks


__all__ = ["UNUSED_SLOT_UPDATES", "SlotUpdateMixin"]
