"""What ``bnao rank`` writes for people: a markdown table in the paper's shape and PNG plots."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np

from .analysis import METRICS

_TITLES = {"pairwise_accuracy": "Pairwise accuracy (%)", "kendall_tau": "Kendall tau",
           "spearman_rho": "Spearman rho"}


def _cell(stats: Dict[str, Any], scale: float, digits: int) -> str:
    if stats["mean"] is None:
        return "-"
    if stats["n"] > 1:
        return f"{stats['mean'] * scale:.{digits}f} ± {stats['std'] * scale:.{digits}f}"
    return f"{stats['mean'] * scale:.{digits}f}"


def _points(value) -> str:
    """A fraction in points with one decimal; "-" where undefined (the std of one seed)."""
    return "-" if value is None else f"{100 * value:.1f}"


def _metric_table(metrics: Dict[str, Any], name: str, samplers: List[str]) -> List[str]:
    scale, digits = (100.0, 1) if name == "pairwise_accuracy" else (1.0, 3)
    lines = [f"| one-shot epochs | {' | '.join(samplers)} |", "|---|" + "---|" * len(samplers)]
    epochs = sorted({int(e) for s in samplers for e in metrics.get(s, {})})
    for e in epochs:
        cells = [_cell(metrics[s][str(e)][name], scale, digits) if str(e) in metrics.get(s, {}) else "-"
                 for s in samplers]
        lines.append(f"| {e} | {' | '.join(cells)} |")
    return lines


def markdown(results: Dict[str, Any]) -> str:
    """``results.md``: the paper's table (rows E, columns samplers, mean ± std over seeds), then the rest."""
    config, metrics = results["config"], results["metrics"]
    samplers = list(config["sampler"]["names"])
    seeds = config["supernet"]["seeds"]
    gt = results["ground_truth"]
    acc = np.asarray([a["ground_truth"] for a in results["archs"]])
    lines = [
        "# Ranking correlation: one-shot vs stand-alone",
        "",
        f"{len(results['archs'])} archs ({config['archs']['mode']} sizes), dataset {config['data']['dataset']}; "
        f"supernet N={config['supernet']['layers']} C={config['supernet']['channels']}, "
        f"schedule {config['supernet']['schedule']}, eval data {config['supernet']['eval_data']}, "
        f"unused slots {config['supernet']['unused_slot_update']}; mean ± std (ddof=1) over seeds {seeds}.",
        f"Ground truth: {config['ground_truth']['epochs']} epochs stand-alone at N={config['ground_truth']['layers']} "
        f"C={config['ground_truth']['channels']}, accuracy on the {config['ground_truth']['eval_split']} split: "
        f"{acc.min():.4f} to {acc.max():.4f} (mean {acc.mean():.4f}); {gt['trained']} trained now, "
        f"{gt['cache_hits']} from the cache.",
        "",
    ]
    for name in METRICS:
        lines += [f"## {_TITLES[name]}", ""] + _metric_table(metrics, name, samplers) + [""]
    diffs = results.get("differences") or {}
    if diffs:
        lines += ["## proportional - uniform (pairwise accuracy, points)", "",
                  "| E | difference of means | paired differences: mean ± std (min..max) | std uniform | std proportional |",
                  "|---|---|---|---|---|"]
        for e in sorted(diffs, key=int):
            d = diffs[e]["pairwise_accuracy"]
            p = d["paired"]
            paired = "-" if p["mean"] is None else (
                f"{100 * p['mean']:.1f} ± {_points(p['std'])} ({100 * p['min']:.1f}..{100 * p['max']:.1f})")
            lines.append(f"| {e} | {100 * d['mean_difference']:.1f} | {paired} | {_points(d['uniform_std'])} | "
                         f"{_points(d['proportional_std'])} |")
        lines.append("")
    if results.get("variants"):
        lines += ["## Variants (one seed, largest E)", "",
                  "| variant | sampler | seed | E | pairwise acc (%) | Kendall | Spearman | main run: pairwise / Kendall / Spearman |",
                  "|---|---|---|---|---|---|---|---|"]
        for v in results["variants"]:
            m, b = v["metrics"], v["main_metrics"]
            base = "-" if b is None else (f"{100 * b['pairwise_accuracy']:.1f} / {b['kendall_tau']:.3f} / "
                                          f"{b['spearman_rho']:.3f}")
            lines.append(f"| {v['name']} | {v['sampler']} | {v['seed']} | {v['epochs']} | "
                         f"{100 * m['pairwise_accuracy']:.1f} | {m['kendall_tau']:.3f} | {m['spearman_rho']:.3f} | {base} |")
        lines.append("")
    sc = results.get("size_correlations")
    if sc:
        lines += ["## Model size", "", f"Kendall tau of size with the ground truth: {sc['ground_truth']:.3f}.", "",
                  f"| E | {' | '.join(f'size vs one-shot ({s})' for s in samplers)} |", "|---|" + "---|" * len(samplers)]
        for e in sorted({int(e) for s in samplers for e in sc["one_shot"].get(s, {})}):
            lines.append(f"| {e} | " + " | ".join(f"{sc['one_shot'][s][str(e)]:.3f}" for s in samplers) + " |")
        lines.append("")
    return "\n".join(lines)


def _mean_scores(results: Dict[str, Any], sampler: str, epochs: str) -> np.ndarray:
    return np.asarray([np.mean(list(a["one_shot"][sampler][epochs].values())) for a in results["archs"]])


def _scatter(plt, folder: Path, results: Dict[str, Any], sampler: str, truth: np.ndarray, sizes: np.ndarray) -> None:
    epochs = [str(e) for e in results["config"]["supernet"]["epochs"]]
    fig, axes = plt.subplots(1, len(epochs), figsize=(3.2 * len(epochs), 3.3), squeeze=False)
    for ax, e in zip(axes[0], epochs):
        pa = results["metrics"][sampler][e]["pairwise_accuracy"]["mean"]
        ax.scatter(truth, _mean_scores(results, sampler, e), s=12, c=sizes, cmap="viridis")
        ax.set_title(f"E={e}: pairwise {100 * pa:.1f}%", fontsize=9)
        ax.set_xlabel("stand-alone accuracy", fontsize=8)
    axes[0][0].set_ylabel("one-shot accuracy (mean over seeds)", fontsize=8)
    fig.suptitle(f"{sampler} sampling (colour: model size)", fontsize=10)
    fig.tight_layout()
    fig.savefig(folder / f"scatter_{sampler}.png", dpi=110)
    plt.close(fig)


def _pairwise_vs_epochs(plt, folder: Path, results: Dict[str, Any]) -> None:
    epochs = [str(e) for e in results["config"]["supernet"]["epochs"]]
    xs = [int(e) for e in epochs]
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for sampler in results["config"]["sampler"]["names"]:
        stats = [results["metrics"][sampler][e]["pairwise_accuracy"] for e in epochs]
        bars = ax.errorbar(xs, [100 * s["mean"] for s in stats], yerr=[100 * (s["std"] or 0.0) for s in stats], marker="o",
                           capsize=3, label=sampler)
        for e, x in zip(epochs, xs):  # every seed, so the spread is visible as it is
            per_seed = results["metrics"][sampler][e]["per_seed"].values()
            ax.scatter([x] * len(per_seed), [100 * m["pairwise_accuracy"] for m in per_seed], s=10, alpha=0.5,
                       color=bars[0].get_color())
    ax.set_xscale("log", base=2)
    ax.set_xticks(xs, [str(x) for x in xs])
    ax.set_xlabel("one-shot training epochs E")
    ax.set_ylabel("pairwise accuracy (%)")
    ax.set_title("One-shot vs stand-alone ranking (mean ± std over seeds)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(folder / "pairwise_vs_epochs.png", dpi=110)
    plt.close(fig)


def _size_vs_truth(plt, folder: Path, truth: np.ndarray, sizes: np.ndarray) -> None:
    fig, ax = plt.subplots(figsize=(5.5, 4))
    ax.scatter(sizes / 1e3, truth, s=14)
    ax.set_xlabel("model size (thousand parameters, supernet's N and C)")
    ax.set_ylabel("stand-alone accuracy")
    ax.set_title("Model size vs ground truth")
    fig.tight_layout()
    fig.savefig(folder / "size_vs_ground_truth.png", dpi=110)
    plt.close(fig)


def write_plots(folder: Path, results: Dict[str, Any]) -> Optional[str]:
    """Scatter per sampler, pairwise accuracy vs E, size vs ground truth; returns why not when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as err:  # noqa: BLE001 - matplotlib is optional
        return f"plots not written ({err}); `pip install matplotlib`"
    folder.mkdir(parents=True, exist_ok=True)
    truth = np.asarray([a["ground_truth"] for a in results["archs"]])
    sizes = np.asarray([a["size"] for a in results["archs"]], dtype=np.float64)
    for sampler in results["config"]["sampler"]["names"]:
        _scatter(plt, folder, results, sampler, truth, sizes)
    _pairwise_vs_epochs(plt, folder, results)
    _size_vs_truth(plt, folder, truth, sizes)
    return None


__all__ = ["markdown", "write_plots"]
