"""Reading what the tools and benchmarks left behind: test counts, sanitizer verdicts, figures.

Everything here is a pure function of files or text, so the report logic is
tested on the CPU with hand-written inputs (tests/test_gpu_check.py).
"""

from __future__ import annotations

import json
import re
import statistics
import xml.etree.ElementTree as ElementTree
from pathlib import Path
from typing import Any, Dict, List, NamedTuple, Optional, Tuple

from .runner import Figure

# Targets of issue 7 (H100, fp32 eager path) and of the loader issue (DALI).
TARGETS = {
    "train_b64": 3000.0,  # img/s
    "train_b256": 10000.0,  # img/s
    "eval": 100.0,  # archs/s at batch 500
    "draws": 1e9,  # batched draws/s from a pool of 1e6
    "tensor_loader": 1e6,  # img/s
    "dali_loader": 2e5,  # img/s, array pipeline
    "search_s": 30 * 60.0,  # the full search at the reference settings
}
REFERENCE_SEARCH_S = 4 * 3600.0  # about 4 hours for the reference implementation (issue 7)

# The reference's search settings (configs/cifar10.yaml, SPEC section 6).
REFERENCE = {
    "train_images": 45000,
    "batch_size": 64,
    "epochs": 50,
    "pool_size": 1000,
    "new_per_iteration": 300,
    "iterations": 3,
    "controller_epochs": 1000,
    "rerank_top": 5,
    "rerank_epochs": 10,
}


class PytestCrash(NamedTuple):
    """Where a pytest run died: the fatal error, and the test (``file::function``, a node-id prefix that
    ``--deselect`` takes) and its line when faulthandler's dump names them."""

    error: str
    test: Optional[str]
    line: Optional[int]

    def __str__(self) -> str:
        return self.error + (f" in {self.test}, line {self.line}" if self.test else "")


def pytest_crash(output: str) -> Optional[PytestCrash]:
    """The crash in a pytest run's output (faulthandler's ``Fatal Python error`` dump), None when it has none.

    A crash leaves no junit XML and no failure list, so the test that crashed is the one lead.
    """
    fatal = re.search(r"Fatal Python error: ([^\n]+)", output)
    if not fatal:
        return None
    frame = re.search(r'File "[^"]*?(tests/[^"]+\.py)", line (\d+) in (test_\w+)', output[fatal.end():])
    if not frame:
        return PytestCrash(fatal.group(1).strip(), None, None)
    return PytestCrash(fatal.group(1).strip(), f"{frame.group(1)}::{frame.group(3)}", int(frame.group(2)))


def pytest_counts(junit_xml: Path) -> Dict[str, Any]:
    """Passed / failed / error / skipped counts and the failing and skipped test ids of a junit XML file."""
    root = ElementTree.parse(junit_xml).getroot()
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0, "failed_ids": [], "skipped_ids": []}
    for case in root.iter("testcase"):
        test_id = f"{case.get('classname', '')}::{case.get('name', '')}"
        if case.find("failure") is not None:
            counts["failed"] += 1
            counts["failed_ids"].append(test_id)
        elif case.find("error") is not None:
            counts["errors"] += 1
            counts["failed_ids"].append(test_id)
        elif case.find("skipped") is not None:
            counts["skipped"] += 1
            reason = case.find("skipped").get("message", "")
            counts["skipped_ids"].append(f"{test_id} ({reason})")
        else:
            counts["passed"] += 1
    return counts


def ctest_counts(output: str) -> Dict[str, Any]:
    """Counts from ctest's output: total, failed, skipped (tests that exited with the skip code)."""
    # "100% tests passed, 0 tests failed out of 6", or (newer CTest, all passed) "100% tests passed out of 6"
    m = re.search(r"(\d+)% tests passed(?:, (\d+) tests? failed)? out of (\d+)", output)
    skipped = re.findall(r"^\s*\d+ - (\S+) \(Skipped\)", output, flags=re.M)
    failed = re.findall(r"^\s*\d+ - (\S+) \((?:Failed|SEGFAULT|Timeout|Subprocess aborted|Not Run)\)", output,
                        flags=re.M)
    if not m:
        return {"total": 0, "failed": 0, "skipped": len(skipped), "skipped_names": skipped, "failed_names": failed,
                "parsed": False}
    return {"total": int(m.group(3)), "failed": int(m.group(2) or 0), "skipped": len(skipped),
            "skipped_names": skipped, "failed_names": failed, "parsed": True}


def sanitizer_errors(output: str) -> Optional[int]:
    """Errors in compute-sanitizer's ``ERROR SUMMARY: N errors`` line (None when the line is missing)."""
    m = re.findall(r"ERROR SUMMARY: (\d+) errors?", output)
    return int(m[-1]) if m else None


def supernet_figures(results: List[Dict[str, Any]]) -> List[Figure]:
    """Figures of ``bench_supernet.py --json``: img/s per batch with its split, peak memory, evaluation."""
    figures = []
    for r in results:
        bs = int(r["batch_size"])
        cells = r.get("kernels", "")  # "fused" or "eager", the reason in "kernels_note"
        step = r.get("step_path", {})
        path = f", {cells} cells" if cells else ""
        if step.get("mode") == "graph":
            path += " + CUDA graphs"
        elif step.get("mode") == "uncaptured":
            path += " + device-data steps (uncaptured)"
        if r.get("bf16"):
            path += ", bf16"
        split = ", ".join(f"{k} {v:.2f}" for k, v in r["split_ms"].items())
        note = f"{r['ms_per_step']:.2f} ms/step; synchronised split ms: {split}"
        if "kernels_per_step" in r:
            note += f"; {r['kernels_per_step']:.0f} CUDA kernels/step"
        if "launch_sequence" in r:
            note += "; launch sequence " + ("identical for every arch" if r["launch_sequence"]["identical"]
                                            else "depends on the arch")
        if cells == "eager" and r.get("kernels_note"):
            note += f"; eager ({r['kernels_note']})"
        if step:
            note += f"; step: {step.get('mode')} ({step.get('reason')})"
        target = TARGETS.get(f"train_b{bs}")
        figures.append(Figure(f"supernet training, batch {bs}{path}", r["img_per_s"], "img/s", target, note=note))
        if "peak_memory_mib" in r:
            figures.append(Figure(f"peak GPU memory, batch {bs}{path}", r["peak_memory_mib"], "MiB",
                                  note="torch.cuda.max_memory_allocated over warm-up, timing and evaluation"))
        if "eval_archs_per_s" in r:
            evaluation = r.get("eval_path", {})
            figures.append(Figure(f"pool evaluation, batch {r['eval_batch']}{path}", r["eval_archs_per_s"],
                                  "archs/s", TARGETS["eval"],
                                  note=f"{r['eval_archs']} archs; {evaluation.get('mode', '?')}: "
                                       f"{evaluation.get('reason', '?')}"))
    return figures


def sampler_figures(data: Dict[str, Any]) -> List[Figure]:
    """Figures of ``bench_sampler.py --json``: batched draws/s per device."""
    out = []
    for row in data.get("batched", []):
        target = TARGETS["draws"] if row["device"].startswith("cuda") else None
        out.append(Figure(f"batched alias draws on {row['device']}, pool {row['pool']:,}", row["draws_per_s"],
                          "draws/s", target, note=f"{row['per_call']:,} draws per call, {row['kernel']} kernel"))
    return out


def controller_figures(data: Dict[str, Any]) -> List[Figure]:
    """Figures of ``bench_controller.py --json``: per ``controller.graph`` variant the time of one minibatch (100
    archs) and the reference's 1,000 epochs on its pool, extrapolated."""
    out = []
    for row in data.get("rows", []):
        path = row["path"]
        how = path["mode"] if path["mode"] == "graph" else f"{path['mode']}: {path['reason']}"
        out.append(Figure(f"controller minibatch, graph={row['graph']} ({how})", row["minibatch_ms"], "ms",
                          better="lower", note=f"median epoch after the warm-up and capture ones, "
                                               f"{row['minibatches']} minibatches of 100 archs an epoch"))
        out.append(Figure(f"controller fit, 1,000 epochs on {data['archs']} archs, graph={row['graph']} "
                          "(extrapolated)", row["epoch_s"] * 1000, "s", better="lower",
                          note="the reference's epochs; its pools grow to 1,600 archs"))
    return out


def loader_figures(rows: List[Dict[str, Any]], loader: str, target_batch: int) -> List[Figure]:
    """Figures of ``bench_loader.py --json`` for one loader; the target applies at ``target_batch``."""
    target = TARGETS["tensor_loader"] if loader == "tensor" else TARGETS["dali_loader"]
    out = []
    for row in rows:
        if row["loader"] != loader:
            continue
        out.append(Figure(f"{loader} loader, {row['dataset']}, batch {row['batch']}", row["img_per_s"], "img/s",
                          target if row["batch"] == target_batch else None,
                          note=f"crop + flip + cutout + normalise, {row['batches']} batches timed"))
    return out


def read_jsonl(path: Path) -> List[Dict[str, Any]]:
    """Records of a JSON-lines file (empty when it is missing)."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _median(values: List[float]) -> Optional[float]:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def extrapolate_search(run_dir: Path, config: Dict[str, Any], reference: Dict[str, Any] = REFERENCE,
                       controller_epoch: Optional[Tuple[int, float]] = None) -> Dict[str, Any]:
    """Each phase of a shortened search, scaled to the reference settings.

    Every phase has a cost unit that the shortened run measures and whose count at the
    reference settings is known: supernet training per step (50 epochs of 703 steps per
    round, 4 rounds), evaluation per arch evaluated (pool 1000, 1300, 1600, 1900),
    controller fitting per epoch and pool arch (1000 epochs on pools of 1000, 1300, 1600),
    generation per new arch (3 x 300) and re-ranking per arch and epoch (5 x 10). The unit
    cost is the median over the rounds, so the first round's warm-up does not get
    multiplied by thousands of steps. The controller's epoch also has a cost that does not
    grow with the pool (its shuffles and launches), which a shortened run's small pools would
    multiply by the reference's much larger arch count (on an H200, 2026-11-27: 0.215 ms per
    epoch x arch from pools of 50 to 100, 0.071 ms at 1,000 archs); so when a measurement at the
    reference's pool size is given (``controller_epoch``, gpu-check's bench-controller part), the
    controller's unit cost is that one.

    Args:
        run_dir: The shortened run's directory (history.jsonl, ranking.jsonl).
        config: Its resolved configuration (config.yaml).
        reference: The settings to extrapolate to.
        controller_epoch: ``(archs, seconds)`` of one controller epoch measured on a pool of that many archs
            (about the reference's), to use instead of the shortened run's own controller cost.

    Returns:
        ``{"phases": [{phase, measured_s, unit, unit_s, full_count, full_s}], "total_s", "measured_s"}``.
    """
    history = read_jsonl(run_dir / "history.jsonl")
    ranking = read_jsonl(run_dir / "ranking.jsonl")
    if not history:
        raise ValueError(f"{run_dir} has no history.jsonl records: the search did not finish a round")
    sn, cc, fc = config["supernet"], config["controller"], config["final"]
    steps_short = _short_steps(config)
    unit_costs: Dict[str, List[float]] = {"train": [], "eval": [], "controller": [], "generate": [], "rerank": []}
    measured = dict.fromkeys(unit_costs, 0.0)
    for rec in history:
        ps = rec.get("phase_seconds", {})
        generated = int(rec.get("generated") or 0)
        evaluated = int(rec["pool"]) - generated  # the summary is written after generation
        units = {"train": steps_short, "eval": evaluated, "controller": int(cc["epochs"]) * evaluated,
                 "generate": generated}
        for phase, count in units.items():
            if phase in ps:
                measured[phase] += ps[phase]
                if count:
                    unit_costs[phase].append(ps[phase] / count)
    for rec in ranking:
        if "standalone_seconds" in rec:
            measured["rerank"] += rec["standalone_seconds"]
            # An epoch of the reference's training split: a shortened run may train on fewer images.
            images = rec.get("standalone_train_images") or reference["train_images"]
            unit_costs["rerank"].append(rec["standalone_seconds"] / int(fc["epochs"])
                                        * reference["train_images"] / images)

    ref = reference
    rounds = ref["iterations"] + 1
    pools = [ref["pool_size"] + i * ref["new_per_iteration"] for i in range(rounds)]
    full_counts = {
        "train": ("step", rounds * ref["epochs"] * (ref["train_images"] // ref["batch_size"])),
        "eval": ("arch", sum(pools)),
        "controller": ("epoch x arch", ref["controller_epochs"] * sum(pools[:-1])),
        "generate": ("new arch", ref["iterations"] * ref["new_per_iteration"]),
        "rerank": ("arch x epoch", ref["rerank_top"] * ref["rerank_epochs"]),
    }
    phases = []
    for phase, (unit, count) in full_counts.items():
        unit_s = _median(unit_costs[phase])
        entry = {"phase": phase, "measured_s": measured[phase], "unit": unit, "unit_s": unit_s}
        if phase == "controller" and controller_epoch is not None:
            archs, seconds = controller_epoch
            entry.update(unit_s=seconds / archs, search_unit_s=unit_s,
                         source=f"a controller epoch on {archs:,} archs (bench-controller)")
        entry.update(full_count=count, full_s=None if entry["unit_s"] is None else entry["unit_s"] * count)
        phases.append(entry)
    known = [p["full_s"] for p in phases if p["full_s"] is not None]
    return {"phases": phases, "total_s": sum(known) if len(known) == len(phases) else None,
            "measured_s": sum(measured.values()), "rounds": len(history), "steps_per_round": steps_short,
            # How the last round's steps and evaluation ran (graph, uncaptured, eager) and why.
            "paths": {"train": history[-1].get("step_path"), "eval": history[-1].get("eval_path"),
                      # the last round fits no controller: the last record that has one
                      "controller": next((r["controller_path"] for r in reversed(history)
                                          if r.get("controller_path")), None)},
            "settings": {"supernet.epochs": sn["epochs"], "supernet.steps_per_epoch": sn.get("steps_per_epoch"),
                         "controller.epochs": cc["epochs"], "final.epochs": fc["epochs"],
                         "final.rerank_top": fc["rerank_top"]}}


def _short_steps(config: Dict[str, Any]) -> int:
    """Supernet steps per round of a run (steps_per_epoch, else training images // batch, times epochs)."""
    sn = config["supernet"]
    per_epoch = sn.get("steps_per_epoch")
    if not per_epoch:
        data = config["data"]
        images = int(data.get("synthetic_samples", 50000)) if data["dataset"] == "synthetic" else 50000
        per_epoch = int(images * (1 - float(data["dev_fraction"]))) // int(sn["batch_size"])
    return int(per_epoch) * int(sn["epochs"])
