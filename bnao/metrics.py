"""Ranking correlation between two score lists over the same archs (SPEC section 7).

Three measures, all pure numpy and exact:

* :func:`pairwise_accuracy`, the measure of NAO and of the Balanced NAO paper;
* :func:`kendall_tau` (tau-b, the same value as ``scipy.stats.kendalltau``);
* :func:`spearman_rho` (Pearson correlation of average ranks, as
  ``scipy.stats.spearmanr``).

The pair counts run over blocks of rows of the ``n x n`` comparison so that
memory stays bounded (about ``_BLOCK_ELEMS`` booleans per block) whatever ``n``;
``n`` of a few thousand takes milliseconds.
"""

from __future__ import annotations

from typing import Iterator, Sequence, Tuple, Union

import numpy as np

ArrayLike = Union[Sequence[float], np.ndarray]

# Elements of one block of the pairwise comparison (rows x n). 4M booleans or
# int8 values keep every temporary of a block in the tens of MB.
_BLOCK_ELEMS = 1 << 22


def _check_pair(a: ArrayLike, b: ArrayLike) -> Tuple[np.ndarray, np.ndarray]:
    """Both lists as 1-D float64 arrays; clear errors for bad input."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.ndim != 1 or b.ndim != 1:
        raise ValueError(f"expected two 1-D score lists, got shapes {a.shape} and {b.shape}")
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"score lists differ in length: {a.shape[0]} vs {b.shape[0]}")
    if a.shape[0] < 2:
        raise ValueError(f"a ranking correlation needs at least 2 items, got {a.shape[0]}")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ValueError("score lists must be finite (no NaN or inf)")
    return a, b


def _row_blocks(n: int) -> Iterator[Tuple[int, int]]:
    rows = max(1, _BLOCK_ELEMS // n)
    for start in range(0, n, rows):
        yield start, min(n, start + rows)


def pairwise_accuracy(a: ArrayLike, b: ArrayLike) -> float:
    """Fraction of pairs ``i < j`` that ``a`` and ``b`` order the same way.

    This is exactly NAO's definition (and the paper's): the pair ``(i, j)``,
    ``i < j``, agrees when

        ``(a[i] >= a[j] and b[i] >= b[j]) or (a[i] < a[j] and b[i] < b[j])``.

    So a tie in ``a`` agrees when ``b[i] >= b[j]`` (``b`` orders the pair the
    same way or ties), and so does ``a[i] > a[j]`` with a tie in ``b``; with
    ``a[i] < a[j]`` only a strict ``b[i] < b[j]`` agrees. Because ties are
    read as ``>=``, the value can depend on the order of tied items; it is
    not symmetric in ``a`` and ``b``. 1 = order preserved, 0 = reversed.

    Args:
        a: Reference scores (e.g. ground-truth accuracies), length ``n >= 2``.
        b: Scores to compare (e.g. one-shot or predicted), length ``n``.

    Returns:
        The fraction of agreeing pairs, in ``[0, 1]``.

    Raises:
        ValueError: Lengths differ, fewer than 2 items, or non-finite values.
    """
    a, b = _check_pair(a, b)
    n = a.shape[0]
    cols = np.arange(n)
    agree = 0
    for start, stop in _row_blocks(n):
        ai = a[start:stop, None]
        bi = b[start:stop, None]
        upper = cols[None, :] > np.arange(start, stop)[:, None]  # j > i
        ge = (ai >= a[None, :]) & (bi >= b[None, :])
        lt = (ai < a[None, :]) & (bi < b[None, :])
        agree += int(np.count_nonzero((ge | lt) & upper))
    return agree / (n * (n - 1) // 2)


def kendall_tau(a: ArrayLike, b: ArrayLike) -> float:
    """Kendall's tau-b (ties corrected; the value ``scipy.stats.kendalltau`` gives).

    ``tau_b = (P - Q) / sqrt((n0 - n1) * (n0 - n2))`` with ``P``/``Q`` the
    concordant/discordant pairs, ``n0 = n(n-1)/2`` and ``n1``/``n2`` the pairs
    tied in ``a``/``b``.

    Args:
        a: First score list, length ``n >= 2``.
        b: Second score list, length ``n``.

    Returns:
        tau-b in ``[-1, 1]``; NaN when either list is constant (undefined).

    Raises:
        ValueError: Lengths differ, fewer than 2 items, or non-finite values.
    """
    a, b = _check_pair(a, b)
    n = a.shape[0]
    cols = np.arange(n)
    s = 0
    ties_a = 0
    ties_b = 0
    for start, stop in _row_blocks(n):
        upper = cols[None, :] > np.arange(start, stop)[:, None]
        sa = np.sign(a[start:stop, None] - a[None, :]).astype(np.int8)
        sb = np.sign(b[start:stop, None] - b[None, :]).astype(np.int8)
        prod = (sa * sb)[upper]
        s += int(prod.sum(dtype=np.int64))
        ties_a += int(np.count_nonzero((sa == 0) & upper))
        ties_b += int(np.count_nonzero((sb == 0) & upper))
    n0 = n * (n - 1) // 2
    denom = float(n0 - ties_a) * float(n0 - ties_b)
    if denom <= 0.0:
        return float("nan")
    return float(np.clip(s / np.sqrt(denom), -1.0, 1.0))


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks with ties given the mean of their positions (scipy's 'average')."""
    order = np.argsort(x, kind="mergesort")
    sorted_x = x[order]
    # Start of each run of equal values in sorted order.
    new_run = np.empty(x.shape[0], dtype=bool)
    new_run[0] = True
    np.not_equal(sorted_x[1:], sorted_x[:-1], out=new_run[1:])
    run_id = np.cumsum(new_run) - 1
    starts = np.flatnonzero(new_run)
    ends = np.append(starts[1:], x.shape[0])  # exclusive
    mean_rank = (starts + ends + 1) / 2.0  # mean of 1-based positions start+1..end
    ranks = np.empty(x.shape[0], dtype=np.float64)
    ranks[order] = mean_rank[run_id]
    return ranks


def spearman_rho(a: ArrayLike, b: ArrayLike) -> float:
    """Spearman's rho: the Pearson correlation of the average ranks of ``a`` and ``b``.

    Args:
        a: First score list, length ``n >= 2``.
        b: Second score list, length ``n``.

    Returns:
        rho in ``[-1, 1]``; NaN when either list is constant (undefined).

    Raises:
        ValueError: Lengths differ, fewer than 2 items, or non-finite values.
    """
    a, b = _check_pair(a, b)
    ra = _average_ranks(a)
    rb = _average_ranks(b)
    ra -= ra.mean()
    rb -= rb.mean()
    denom = np.sqrt(np.dot(ra, ra) * np.dot(rb, rb))
    if denom == 0.0:
        return float("nan")
    return float(np.clip(np.dot(ra, rb) / denom, -1.0, 1.0))


__all__ = ["kendall_tau", "pairwise_accuracy", "spearman_rho"]
