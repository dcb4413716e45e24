"""Which weights an arch trains: the masks of :class:`~bnao.supernet.optim.MaskedSGD`.

NAO keeps every (op, input id) slot in its own parameter, so a step updates only the slots its arch used.
The supernet stacks slots into a few tensors; per arch, a 0/1 value per stacked row (per slot), per column
of each cell's combine weight (per state) and per input reduction of a reduction cell says what the arch
uses. :func:`touched_values` lists them in one fixed layout (:func:`touched_layout`), the same for every arch,
so that a pool's values stack into one device table (``bnao.supernet.graph_step``); :func:`touched_masks`
turns one arch's values into the optimizer's per-parameter masks. Both are built on the host: a new arch
costs one host-to-device copy, no per-tensor fill launches.
"""

from __future__ import annotations

from typing import Dict, List, NamedTuple, Tuple, Union

import torch
import torch.nn as nn

from ..ops.schedule import ROLES
from ..device import to_device


class TouchedEntry(NamedTuple):
    """Parameters sharing one 0/1 mask in :func:`touched_values` (``values[start : start + length]``).

    ``kind``: ``"rows"`` (stacked slot tensors of op ``op`` in stage ``stage``: one value per row),
    ``"columns"`` (the combine weight ``[C, B+2, C]`` of cell ``stage``: one per state) or ``"scalar"`` (the
    factorized reduce of input ``op`` of reduction cell ``stage``: used or not).
    """

    kind: str
    params: List[nn.Parameter]
    start: int
    length: int
    stage: int
    op: int

    def mask_shape(self, param: nn.Parameter) -> Tuple[int, ...]:
        """The shape of this entry's mask for ``param``: it broadcasts against the parameter."""
        if self.kind == "columns":
            return (1, self.length, 1)
        return (self.length, *([1] * (param.dim() - 1)))

    def view(self, flat: torch.Tensor, param: nn.Parameter) -> torch.Tensor:
        """This entry's mask in ``flat`` (a row of values), shaped to broadcast against ``param``."""
        return flat.narrow(-1, self.start, self.length).view(self.mask_shape(param))


def touched_layout(net) -> List[TouchedEntry]:
    """One entry per group of parameters of ``net`` sharing a mask, in a fixed order."""
    entries, start = [], 0
    for g in range(net.num_stages):
        for o in net.slot_ops[g]:
            params = [net.slot_tensor(g, o, r) for r in ROLES[net.table[o][0]]]
            entries.append(TouchedEntry("rows", params, start, params[0].shape[0], g, o))
            start += params[0].shape[0]
    for ci, fx in zip(net.cell_info, net.fixed):
        entries.append(TouchedEntry("columns", [fx.comb_w], start, net.num_nodes + 2, ci.index, -1))
        start += net.num_nodes + 2
        if ci.reduction:
            for i, params in ((0, (fx.red0_w, fx.red0_bn.weight, fx.red0_bn.bias)),
                              (1, (fx.red1_w, fx.red1_bn.weight, fx.red1_bn.bias))):
                entries.append(TouchedEntry("scalar", list(params), start, 1, ci.index, i))
                start += 1
    return entries


def touched_values(net, plan) -> List[float]:
    """0/1 per row of ``net.touched_layout()``: the slot rows, combine columns and input reductions the plan's
    arch uses. The same length for every arch (unused groups are all zeros)."""
    values: List[float] = []
    for entry in net.touched_layout():
        if entry.kind == "rows":
            row_mask = [0.0] * entry.length
            for r in plan.host_gather.get((entry.stage, entry.op), ()):
                row_mask[r] = 1.0
            values += row_mask
        elif entry.kind == "columns":
            loose = plan.host_loose[net.cell_info[entry.stage].reduction]
            values += [1.0 if state in loose else 0.0 for state in range(entry.length)]
        else:
            values.append(1.0 if entry.op in plan.host_loose[True] else 0.0)
    return values


def touched_masks(net, plan) -> Dict[nn.Parameter, Union[bool, torch.Tensor]]:
    """The optimizer's masks for the plan's arch.

    Returns:
        ``param -> False`` for parameters the arch does not use at all and ``param -> mask`` (a float tensor of
        0/1 broadcastable to the parameter) for stacked parameters it uses in part. Parameters it uses entirely
        are absent. :class:`~bnao.supernet.optim.MaskedSGD` uses this to leave untouched slots alone, as NAO's
        one-parameter-per-slot optimizer does.
    """
    parameter = next(net.parameters())
    values = touched_values(net, plan)
    flat = to_device(values, parameter.dtype, parameter.device)
    masks: Dict[nn.Parameter, Union[bool, torch.Tensor]] = {}
    for entry in net.touched_layout():
        if entry.kind == "scalar":  # an input reduction: unused, or used entirely (no mask)
            masks.update((p, False) for p in entry.params if values[entry.start] == 0.0)
            continue
        unused = entry.kind == "rows" and (entry.stage, entry.op) not in plan.host_gather
        for p in entry.params:
            masks[p] = False if unused else entry.view(flat, p)
    return masks
