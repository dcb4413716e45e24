"""The NAO / ENAS cell search space (SPEC section 2).

An architecture is a normal cell followed by a reduction cell. Each cell has
``B`` nodes with ids ``2..B+1``; node ``k`` stores ``[x_id, x_op, y_id, y_op]``
where each id is an earlier state (``0..k-1``) and each op an index into the
op set. The flat integer form, ``4*B*2`` integers with the normal cell first,
is the reference's string form and the row layout of every pool array.

Single archs are :class:`Arch` values; pools are ``int64`` arrays of shape
``[n, 8*B]`` and every per-arch operation here has a vectorised twin
(``*_array``) so that pools of millions stay cheap.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np

from .ops import OP_SETS

CELL_NAMES = ("normal", "reduction")
FIELD_NAMES = ("x_id", "x_op", "y_id", "y_op")


class InvalidArchError(ValueError):
    """An architecture does not belong to the search space."""


@dataclass(frozen=True)
class Arch:
    """One architecture: the normal and the reduction cell.

    Attributes:
        normal: ``4*B`` integers of the normal cell.
        reduction: ``4*B`` integers of the reduction cell.
    """

    normal: Tuple[int, ...]
    reduction: Tuple[int, ...]

    def to_list(self) -> List[int]:
        """Flat list, normal cell first (the reference's layout)."""
        return list(self.normal) + list(self.reduction)

    def to_array(self) -> np.ndarray:
        """Flat ``int64`` array, normal cell first."""
        return np.asarray(self.to_list(), dtype=np.int64)

    def __str__(self) -> str:
        return " ".join(str(v) for v in self.to_list())

    def to_json(self) -> str:
        """JSON object ``{"normal": [...], "reduction": [...]}``."""
        return json.dumps({"normal": list(self.normal), "reduction": list(self.reduction)})


ArchLike = Union[Arch, str, Sequence[int], np.ndarray, dict]

_MASK64 = (1 << 64) - 1


class NAOSpace:
    """The NAO cell space with ``num_nodes`` nodes per cell and one op set.

    Args:
        num_nodes: Nodes per cell (``B``; default 5).
        op_set: ``"small"`` (default) or ``"middle"``.
    """

    name = "nao"

    def __init__(self, num_nodes: int = 5, op_set: str = "small"):
        if op_set not in OP_SETS:
            raise ValueError(f"unknown op set {op_set!r}; choose one of {sorted(OP_SETS)}")
        if not isinstance(num_nodes, int) or num_nodes < 1:
            raise ValueError(f"num_nodes must be a positive integer, got {num_nodes!r}")
        self.num_nodes = num_nodes
        self.op_set = op_set
        self.op_names = OP_SETS[op_set]
        self.num_ops = len(self.op_names)
        self.cell_length = 4 * num_nodes
        self.length = 2 * self.cell_length
        # Upper bound (exclusive) of every position of the flat form.
        bounds = []
        for _cell in range(2):
            for node in range(num_nodes):
                node_id = node + 2
                bounds += [node_id, self.num_ops, node_id, self.num_ops]
        self.bounds = np.asarray(bounds, dtype=np.int64)
        self._is_id = np.tile(np.array([True, False, True, False]), 2 * num_nodes)

    # ------------------------------------------------------------------ identity
    def config(self) -> dict:
        """Arguments that rebuild this space (``create_search_space("nao", **config)``)."""
        return {"num_nodes": self.num_nodes, "op_set": self.op_set}

    def __repr__(self) -> str:
        return f"NAOSpace(num_nodes={self.num_nodes}, op_set={self.op_set!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, NAOSpace) and self.config() == other.config()

    def __hash__(self) -> int:
        return hash((self.name, self.num_nodes, self.op_set))

    # -------------------------------------------------------------- validation
    def _describe(self, pos: int) -> str:
        cell, rest = divmod(pos, self.cell_length)
        node, field = divmod(rest, 4)
        return f"{CELL_NAMES[cell]} cell, node {node + 2} (position {pos}), {FIELD_NAMES[field]}"

    def validate(self, values: Sequence[int]) -> None:
        """Checks one flat arch; raises :class:`InvalidArchError` naming the cell, node and position."""
        if len(values) != self.length:
            raise InvalidArchError(
                f"an arch of the {self.op_set!r} space with B={self.num_nodes} has "
                f"{self.length} integers (4*B per cell, normal cell first), got {len(values)}"
            )
        for pos, v in enumerate(values):
            if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)):
                raise InvalidArchError(f"{self._describe(pos)}: {v!r} is not an integer")
            bound = int(self.bounds[pos])
            if not 0 <= v < bound:
                if self._is_id[pos]:
                    raise InvalidArchError(
                        f"{self._describe(pos)}: input id {v} is not an earlier state "
                        f"(node {bound} takes ids 0..{bound - 1})"
                    )
                raise InvalidArchError(
                    f"{self._describe(pos)}: op {v} is out of range "
                    f"(the {self.op_set!r} op set has ops 0..{self.num_ops - 1}: {', '.join(self.op_names)})"
                )

    def invalid_rows(self, archs: np.ndarray) -> np.ndarray:
        """Boolean mask of the rows of an ``[n, 8B]`` array that are not valid archs."""
        archs = np.asarray(archs)
        if archs.ndim != 2 or archs.shape[1] != self.length:
            raise InvalidArchError(f"expected an array of shape [n, {self.length}], got {archs.shape}")
        return ((archs < 0) | (archs >= self.bounds)).any(axis=1)

    def validate_array(self, archs: np.ndarray) -> np.ndarray:
        """Checks a pool array; returns it as ``int64`` or raises naming the first bad row."""
        arr = np.asarray(archs)
        if not np.issubdtype(arr.dtype, np.integer):
            raise InvalidArchError(f"archs must be integers, got dtype {arr.dtype}")
        arr = arr.astype(np.int64, copy=False)
        if arr.ndim == 1:
            arr = arr[None, :]
        bad = np.flatnonzero(self.invalid_rows(arr))
        if bad.size:
            row = int(bad[0])
            try:
                self.validate([int(v) for v in arr[row]])
            except InvalidArchError as err:
                raise InvalidArchError(f"arch {row}: {err}") from None
        return arr

    # ------------------------------------------------------------ conversions
    def arch(self, value: ArchLike) -> Arch:
        """Converts a string, JSON, list, array or :class:`Arch` into a validated :class:`Arch`."""
        if isinstance(value, Arch):
            flat: List = value.to_list()
        elif isinstance(value, str):
            return self.parse(value)
        elif isinstance(value, dict):
            if set(value) != {"normal", "reduction"}:
                raise InvalidArchError(
                    f"an arch object has exactly the keys 'normal' and 'reduction', got {sorted(value)}"
                )
            cells = (value["normal"], value["reduction"])
            if not all(isinstance(cell, (list, tuple, np.ndarray)) for cell in cells):
                raise InvalidArchError("an arch object's 'normal' and 'reduction' are lists of integers, got "
                                       f"{type(cells[0]).__name__} and {type(cells[1]).__name__}")
            flat = list(cells[0]) + list(cells[1])
        elif isinstance(value, np.ndarray):
            flat = list(value.reshape(-1).tolist())
        elif isinstance(value, (list, tuple)):
            flat = list(value)
        else:
            raise InvalidArchError("an arch is a string, a list of integers or an object with 'normal' and "
                                   f"'reduction', got {type(value).__name__}")
        self.validate(flat)
        flat = [int(v) for v in flat]
        return Arch(tuple(flat[: self.cell_length]), tuple(flat[self.cell_length :]))

    def parse(self, text: str) -> Arch:
        """Parses the reference's string form (``"0 1 0 1 ..."``) or a JSON list/object."""
        text = text.strip()
        if text.startswith("[") or text.startswith("{"):
            try:
                value = json.loads(text)
            except json.JSONDecodeError as err:
                raise InvalidArchError(f"arch is not valid JSON: {err}") from None
            if isinstance(value, str):
                raise InvalidArchError("arch JSON must be a list or an object")
            return self.arch(value)
        tokens = text.replace(",", " ").split()
        values: List = []
        for pos, tok in enumerate(tokens):
            try:
                values.append(int(tok))
            except ValueError:
                raise InvalidArchError(f"position {pos}: {tok!r} is not an integer") from None
        return self.arch(values)

    def format(self, arch: ArchLike) -> str:
        """The reference's string form of an arch."""
        return str(self.arch(arch))

    # ---------------------------------------------------------------- tokens
    @property
    def vocab_size(self) -> int:
        """Controller vocabulary: SOS/EOS, ``B+1`` input ids and the ops."""
        return 1 + (self.num_nodes + 1) + self.num_ops

    def encode(self, archs: Union[ArchLike, np.ndarray]) -> np.ndarray:
        """NAO tokens: ids ``+1``, ops ``+1+(B+1)``; token 0 is SOS/EOS.

        Args:
            archs: One arch or an ``[n, 8B]`` array.

        Returns:
            ``int64`` tokens of the same leading shape.
        """
        arr = self._as_array(archs)
        return np.where(self._is_id, arr + 1, arr + 2 + self.num_nodes)

    def decode(self, tokens: np.ndarray) -> np.ndarray:
        """Inverse of :meth:`encode`; validates the result."""
        tok = np.asarray(tokens, dtype=np.int64)
        arr = np.where(self._is_id, tok - 1, tok - 2 - self.num_nodes)
        return self.validate_array(arr).reshape(tok.shape)

    def token_bounds(self) -> Tuple[np.ndarray, np.ndarray]:
        """Per position, the ``[low, high)`` range of valid tokens (for constrained decoding)."""
        low = np.where(self._is_id, 1, 2 + self.num_nodes)
        high = low + self.bounds
        return low, high

    # ---------------------------------------------------------- canonical form
    def canonical_array(self, archs: np.ndarray) -> np.ndarray:
        """Orders the two branches of every node so that swapped archs compare equal."""
        arr = np.array(self._as_array(archs), dtype=np.int64, copy=True)
        shape = arr.shape
        nodes = arr.reshape(-1, 2 * self.num_nodes, 2, 2)  # [n, node, branch, (id, op)]
        x_key = nodes[:, :, 0, 0] * 64 + nodes[:, :, 0, 1]
        y_key = nodes[:, :, 1, 0] * 64 + nodes[:, :, 1, 1]
        swap = y_key < x_key
        nodes[swap] = nodes[swap][:, ::-1, :]
        return nodes.reshape(shape)

    def hash_array(self, archs: np.ndarray) -> np.ndarray:
        """64-bit canonical hashes (``uint64``) of archs; branch swaps give equal hashes."""
        canon = self.canonical_array(archs)
        flat = canon.reshape(-1, self.length).astype(np.uint64)
        with np.errstate(over="ignore"):
            h = np.full(flat.shape[0], 0x9E3779B97F4A7C15 ^ (self.num_nodes << 8) ^ self.num_ops, dtype=np.uint64)
            for j in range(self.length):
                h = (h ^ (flat[:, j] + np.uint64(j + 1))) * np.uint64(0x100000001B3)
                h ^= h >> np.uint64(29)
            # splitmix64 finaliser: spreads the bits so that prefixes of the hash are usable too.
            h = (h ^ (h >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
            h = (h ^ (h >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
            h ^= h >> np.uint64(31)
        return h.reshape(canon.shape[:-1])

    def hash(self, arch: ArchLike) -> str:
        """Canonical hash of one arch as 16 hex digits."""
        return f"{int(self.hash_array(self.arch(arch).to_array())):016x}"

    # ------------------------------------------------------------ generation
    def sample_array(self, n: int, rng: Union[np.random.Generator, int, None] = None) -> np.ndarray:
        """``n`` uniformly random archs as an ``[n, 8B]`` ``int64`` array."""
        rng = np.random.default_rng(rng)
        return (rng.random((n, self.length)) * self.bounds).astype(np.int64)

    def sample(self, rng: Union[np.random.Generator, int, None] = None) -> Arch:
        """One uniformly random arch."""
        return self.arch(self.sample_array(1, rng)[0])

    def mutate(self, arch: ArchLike, rng: Union[np.random.Generator, int, None] = None, num_changes: int = 1) -> Arch:
        """Changes ``num_changes`` random positions to other valid values."""
        rng = np.random.default_rng(rng)
        values = self.arch(arch).to_array()
        mutable = np.flatnonzero(self.bounds > 1)
        for pos in rng.choice(mutable, size=min(num_changes, mutable.size), replace=False):
            bound = int(self.bounds[pos])
            values[pos] = (values[pos] + 1 + rng.integers(bound - 1)) % bound
        return self.arch(values)

    # ----------------------------------------------------------------- helpers
    def _as_array(self, archs) -> np.ndarray:
        if isinstance(archs, (Arch, str, dict)):
            return self.arch(archs).to_array()
        arr = np.asarray(archs, dtype=np.int64)
        if arr.shape[-1] != self.length:
            raise InvalidArchError(f"expected archs of length {self.length}, got shape {arr.shape}")
        return arr

    def to_archs(self, archs: np.ndarray) -> List[Arch]:
        """Rows of a pool array as :class:`Arch` values."""
        return [self.arch(row) for row in np.asarray(archs)]

    def from_archs(self, archs: Iterable[ArchLike]) -> np.ndarray:
        """Stacks archs (any accepted form) into an ``[n, 8B]`` array."""
        rows = [self.arch(a).to_array() for a in archs]
        if not rows:
            return np.zeros((0, self.length), dtype=np.int64)
        return np.stack(rows)


def infer_space(length: int, op_set: str = "small") -> Optional[NAOSpace]:
    """The space whose flat arch length is ``length`` (``8*B``), or None."""
    if length % 8 or length == 0:
        return None
    return NAOSpace(length // 8, op_set)
