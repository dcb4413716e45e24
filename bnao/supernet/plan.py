"""Per-arch plans of the supernet's forward: the cell schedules and device indices of one arch (cached by
:class:`~bnao.supernet.Supernet` per arch and device)."""

from __future__ import annotations

from typing import Dict, List, Tuple

import torch

from ..ops.schedule import cell_schedule
from ..device import to_device

__all__ = ["Plan", "build_plan"]


class Plan:
    """Everything a forward needs for one arch on one device (cached per arch)."""

    __slots__ = ("arch", "normal", "reduce", "gather", "chunk_sizes", "chunk_start", "bn_rows", "loose",
                 "masks", "fused", "host_gather", "host_loose")


def build_plan(net, arch: Tuple[int, ...], device: torch.device) -> Plan:
    """The :class:`Plan` of ``arch`` on ``device``: its cell schedules and every index a forward reads, copied to
    the device at once."""
    L = net.space.cell_length
    normal, reduce = arch[:L], arch[L:]
    sched = {False: cell_schedule(normal, False, net.table), True: cell_schedule(reduce, True, net.table)}
    ints: List[int] = []
    segs: Dict[tuple, Tuple[int, int]] = {}

    def add(key, values):
        segs[key] = (len(ints), len(values))
        ints.extend(values)

    plan = Plan()
    plan.arch, plan.normal, plan.reduce = arch, normal, reduce
    plan.chunk_sizes, plan.chunk_start = {}, {}
    for g in range(net.num_stages):
        for o in net.slot_ops[g]:
            idx, sizes = [], []
            for ci in net.stage_cells[g]:
                s = sched[ci.reduction]
                plan.chunk_start[(ci.index, o)] = len(sizes)
                sizes.extend(s.op_chunks.get(o, ()))
                for pos, inp in s.op_slots.get(o, ()):
                    idx.append(net.slot_index(ci.index, pos // 2, pos % 2, inp, o))
            if idx:
                add(("g", g, o), idx)
                plan.chunk_sizes[(g, o)] = sizes
        rows = []
        for ci in net.stage_cells[g]:
            for pos, o, j in sched[ci.reduction].bn_slots:
                rows.append((ci.local * 2 * net.num_nodes + pos) * net._bn_per_branch + net._bn_offset[o] + j)
        add(("bn", g), rows)
    add(("loose", False), sched[False].loose)
    add(("loose", True), sched[True].loose)
    # One host-to-device copy per new arch, from pinned memory so that it does not block the host (pool
    # evaluation builds a plan per arch); the pinned block is not reused before the copy has run.
    dev = to_device(ints, torch.int64, device)
    view = {k: dev.narrow(0, a, n) for k, (a, n) in segs.items()}
    plan.gather = {(k[1], k[2]): v for k, v in view.items() if k[0] == "g"}
    plan.bn_rows = {k[1]: v for k, v in view.items() if k[0] == "bn"}
    plan.loose = {False: view[("loose", False)], True: view[("loose", True)]}
    plan.host_gather = {(k[1], k[2]): ints[a : a + n] for k, (a, n) in segs.items() if k[0] == "g"}
    plan.host_loose = {False: sched[False].loose, True: sched[True].loose}
    plan.masks = None
    plan.fused = None  # the fused path's FusedArchData, built on first use
    return plan
