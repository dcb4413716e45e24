"""The smallest and largest model size in a whole search space, exactly, at one network shape.

A budget that no arch can meet must be refused before any training, with the
range the space does cover. The space is far too large to enumerate (about
2.6e25 archs for B=5), but its size function has a structure that makes the
extremes an exact search over a few thousand archs:

* **Branch costs add up.** A branch's parameters and multiply-adds depend
  only on its op and on its *class*: a normal-cell branch (stride 1), a
  reduction-cell branch reading a cell input (stride 2, identity becomes a
  factorized reduce) or a reduction-cell branch reading a node (stride 1).
  Every branch of a class sees the same channels and resolutions in every
  cell of that type, so all branches of a class share one cost per op, and a
  branch's op changes nothing else in the network.
* **Everything else depends on the input ids alone**, through each cell's
  *interface*: its number of loose ends ``L`` (the cell outputs ``L * C``
  channels, which sizes the next cells' calibration convs and the
  classifier), how many of the cell inputs 0 and 1 are loose ends ``k`` (in a
  reduction cell each gets a factorized reduce) and how many branches read a
  cell input ``m`` (the count of stride-2 branches).

So ``size = G(interface_normal, interface_reduction) + sum of branch costs``,
and for a fixed choice of input ids the best ops are, independently for every
branch, the cheapest (or dearest) op of its class. The search therefore
enumerates every reachable interface ``(L, k, m)`` of a cell (a small dynamic
programme over the nodes), builds for every pair of interfaces the arch with
the extreme op of each branch class (found by probing one branch of the class
with every op), and takes the min / max of their exact sizes from
:func:`bnao.model_size`. ``tests/test_budget.py`` checks the result against
brute-force enumeration of small spaces and random samples of the full one.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple, Union

import numpy as np

from ..space.nao import NAOSpace
from . import DEFAULT_IMAGE_SIZE, model_size, resolve_space

MEASURE_COLUMNS = {"params": 0, "madds": 1}


@dataclass(frozen=True)
class SizeRange:
    """The extremes of one size measure over a search space.

    Attributes:
        smallest: Smallest size of any arch.
        largest: Largest size of any arch.
        smallest_arch: An arch of that smallest size (``[8B]`` int64).
        largest_arch: An arch of that largest size.
    """

    smallest: int
    largest: int
    smallest_arch: np.ndarray
    largest_arch: np.ndarray


def _interfaces(num_nodes: int) -> Dict[Tuple[int, int, int], List[int]]:
    """Every reachable cell interface ``(L, k, m)`` with the input ids (``[x0, y0, x1, y1, ...]``) of one cell having it.

    Dynamic programme over the nodes: the state is (set of states used as an input so far, branches reading a
    cell input), at most ``2^(B+2) * (2B+1)`` states, each kept with the first id list that reached it.
    """
    frontier: Dict[Tuple[int, int], List[int]] = {(0, 0): []}
    for node in range(num_nodes):
        node_id = node + 2
        reached: Dict[Tuple[int, int], List[int]] = {}
        for (used, reads_input), ids in frontier.items():
            for x in range(node_id):
                for y in range(node_id):
                    key = (used | (1 << x) | (1 << y), reads_input + (x < 2) + (y < 2))
                    if key not in reached:
                        reached[key] = ids + [x, y]
        frontier = reached
    interfaces: Dict[Tuple[int, int, int], List[int]] = {}
    for (used, reads_input), ids in frontier.items():
        loose = [s for s in range(num_nodes + 2) if not used >> s & 1]
        key = (len(loose), sum(1 for s in loose if s < 2), reads_input)
        interfaces.setdefault(key, ids)
    return interfaces


def _cell(ids: List[int], op_normal_or_node: int, op_input: int) -> List[int]:
    """A cell from its input ids: branches reading a cell input get ``op_input``, the others the other op."""
    cell = []
    for i in range(0, len(ids), 2):
        for branch_id in ids[i : i + 2]:
            cell += [branch_id, op_input if branch_id < 2 else op_normal_or_node]
    return cell


def _probe_ops(space: NAOSpace, sizes_of) -> Dict[str, np.ndarray]:
    """Per branch class, the size of the network as one probe branch of that class takes every op: ``[ops, 2]``."""
    B, ops = space.num_nodes, space.num_ops
    base = np.zeros(space.length, dtype=np.int64)  # every branch reads input 0 with op 0: valid in any space
    probes = {}
    # (class, position of the probed op): node 0's x op of the normal cell; node 0's x op of the reduction cell
    # (it reads input 0: stride 2); node 1's x op of the reduction cell made to read node 2 (stride 1).
    positions = {"normal": (1, None), "reduction_input": (4 * B + 1, None)}
    if B >= 2:
        positions["reduction_node"] = (4 * B + 5, (4 * B + 4, 2))
    for name, (op_pos, id_change) in positions.items():
        archs = np.repeat(base[None, :], ops, axis=0)
        if id_change is not None:
            archs[:, id_change[0]] = id_change[1]
        archs[:, op_pos] = np.arange(ops)
        probes[name] = sizes_of(archs)
    return probes


@functools.lru_cache(maxsize=64)
def _extremes_cached(num_nodes: int, op_set: str, skeleton: str, layers: int, channels: int, classes: int,
                     in_channels: int, image_size: int, backend: str) -> Dict[str, SizeRange]:
    space = NAOSpace(num_nodes=num_nodes, op_set=op_set)

    def sizes_of(archs: np.ndarray) -> np.ndarray:
        return model_size(archs, space=space, skeleton=skeleton, layers=layers, channels=channels, classes=classes,
                          in_channels=in_channels, image_size=image_size, measure="both", backend=backend)

    probes = _probe_ops(space, sizes_of)
    interfaces = list(_interfaces(num_nodes).values())
    result = {}
    for measure, column in MEASURE_COLUMNS.items():
        candidates = []
        for pick in (np.argmin, np.argmax):
            op = {name: int(pick(values[:, column])) for name, values in probes.items()}
            op_node = op.get("reduction_node", 0)
            normal_cells = [_cell(ids, op["normal"], op["normal"]) for ids in interfaces]
            reduction_cells = [_cell(ids, op_node, op["reduction_input"]) for ids in interfaces]
            for normal in normal_cells:
                candidates += [normal + reduction for reduction in reduction_cells]
        archs = np.asarray(candidates, dtype=np.int64)
        sizes = sizes_of(archs)[:, column]
        low, high = int(np.argmin(sizes)), int(np.argmax(sizes))
        result[measure] = SizeRange(int(sizes[low]), int(sizes[high]), archs[low].copy(), archs[high].copy())
    return result


def size_extremes(space: Union[str, NAOSpace] = "small", skeleton: str = "cifar", layers: int = 3,
                  channels: int = 20, classes: int = 10, in_channels: int = 3, image_size: Optional[int] = None,
                  backend: str = "auto") -> Dict[str, SizeRange]:
    """Exact smallest and largest parameters and multiply-adds of any arch of ``space`` at one network shape.

    Args:
        space: Op-set name or :class:`~bnao.space.NAOSpace`.
        skeleton, layers, channels, classes, in_channels, image_size, backend: as :func:`bnao.model_size`.

    Returns:
        ``{"params": SizeRange, "madds": SizeRange}``, each with an arch attaining each extreme.
    """
    space = resolve_space(space)
    if image_size is None:
        image_size = DEFAULT_IMAGE_SIZE.get(skeleton, 32)
    return _extremes_cached(space.num_nodes, space.op_set, skeleton, int(layers), int(channels), int(classes),
                            int(in_channels), int(image_size), backend)


__all__ = ["SizeRange", "size_extremes"]
