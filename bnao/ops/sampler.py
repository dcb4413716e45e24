"""Alias-method sampling ops: dispatch to the compiled kernels, with a reference.

Two ops make up size-proportional sampling:

* :func:`alias_table` builds Vose's alias table of a weight vector, packed one
  int64 per column as ``(threshold << 32) | alias``;
* :func:`alias_draw` draws indices from a table with counter-based
  Philox4x32-10 random numbers: draw ``i`` of stream ``(seed, offset)`` uses the
  counter ``offset + i``, so a sequence is reproducible from its seed on every
  device and in every process, however it is chunked.

Each op runs ``torch.ops.bnao.*`` when the compiled core has a kernel for the
tensor's device and otherwise the NumPy reference in this module
(:func:`reference_alias_table`, :func:`reference_alias_draw`). The reference
performs the same IEEE double operations in the same order as
``csrc/sampler/alias.h``, so both build bit-identical tables and draw identical
indices; it is the oracle of the tests.
"""

from __future__ import annotations

from typing import Tuple

import numpy as np
import torch

from .. import extension

__all__ = [
    "alias_table",
    "alias_draw",
    "reference_alias_table",
    "reference_alias_draw",
    "reference_philox4x32_10",
    "unpack_table",
    "table_probabilities",
    "to_signed_seed",
]

_MASK32 = np.uint64(0xFFFFFFFF)
_SHIFT32 = np.uint64(32)
_PHILOX_M0 = np.uint64(0xD2511F53)
_PHILOX_M1 = np.uint64(0xCD9E8D57)
_PHILOX_W0 = 0x9E3779B9
_PHILOX_W1 = 0xBB67AE85
_PHILOX_ROUNDS = 10
_MAX_ITEMS = 0xFFFFFFFF  # aliases are stored in 32 bits
_THRESHOLD_MAX = 0xFFFFFFFF
_TWO32 = 4294967296.0
# Reference draws are computed in chunks so that its temporaries stay small.
_REFERENCE_CHUNK = 1 << 20


# --------------------------------------------------------------------------- Philox
def reference_philox4x32_10(
    counter: Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray], key: Tuple[int, int]
) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Philox4x32-10 (Random123 layout), vectorised over counters.

    Args:
        counter: Four uint64 arrays holding the 32-bit words c0..c3 of each counter.
        key: The two 32-bit key words (k0, k1).

    Returns:
        Four uint64 arrays holding the 32-bit output words r0..r3.
    """
    c0, c1, c2, c3 = (np.asarray(c, dtype=np.uint64) for c in counter)
    k0, k1 = int(key[0]) & 0xFFFFFFFF, int(key[1]) & 0xFFFFFFFF
    for _ in range(_PHILOX_ROUNDS):
        # 32x32 -> 64-bit products are exact in uint64.
        p0 = _PHILOX_M0 * c0
        p1 = _PHILOX_M1 * c2
        c0, c1, c2, c3 = (
            (p1 >> _SHIFT32) ^ c1 ^ np.uint64(k0),
            p1 & _MASK32,
            (p0 >> _SHIFT32) ^ c3 ^ np.uint64(k1),
            p0 & _MASK32,
        )
        k0 = (k0 + _PHILOX_W0) & 0xFFFFFFFF
        k1 = (k1 + _PHILOX_W1) & 0xFFFFFFFF
    return c0, c1, c2, c3


def _mulhi64(a: np.ndarray, b: int) -> np.ndarray:
    """High 64 bits of a * b for uint64 ``a`` and 0 <= b < 2^64 (schoolbook on 32-bit halves)."""
    a_lo, a_hi = a & _MASK32, a >> _SHIFT32
    b_lo, b_hi = np.uint64(b & 0xFFFFFFFF), np.uint64(b >> 32)
    ll, lh, hl, hh = a_lo * b_lo, a_lo * b_hi, a_hi * b_lo, a_hi * b_hi
    mid = (ll >> _SHIFT32) + (lh & _MASK32) + (hl & _MASK32)
    return hh + (lh >> _SHIFT32) + (hl >> _SHIFT32) + (mid >> _SHIFT32)


def to_signed_seed(seed: int) -> int:
    """Maps any Python int to the int64 whose bit pattern is ``seed mod 2^64`` (the op's seed argument)."""
    seed = int(seed) % (1 << 64)
    return seed - (1 << 64) if seed >= (1 << 63) else seed


# --------------------------------------------------------------------------- table build
def _weights_problem(w: np.ndarray) -> str:
    """Returns a message naming what is wrong with a float64 weight vector, or "" when usable."""
    if w.ndim != 1:
        return (
            f"weights must be a 1-D tensor with one weight per item, got shape {tuple(w.shape)}; "
            "flatten it (weights.reshape(-1)) or pass one row"
        )
    if w.size == 0:
        return "weights are empty; pass at least one item"
    if w.size > _MAX_ITEMS:
        return f"at most 2^32 - 1 items are supported, got {w.size}; split the pool"
    bad = np.flatnonzero(~np.isfinite(w) | (w < 0))
    if bad.size:
        i = int(bad[0])
        if not np.isfinite(w[i]):
            return (
                f"weight {i} is {w[i]}; every weight must be finite "
                "(replace NaN/inf, e.g. with torch.nan_to_num)"
            )
        return f"weight {i} is negative ({w[i]}); weights must be >= 0 (use 0 to exclude an item)"
    return ""


def _sequential_sum(w: np.ndarray) -> float:
    # Left-to-right, like the C++ loop (np.sum is pairwise and could differ in the last bit).
    with np.errstate(over="ignore"):  # the caller reports an infinite sum
        return float(np.cumsum(w)[-1])


def _threshold_of(prob: float) -> int:
    if not prob < 1.0:
        return _THRESHOLD_MAX
    return min(int(np.floor(prob * _TWO32)), _THRESHOLD_MAX)


def reference_alias_table(weights: torch.Tensor) -> torch.Tensor:
    """Vose's alias table in NumPy, bit-identical to ``torch.ops.bnao.alias_table``.

    The steps (and their order) follow ``build_table`` in ``csrc/sampler/alias.h``:
    sum left to right; ``scale = n / sum``; ``p = w * scale``; small/large
    stacks filled in index order and popped from the top; a pair (s, l) gives
    column s its threshold and alias l and sets ``p[l] = (p[l] + p[s]) - 1``.
    The pairing loop is a Python loop (about 1 us an item), which is why the
    compiled kernel is preferred.

    Args:
        weights: 1-D floating tensor of non-negative, finite weights, not all zero.

    Returns:
        int64 tensor of n packed columns ``(threshold << 32) | alias`` on ``weights.device``.

    Raises:
        ValueError: The weights are not usable (the message says why and how to fix it).
    """
    if not isinstance(weights, torch.Tensor) or not weights.is_floating_point():
        kind = weights.dtype if isinstance(weights, torch.Tensor) else type(weights).__name__
        raise ValueError(f"weights must be a floating-point tensor, got {kind}; convert it with weights.double()")
    w = weights.detach().to("cpu", torch.float64).contiguous().numpy()
    problem = _weights_problem(w)
    if problem:
        raise ValueError(problem)
    total = _sequential_sum(w)
    if not np.isfinite(total):
        raise ValueError("the weights sum to infinity; divide them by their maximum")
    if not total > 0.0:
        raise ValueError("all weights are zero; give at least one item a positive weight")
    n = w.size
    scale = float(n) / total
    scaled = w * scale  # one IEEE multiply per item, as in C++
    # Python floats are IEEE doubles: the loop below does the C++ arithmetic exactly.
    p = scaled.tolist()
    small = np.flatnonzero(scaled < 1.0).tolist()
    large = np.flatnonzero(~(scaled < 1.0)).tolist()
    thresholds = [0] * n
    aliases = [0] * n
    while small and large:
        s = small.pop()
        l = large.pop()
        thresholds[s] = _threshold_of(p[s])
        aliases[s] = l
        remaining = (p[l] + p[s]) - 1.0
        p[l] = remaining
        (small if remaining < 1.0 else large).append(l)
    for l in large:
        thresholds[l] = _THRESHOLD_MAX
        aliases[l] = l
    if small:
        # Left over only through rounding: a positive column keeps its whole
        # column; a zero-weight one points at the first heaviest item so it
        # is never drawn.
        heaviest = int(np.argmax(w))
        for s in small:
            if w[s] > 0.0:
                thresholds[s], aliases[s] = _THRESHOLD_MAX, s
            else:
                thresholds[s], aliases[s] = 0, heaviest
    packed = (np.asarray(thresholds, dtype=np.uint64) << _SHIFT32) | np.asarray(aliases, dtype=np.uint64)
    return torch.from_numpy(packed.view(np.int64)).to(weights.device)


# --------------------------------------------------------------------------- draws
def _check_draw_args(table: torch.Tensor, num_draws: int, offset: int) -> None:
    if not isinstance(table, torch.Tensor) or table.dim() != 1 or table.dtype != torch.int64:
        raise ValueError("table must be the 1-D int64 tensor returned by alias_table")
    if table.numel() == 0:
        raise ValueError("table is empty; build it from at least one weight")
    if int(num_draws) < 0:
        raise ValueError(f"num_draws must be >= 0, got {num_draws}")
    if not 0 <= int(offset) < (1 << 63):
        raise ValueError(f"offset must be in [0, 2^63), got {offset}; it counts the draws already taken")


def reference_alias_draw(table: torch.Tensor, num_draws: int, seed: int, offset: int) -> torch.Tensor:
    """Draws from a packed alias table in NumPy, identical to ``torch.ops.bnao.alias_draw``.

    Draw ``i`` uses Philox4x32-10 with key ``(seed mod 2^64)`` split into low and
    high 32-bit words and counter ``(c & 0xffffffff, c >> 32, 0, 0)``,
    ``c = offset + i``; its words r0..r3 give ``column = hi64(((r1 << 32) | r0) * n)``
    and ``index = column if r2 < threshold[column] else alias[column]``.

    Args:
        table: Packed table from :func:`alias_table`.
        num_draws: Number of indices to draw.
        seed: Stream key (any int; taken modulo 2^64).
        offset: Index of the first draw in the stream.

    Returns:
        int64 tensor of ``num_draws`` item indices on ``table.device``.
    """
    _check_draw_args(table, num_draws, offset)
    num_draws, offset = int(num_draws), int(offset)
    key = int(seed) % (1 << 64)
    key_words = (key & 0xFFFFFFFF, key >> 32)
    columns = table.detach().cpu().contiguous().numpy().view(np.uint64)
    n = columns.size
    out = np.empty(num_draws, dtype=np.int64)
    zeros = None
    for start in range(0, num_draws, _REFERENCE_CHUNK):
        count = min(_REFERENCE_CHUNK, num_draws - start)
        counter = np.arange(count, dtype=np.uint64) + np.uint64(offset + start)
        if zeros is None or zeros.size != count:
            zeros = np.zeros(count, dtype=np.uint64)
        r0, r1, r2, _ = reference_philox4x32_10((counter & _MASK32, counter >> _SHIFT32, zeros, zeros), key_words)
        column = _mulhi64((r1 << _SHIFT32) | r0, n)
        packed = columns[column]
        keep = r2 < (packed >> _SHIFT32)
        aliases = packed & _MASK32
        forged = ~keep & (aliases >= np.uint64(n))
        if forged.any():  # the same refusal as the compiled kernels
            bad = int(column[forged].min())
            raise ValueError(f"table column {bad} aliases item {int(columns[bad] & _MASK32)}, outside the table's "
                             f"{n} items; the table was not built by alias_table (rebuild it from the weights)")
        out[start : start + count] = np.where(keep, column, aliases).astype(np.int64)
    return torch.from_numpy(out).to(table.device)


# --------------------------------------------------------------------------- dispatch
def alias_table(weights: torch.Tensor) -> torch.Tensor:
    """Alias table of ``weights``, on the compiled kernel when there is one for its device.

    Args:
        weights: 1-D floating tensor of non-negative, finite weights, not all zero.

    Returns:
        int64 tensor of packed columns on ``weights.device``.
    """
    if extension.has_kernel("alias_table", weights.device.type):
        return torch.ops.bnao.alias_table(weights)
    return reference_alias_table(weights)


def alias_draw(table: torch.Tensor, num_draws: int, seed: int, offset: int) -> torch.Tensor:
    """``num_draws`` indices from draw ``offset`` on of stream ``seed``, on the compiled kernel when possible.

    Args:
        table: Packed table from :func:`alias_table`.
        num_draws: Number of indices to draw.
        seed: Stream key (any int; taken modulo 2^64).
        offset: Index of the first draw in the stream, in [0, 2^63).

    Returns:
        int64 tensor of ``num_draws`` item indices on ``table.device``.
    """
    if extension.has_kernel("alias_draw", table.device.type):
        return torch.ops.bnao.alias_draw(table, int(num_draws), to_signed_seed(seed), int(offset))
    return reference_alias_draw(table, num_draws, seed, offset)


# --------------------------------------------------------------------------- inspection
def unpack_table(table: torch.Tensor) -> Tuple[np.ndarray, np.ndarray]:
    """Splits a packed table into (thresholds, aliases), both uint64 NumPy arrays."""
    columns = table.detach().cpu().contiguous().numpy().view(np.uint64)
    return columns >> _SHIFT32, columns & _MASK32


def table_probabilities(table: torch.Tensor) -> np.ndarray:
    """Exact probability of each item under a packed table (float64; ignores the < n/2^64 column bias).

    A column c is chosen with probability 1/n; it yields c with probability
    ``threshold / 2^32`` (or 1 when it aliases itself) and its alias otherwise.
    """
    thresholds, aliases = unpack_table(table)
    n = thresholds.size
    own = np.where(aliases == np.arange(n, dtype=np.uint64), _TWO32, thresholds.astype(np.float64))
    mass = own.copy()
    np.add.at(mass, aliases.astype(np.int64), _TWO32 - own)
    return mass / (_TWO32 * n)


# --------------------------------------------------------------------------- fake kernels
if extension.has_ops():

    @torch.library.register_fake("bnao::alias_table")
    def _alias_table_fake(weights):
        return weights.new_empty(weights.shape, dtype=torch.int64)

    @torch.library.register_fake("bnao::alias_draw")
    def _alias_draw_fake(table, num_draws, seed, offset):
        return table.new_empty((num_draws,), dtype=torch.int64)
