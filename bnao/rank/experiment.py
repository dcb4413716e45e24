"""The ranking-correlation experiment of the paper (SPEC section 7), end to end.

1. Draw ``archs.count`` archs from ``archs.seed`` (diverse or similar sizes).
2. Ground truth: train each stand-alone (cached; several side by side).
3. One-shot: for each sampler and seed, a supernet trained on only these archs,
   every arch scored with the shared weights after each epoch count E.
4. Pairwise accuracy, Kendall tau and Spearman rho of every one-shot score
   list against the ground truth; mean and spread over seeds.

Outputs under ``out_dir``: ``config.yaml``, ``results.json``, ``results.md``,
``plots/*.png`` and ``log.txt``.
"""

from __future__ import annotations

import copy
import datetime
import json
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Union

import numpy as np
import torch
import yaml

from ..device import resolve_device
from .analysis import differences, main_metrics, size_correlations, variant_metrics
from .config import check_config
from .groundtruth import GroundTruthCache, default_cache_dir, ground_truth, settings_key
from .oneshot import collect, make_jobs, run_label, train_and_score
from .report import markdown, write_plots
from .workers import make_state, run_jobs


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


class _Log:
    """Echo to the caller and append to ``log.txt``."""

    def __init__(self, path: Path, echo: Callable[[str], None]):
        self.path, self.echo = path, echo

    def __call__(self, line: str) -> None:
        self.echo(line)
        with open(self.path, "a") as f:
            f.write(f"{datetime.datetime.now().strftime('%H:%M:%S')} {line}\n")


def _one_shot(state: Dict[str, Any], log: _Log, on_job: Callable[[Dict[str, Any], int], None]) -> Dict[str, Any]:
    """Runs the supernet jobs; after each, ``on_job(collected so far, jobs left)``."""
    config = state["config"]
    jobs = make_jobs(config)
    workers = int(config["supernet"]["workers"])
    device = resolve_device(config["device"])
    log(f"one-shot: {len(jobs)} supernet runs ({workers} workers)")
    start = time.perf_counter()
    done = []
    for job, result in run_jobs(train_and_score, jobs, state, workers, device):
        done.append((job, result))
        last = str(job["epochs"][-1])
        mode = job["eval_data"]
        pa = _pairwise(state["truth"], result["scores"][int(last)][mode])
        log(f"  [{len(done)}/{len(jobs)}] {run_label(job)}: {result['steps']} steps, train {result['train_seconds']:.0f} s, "
            f"score {result['eval_seconds']:.0f} s; pairwise accuracy at E={last}: {pa:.3f}  "
            f"[{time.perf_counter() - start:.0f} s]")
        # Keep the job order (not the finishing order) so that results.json is the same for any worker count.
        done.sort(key=lambda jr: jobs.index(jr[0]))
        out = collect(done, config)
        out["seconds"] = time.perf_counter() - start
        on_job(out, len(jobs) - len(done))
    return out


def _pairwise(truth: np.ndarray, scores: List[float]) -> float:
    from ..metrics import pairwise_accuracy

    return pairwise_accuracy(truth, scores)


def _arch_records(state: Dict[str, Any], gt: Dict[str, Any], main: Dict[str, Any], hashes: List[str]) -> List[dict]:
    space = state["space"]
    records = []
    for i, row in enumerate(state["archs"]):
        one_shot = {sampler: {str(e): {str(seed): float(scores[i]) for seed, scores in sorted(by_seed.items())}
                              for e, by_seed in sorted(by_epochs.items())}
                    for sampler, by_epochs in main.items()}
        entry = gt["entries"][i]
        records.append({"arch": space.format(row), "hash": hashes[i], "size": int(state["sizes"][i]),
                        "ground_truth": float(entry["accuracy"]), "ground_truth_params": int(entry["params"]),
                        "one_shot": one_shot})
    return records


def _ground_truth(state: Dict[str, Any], cache_dir: Optional[Union[str, os.PathLike]], log: _Log):
    """The archs' hashes and their ground truth (cached or trained); sets ``state["truth"]``."""
    config, space, data, sizes = state["config"], state["space"], state["data"], state["sizes"]
    hashes = [space.hash(row) for row in state["archs"]]
    log(f"{len(hashes)} archs ({config['archs']['mode']}), sizes {sizes.min():,.0f} to {sizes.max():,.0f} "
        f"(median {np.median(sizes):,.0f}); data: {len(data.train):,} train / {len(data.dev):,} dev"
        + (f" / {len(data.test):,} test" if data.test is not None else ""))
    cache = GroundTruthCache(cache_dir or config["cache"] or default_cache_dir(),
                             settings_key(config, data, space.config()))
    gt = ground_truth([space.format(row) for row in state["archs"]], hashes, state, cache, echo=log)
    state["truth"] = gt["accuracy"]
    return hashes, gt


def run_rank(config: Dict[str, Any], out_dir: Union[str, os.PathLike], *,
             cache_dir: Optional[Union[str, os.PathLike]] = None, echo: Callable[[str], None] = print,
             overwrite: bool = False) -> Dict[str, Any]:
    """Runs the ranking-correlation experiment and writes its outputs.

    Args:
        config: A ``bnao rank`` configuration (:func:`bnao.rank.load_rank_config`).
        out_dir: Output folder (created).
        cache_dir: Ground-truth cache folder (default: ``config["cache"]``, else :func:`default_cache_dir`).
        echo: Called with every progress line (also written to ``log.txt``).
        overwrite: Replace the results an earlier run left in ``out_dir``.

    Returns:
        The dict written to ``results.json``.

    Raises:
        FileExistsError: ``out_dir`` holds results and ``overwrite`` is False.
        bnao.search.config.ConfigError: Invalid configuration values.
        bnao.data.DatasetNotFoundError: The dataset is missing (the message says how to get it).
    """
    config = check_config(copy.deepcopy(config))
    out = Path(out_dir)
    if (out / "results.json").exists() and not overwrite:
        raise FileExistsError(f"{out} already holds results.json; choose another --out or pass --overwrite")
    out.mkdir(parents=True, exist_ok=True)
    (out / "log.txt").unlink(missing_ok=True)
    log = _Log(out / "log.txt", echo)
    _write_atomic(out / "config.yaml", yaml.safe_dump(config, sort_keys=False))
    started, when = time.perf_counter(), datetime.datetime.now().astimezone()

    state = make_state(config)
    hashes, gt = _ground_truth(state, cache_dir, log)

    def write_partial(shots: Dict[str, Any], left: int) -> None:
        if left:  # a run stopped midway still leaves every finished supernet run's metrics
            partial = _results(config, state, gt, shots, hashes, when)
            partial["complete"], partial["runs_left"] = False, left
            _write_atomic(out / "results.json", json.dumps(partial, indent=1))

    shots = _one_shot(state, log, write_partial)
    results = _results(config, state, gt, shots, hashes, when)
    results["seconds"]["total"] = time.perf_counter() - started
    _write_atomic(out / "results.json", json.dumps(results, indent=1))
    _write_atomic(out / "results.md", markdown(results) + "\n")
    why = write_plots(out / "plots", results)
    if why:
        log(why)
    log(markdown(results))
    log(f"done in {results['seconds']['total']:.0f} s: {out / 'results.json'}, results.md, plots/")
    return results


def _results(config: Dict[str, Any], state: Dict[str, Any], gt: Dict[str, Any], shots: Dict[str, Any],
             hashes: List[str], when: datetime.datetime) -> Dict[str, Any]:
    """The ``results.json`` dict of the supernet runs in ``shots``."""
    truth, sizes = gt["accuracy"], state["sizes"]
    metrics = main_metrics(truth, shots["main"])
    return {
        "format": "bnao-rank-results", "version": 1, "complete": True, "config": config,
        "protocol": {
            "ground_truth": f"stand-alone accuracy on the {config['ground_truth']['eval_split']} split after "
                            f"{config['ground_truth']['epochs']} epochs on the train part",
            "one_shot": f"supernet accuracy on the dev part ({config['supernet']['eval_data']} batches of "
                        f"{config['supernet']['eval_batch_size']}), BN with batch statistics",
            "schedule": config["supernet"]["schedule"],
            "pairwise_accuracy": "pairs i<j agree when (gt_i >= gt_j and os_i >= os_j) or (gt_i < gt_j and os_i < os_j)",
            "spread": "std with ddof=1 over seeds (null for one seed)",
        },
        "environment": {"date": when.isoformat(timespec="seconds"), "cpu": _cpu_model(), "cpus": os.cpu_count(),
                        "device": str(resolve_device(config["device"])), "torch": torch.__version__},
        "ground_truth": {k: gt[k] for k in ("trained", "cache_hits", "seconds", "arch_epochs_per_s")},
        "archs": _arch_records(state, gt, shots["main"], hashes),
        "metrics": metrics,
        "differences": differences(metrics),
        "variants": variant_metrics(truth, shots["variants"], shots["main"]),
        "size_correlations": size_correlations(truth, sizes, shots["main"]),
        "runs": shots["runs"],
        "seconds": {"ground_truth": gt["seconds"], "one_shot": shots["seconds"]},
    }


__all__ = ["run_rank"]
