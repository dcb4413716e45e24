"""Ranking metrics of the experiment: per run, then mean and spread over seeds."""

from __future__ import annotations

from typing import Any, Dict, List, Sequence

import numpy as np

from ..metrics import kendall_tau, pairwise_accuracy, spearman_rho

METRICS = ("pairwise_accuracy", "kendall_tau", "spearman_rho")


def score_metrics(truth: Sequence[float], scores: Sequence[float]) -> Dict[str, float]:
    """The three measures of one score list against the ground truth (SPEC section 7).

    ``pairwise_accuracy(truth, scores)``: the ground truth is the reference list
    ``a``, so a tie in it agrees when the one-shot scores agree or tie.
    """
    return {"pairwise_accuracy": pairwise_accuracy(truth, scores), "kendall_tau": kendall_tau(truth, scores),
            "spearman_rho": spearman_rho(truth, scores)}


def spread(values: Sequence[float]) -> Dict[str, Any]:
    """Mean, sample standard deviation (ddof=1; None for one value, where it is undefined), min and max of
    finite values."""
    arr = np.asarray([v for v in values if v is not None and np.isfinite(v)], dtype=np.float64)
    if arr.size == 0:
        return {"mean": None, "std": None, "min": None, "max": None, "n": 0}
    return {"mean": float(arr.mean()), "std": float(arr.std(ddof=1)) if arr.size > 1 else None,
            "min": float(arr.min()), "max": float(arr.max()), "n": int(arr.size)}


def main_metrics(truth: np.ndarray, main: Dict[str, Dict[int, Dict[int, List[float]]]]) -> Dict[str, Any]:
    """``{sampler: {E: {"per_seed": {seed: metrics}, metric: spread}}}`` with string keys (JSON)."""
    out: Dict[str, Any] = {}
    for sampler, by_epochs in main.items():
        out[sampler] = {}
        for epochs in sorted(by_epochs):
            per_seed = {str(seed): score_metrics(truth, scores) for seed, scores in sorted(by_epochs[epochs].items())}
            entry: Dict[str, Any] = {"per_seed": per_seed}
            for name in METRICS:
                entry[name] = spread([m[name] for m in per_seed.values()])
            out[sampler][str(epochs)] = entry
    return out


def differences(metrics: Dict[str, Any], a: str = "proportional", b: str = "uniform") -> Dict[str, Any]:
    """Per E: mean of ``a`` minus mean of ``b`` for each measure, next to the seeds' spreads.

    The seeds are paired (the same seed feeds both samplers' runs); the per-seed differences
    and their spread are given too.
    """
    if a not in metrics or b not in metrics:
        return {}
    out: Dict[str, Any] = {}
    for epochs in metrics[a]:
        if epochs not in metrics[b]:
            continue
        entry: Dict[str, Any] = {}
        for name in METRICS:
            ma, mb = metrics[a][epochs], metrics[b][epochs]
            seeds = sorted(set(ma["per_seed"]) & set(mb["per_seed"]), key=int)
            paired = [ma["per_seed"][s][name] - mb["per_seed"][s][name] for s in seeds]
            entry[name] = {"mean_difference": None if ma[name]["mean"] is None or mb[name]["mean"] is None
                           else ma[name]["mean"] - mb[name]["mean"],
                           "paired": spread(paired), f"{a}_std": ma[name]["std"], f"{b}_std": mb[name]["std"]}
        out[epochs] = entry
    return out


def variant_metrics(truth: np.ndarray, variants: List[Dict[str, Any]], main: Dict[str, Any]) -> List[Dict[str, Any]]:
    """Each variant's metrics next to the main run of the same sampler, seed and E."""
    out = []
    for v in variants:
        base = main.get(v["sampler"], {}).get(v["epochs"], {}).get(v["seed"])
        out.append({"name": v["name"], "sampler": v["sampler"], "seed": v["seed"], "epochs": v["epochs"],
                    "metrics": score_metrics(truth, v["scores"]),
                    "main_metrics": score_metrics(truth, base) if base is not None else None,
                    "scores": list(v["scores"])})
    return out


def size_correlations(truth: np.ndarray, sizes: np.ndarray, main: Dict[str, Any]) -> Dict[str, Any]:
    """Kendall tau of model size with the ground truth, and with each sampler's one-shot scores (mean over seeds)."""
    out: Dict[str, Any] = {"ground_truth": kendall_tau(sizes, truth), "one_shot": {}}
    for sampler, by_epochs in main.items():
        out["one_shot"][sampler] = {
            str(e): kendall_tau(sizes, np.mean([s for s in by_epochs[e].values()], axis=0)) for e in sorted(by_epochs)}
    return out


__all__ = ["METRICS", "differences", "main_metrics", "score_metrics", "size_correlations", "spread",
           "variant_metrics"]
