"""What a search shows its user: TensorBoard scalars and PNG plots.

Both are optional extras (``pip install bnao[search]``): without TensorBoard
or matplotlib the search runs and says once what it could not write.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

from ..safe_io import save_figure
from .pool import Pool


class Scalars:
    """TensorBoard scalar writer that degrades to nothing when TensorBoard is missing.

    Args:
        folder: Event folder.
        purge_step: On resume, events at or after this step are dropped so
            curves do not double back.
    """

    def __init__(self, folder: Optional[Path], purge_step: Optional[int] = None):
        self._writer = None
        if folder is None:  # nothing to write (ranks other than 0 of a run on several processes)
            return
        try:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(folder), purge_step=purge_step)
        except Exception as err:  # noqa: BLE001 - TensorBoard is optional
            warnings.warn(f"TensorBoard scalars are not written ({err}); `pip install tensorboard`", RuntimeWarning)

    def add(self, tag: str, value: float, step: int) -> None:
        if self._writer is not None and value is not None and np.isfinite(value):
            self._writer.add_scalar(tag, float(value), step)

    def add_many(self, prefix: str, values: Dict[str, float], step: int) -> None:
        for key, value in values.items():
            if isinstance(value, (int, float, np.floating, np.integer)):
                self.add(f"{prefix}/{key}", float(value), step)

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


def size_buckets(sizes: np.ndarray, draws: np.ndarray, num_buckets: int = 5) -> List[Dict[str, float]]:
    """Draw share per model-size quantile bucket, next to the share a proportional sampler targets."""
    if sizes.size == 0:
        return []
    edges = np.quantile(sizes, np.linspace(0, 1, num_buckets + 1))
    which = np.clip(np.searchsorted(edges, sizes, side="right") - 1, 0, num_buckets - 1)
    total_draws = max(int(draws.sum()), 1)
    out = []
    for b in range(num_buckets):
        mask = which == b
        out.append(
            {
                "bucket": b,
                "size_low": float(edges[b]),
                "size_high": float(edges[b + 1]),
                "draw_share": float(draws[mask].sum() / total_draws),
                "size_share": float(sizes[mask].sum() / max(sizes.sum(), 1)),
                "count_share": float(mask.mean()),
            }
        )
    return out


def write_plots(folder: Path, pool: Pool, draws_per_iteration: List[Dict[str, np.ndarray]]) -> Optional[str]:
    """Writes the three PNG plots; returns why not when matplotlib is missing.

    Args:
        folder: Output folder (created).
        pool: The pool with its per-iteration scores.
        draws_per_iteration: per iteration, ``{"index": pool indices trained, "draws": counts}``.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as err:  # noqa: BLE001 - matplotlib is optional
        return f"plots not written ({err}); `pip install matplotlib`"
    folder.mkdir(parents=True, exist_ok=True)
    size_m = pool.sizes / 1e6

    fig, ax = plt.subplots(figsize=(6, 4.5))
    for it, scores in enumerate(pool.scores):
        if scores.size:
            ax.scatter(size_m[: scores.size], scores, s=6, alpha=0.5, label=f"iteration {it}")
    ax.set_xlabel("model size (M parameters)")
    ax.set_ylabel("one-shot accuracy")
    ax.set_title("One-shot score vs model size")
    ax.legend(fontsize=7, markerscale=2)
    fig.tight_layout()
    save_figure(fig, folder / "score_vs_size.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    best = [float(np.nanmax(s)) if s.size else np.nan for s in pool.scores]
    mean = [float(np.nanmean(s)) if s.size else np.nan for s in pool.scores]
    ax.plot(range(len(best)), best, marker="o", label="best")
    ax.plot(range(len(mean)), mean, marker=".", label="pool mean")
    ax.set_xlabel("search iteration")
    ax.set_ylabel("one-shot accuracy")
    ax.set_title("Best one-shot score per iteration")
    ax.legend()
    fig.tight_layout()
    save_figure(fig, folder / "best_per_iteration.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4.5))
    for it, rec in enumerate(draws_per_iteration):
        idx, draws = rec["index"], rec["draws"]
        if idx.size and draws.sum():
            ax.scatter(size_m[idx], draws, s=6, alpha=0.5, label=f"iteration {it}")
            # The target of a size-proportional sampler: a line through the origin.
            xs = np.linspace(0, size_m[idx].max(), 50)
            ax.plot(xs, xs * draws.sum() / max(size_m[idx].sum(), 1e-12), lw=1, color="k", alpha=0.4)
    ax.set_xlabel("model size (M parameters)")
    ax.set_ylabel("supernet steps trained")
    ax.set_title("Draws vs model size (line: proportional target)")
    if draws_per_iteration:
        ax.legend(fontsize=7, markerscale=2)
    fig.tight_layout()
    save_figure(fig, folder / "draws_vs_size.png", dpi=120)
    plt.close(fig)
    return None


def fmt_seconds(s: float) -> str:
    """Seconds as ``1h02m03s`` or ``2m03s``."""
    m, s = divmod(int(round(s)), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"
