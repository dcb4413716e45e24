"""The accuracy-size trade-off of a search: Pareto fronts in (score up, size down).

An arch is on the front when no other arch is at least as good in both
(score >= and size <=) and strictly better in one. ``pareto.jsonl`` in the run
directory holds, after every search iteration, the front of that iteration's
one-shot scores, and after the re-rank the front of the stand-alone
accuracies; it is rewritten whole from the pool each time, so a resumed run
writes the same file as an uninterrupted one. ``plots/pareto.png`` draws the
latest scores against size with the front and the budget.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence

import numpy as np

from ..safe_io import atomic_write_lines, save_figure


def pareto_front(scores: Sequence[float], sizes: Sequence[float]) -> np.ndarray:
    """Indices of the archs not dominated in (score up, size down), by size ascending.

    Archs with a NaN score (not evaluated) are ignored. Archs with the same score
    and size do not dominate each other, so all of them are on the front.

    Args:
        scores: Higher is better.
        sizes: Lower is better.

    Returns:
        ``int64`` indices into ``scores``, smallest size first (ties: input order).
    """
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    sizes = np.asarray(sizes, dtype=np.float64).reshape(-1)
    if scores.shape != sizes.shape:
        raise ValueError(f"{scores.size} scores but {sizes.size} sizes")
    valid = np.flatnonzero(~np.isnan(scores))
    # By size ascending, then score descending: an arch is on the front when its score beats every
    # strictly smaller arch and equals the best score of its own size.
    order = valid[np.lexsort((-scores[valid], sizes[valid]))]
    front: List[int] = []
    best_smaller = -np.inf
    start = 0
    while start < order.size:
        stop = start
        while stop < order.size and sizes[order[stop]] == sizes[order[start]]:
            stop += 1
        group = order[start:stop]
        top = scores[group[0]]
        if top > best_smaller:
            front.extend(int(i) for i in group if scores[i] == top)
        best_smaller = max(best_smaller, top)
        start = stop
    return np.asarray(front, dtype=np.int64)


def front_records(stage: str, archs: Sequence[str], hashes: Sequence[str], scores: Sequence[float],
                  sizes: Sequence[int], measure: str, iteration: Optional[int] = None) -> List[Dict[str, Any]]:
    """The JSON records of one front (one per arch on it, smallest size first)."""
    records = []
    for i in pareto_front(scores, sizes):
        record: Dict[str, Any] = {"stage": stage}
        if iteration is not None:
            record["iteration"] = iteration
        record.update({"arch": archs[i], "hash": hashes[i], "size": int(sizes[i]), "measure": measure,
                       "score": round(float(scores[i]), 6)})
        records.append(record)
    return records


def pool_fronts(pool, sizes: np.ndarray, measure: str) -> List[Dict[str, Any]]:
    """The one-shot front of every evaluated iteration of a :class:`~bnao.search.pool.Pool`.

    Args:
        pool: The pool (``scores[it]`` covers its first ``len(scores[it])`` archs).
        sizes: ``[len(pool)]`` sizes of the pool's archs in ``measure``.
        measure: Name of the size measure, written in every record.
    """
    archs = [" ".join(map(str, row.tolist())) for row in pool.archs]
    hashes = [f"{int(h):016x}" for h in pool.hashes]
    records: List[Dict[str, Any]] = []
    for it, scores in enumerate(pool.scores):
        n = scores.size
        if n:
            records += front_records("one_shot", archs[:n], hashes[:n], scores, sizes[:n], measure, iteration=it)
    return records


def ranking_front(ranking: Iterable[Dict[str, Any]], measure: str, size_key: str = "budget_size") -> List[Dict[str, Any]]:
    """The front of the re-ranked archs in (stand-alone accuracy up, size down)."""
    rows = list(ranking)
    if not rows:
        return []
    sizes = [r[size_key] if size_key in r else r["size"] for r in rows]
    return front_records("standalone", [r["arch"] for r in rows], [r["hash"] for r in rows],
                         [r["standalone_accuracy"] for r in rows], sizes, measure)


def write_jsonl(path: os.PathLike, records: Iterable[Dict[str, Any]]) -> None:
    """Writes JSON lines atomically (temporary file, then rename)."""
    atomic_write_lines(path, (json.dumps(record) + "\n" for record in records))


def plot_front(path: os.PathLike, sizes: np.ndarray, scores: np.ndarray, measure: str,
               budget: Sequence[Optional[float]] = (None, None),
               standalone: Optional[List[Dict[str, Any]]] = None, title: str = "") -> Optional[str]:
    """Scatter of score vs size with the front as a staircase and the budget as vertical lines.

    Args:
        path: PNG file.
        sizes, scores: All evaluated archs (NaN scores are skipped).
        measure: ``params`` or ``madds`` (axis label).
        budget: ``(min, max)`` of the budget in ``measure``; None where unbounded.
        standalone: Front records of the re-rank, drawn on the same axes.
        title: Plot title.

    Returns:
        Why the plot was not written (matplotlib missing), or None.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as err:  # noqa: BLE001 - matplotlib is optional
        return f"plots not written ({err}); `pip install matplotlib`"
    unit, scale = ("M parameters", 1e6) if measure == "params" else ("M multiply-adds", 1e6)
    sizes = np.asarray(sizes, dtype=np.float64)
    scores = np.asarray(scores, dtype=np.float64)
    front = pareto_front(scores, sizes)
    fig, ax = plt.subplots(figsize=(6, 4.5))
    ok = ~np.isnan(scores)
    ax.scatter(sizes[ok] / scale, scores[ok], s=6, alpha=0.4, color="tab:blue", label="archs (one-shot)")
    if front.size:
        ax.step(sizes[front] / scale, scores[front], where="post", color="tab:red", lw=1.2)
        ax.scatter(sizes[front] / scale, scores[front], s=18, color="tab:red", label="Pareto front (one-shot)")
    if standalone:
        ax.plot([r["size"] / scale for r in standalone], [r["score"] for r in standalone], "s--", color="tab:green",
                ms=5, lw=1, label="Pareto front (stand-alone)")
    for value, name in zip(budget, ("min", "max")):
        if value is not None:
            ax.axvline(value / scale, color="k", ls=":", lw=1.2, label=f"budget {name} {value / scale:g}M")
    ax.set_xlabel(f"model size ({unit}, final network)")
    ax.set_ylabel("accuracy")
    ax.set_title(title or "Accuracy vs size: Pareto front")
    ax.legend(fontsize=7, markerscale=1.5)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_figure(fig, path, dpi=120)
    plt.close(fig)
    return None


def write_run_fronts(run_path: os.PathLike, pool, budget, ranking: Optional[List[Dict[str, Any]]] = None) -> Optional[str]:
    """Rewrites ``pareto.jsonl`` and ``plots/pareto.png`` of a run from its pool (and re-rank).

    Sizes are the final network's (:class:`~bnao.search.budget.Budget`), in the budget's measure.

    Args:
        run_path: The run directory.
        pool: The search's :class:`~bnao.search.pool.Pool`.
        budget: The search's budget (also when no bound is set: it knows the final network's shape).
        ranking: The re-rank's records (``arch``, ``hash``, ``standalone_accuracy``), once there.

    Returns:
        Why the plot was not written, or None.
    """
    run_path = Path(run_path)
    ranking_file = run_path / "ranking.jsonl"
    if ranking is None and ranking_file.is_file():
        # Written after the re-rank; read back so that a later rewrite keeps the stand-alone front.
        ranking = [json.loads(line) for line in ranking_file.read_text().splitlines() if line.strip()]
    measure = budget.measure
    column = 0 if measure == "params" else 1
    sizes = budget.sizes(pool.archs)[:, column] if len(pool) else np.zeros(0, dtype=np.int64)
    records = pool_fronts(pool, sizes, measure)
    standalone: List[Dict[str, Any]] = []
    if ranking:
        ranked = [dict(r, budget_size=int(s)) for r, s in
                  zip(ranking, budget.sizes(np.asarray([[int(v) for v in r["arch"].split()] for r in ranking]))[:, column])]
        standalone = ranking_front(ranked, measure)
        records += standalone
    write_jsonl(run_path / "pareto.jsonl", records)
    latest = next((s for s in reversed(pool.scores) if s.size), None)
    if latest is None:
        return None
    scores = np.full(len(pool), np.nan)
    scores[: latest.size] = latest
    title = f"Accuracy vs size ({budget.describe()})" if budget.active else "Accuracy vs size"
    return plot_front(run_path / "plots" / "pareto.png", sizes, scores, measure, budget.bounds(measure),
                      standalone=standalone, title=title)
