"""Throughput measurement of supernet training and pool evaluation (``bnao profile``, benchmarks).

Trains a supernet for a number of steps on real or synthetic data with the
size-proportional (or uniform) sampler over a random pool, and reports img/s,
the per-step time split into draw / forward / backward / optimizer (with CUDA
synchronisation around each phase, so the split is real device time), peak
GPU memory, the number of ops launched per step and, optionally, the pool
evaluation speed at batch 500.
"""

from __future__ import annotations

import os

import time
from typing import Any, Callable, Dict, Optional, Tuple

import numpy as np
import torch

from ..device import resolve_device
from ..space.nao import NAOSpace
from .evaluator import evaluate_pool, last_evaluation
from .fused_forward import cells_choice
from .model import Supernet
from .trainer import SupernetTrainer

# Profiler events that create views or allocate without computing: not counted as launched ops.
_NO_KERNEL = {
    "aten::empty", "aten::empty_strided", "aten::empty_like", "aten::view", "aten::as_strided", "aten::reshape",
    "aten::_reshape_alias", "aten::slice", "aten::select", "aten::narrow", "aten::split", "aten::split_with_sizes",
    "aten::unsqueeze", "aten::squeeze", "aten::t", "aten::transpose", "aten::permute", "aten::expand",
    "aten::detach", "aten::alias", "aten::resize_", "aten::_unsafe_view", "aten::lift_fresh", "aten::unbind",
    "aten::chunk", "aten::result_type", "aten::_local_scalar_dense", "aten::is_nonzero", "aten::item",
    "aten::set_", "aten::to", "aten::_to_copy", "aten::contiguous", "aten::flatten", "aten::expand_as",
    "aten::view_as", "aten::detach_", "aten::unflatten", "aten::zeros_like", "aten::ones_like", "aten::numpy_T",
}


#: The trainer's profiler ranges (not ops).
_RANGES = {"bnao::forward", "bnao::backward", "bnao::optimizer"}


def _is_op(name: str) -> bool:
    """An ATen op or one of bnao's compiled ops (``torch.ops.bnao.*``), not a profiler range."""
    return name.startswith("aten::") or (name.startswith("bnao::") and name not in _RANGES)


def top_kernels(run: Callable[[], Any], device: torch.device, units: int, unit: str, top: int = 15
                ) -> Dict[str, Any]:
    """Where the time of ``run()`` goes: the ``top`` kernels (CUDA) or ops (CPU) by their own time, per unit.

    On CUDA the rows are what CUPTI records on the device: kernels, and the copies and memsets between them
    (``Memcpy ...``, ``Memset ...``), by their device time; on a CPU they are the ``aten::`` and ``bnao::`` ops
    (self CPU time, so an op's time excludes the ops it calls). Profiling slows the host, not the kernels, so
    on a GPU the device times are real.

    Args:
        run: The work, warmed up beforehand; it must synchronise with the device before it returns (the
            trainer's ``train_steps`` and :func:`evaluate_pool` do), so that every kernel is in the trace.
        device: Where it runs.
        units: Units of work it does (training steps, evaluated archs): the figures are per unit.
        unit: Their name (``"step"``, ``"arch"``).
        top: Rows kept.

    Returns:
        ``{"unit": unit, "total_ms": per unit, "rows": [{"name", "calls", "ms", "share"}, ...]}``, ``calls`` and
        ``ms`` per unit, rows by decreasing time; ``share`` is of the total over every kernel (op), not just the
        rows kept.
    """
    from torch.profiler import profile

    cuda = device.type == "cuda"
    with profile(activities=_activities(device)) as prof:
        run()
    events = prof.key_averages()
    # A profiler range (the trainer's bnao::forward, the optimizer's Optimizer.step#...) shows on the device too,
    # spanning the kernels it launched: not a kernel, and counting it would count those kernels twice. Ranges are
    # also host events, which kernels never are.
    host_names = {event.key for event in events if event.device_type != torch.autograd.DeviceType.CUDA}
    times = []
    for event in events:
        if cuda:
            if event.device_type != torch.autograd.DeviceType.CUDA or event.key in host_names:
                continue
            microseconds = event.self_device_time_total
        else:
            if not _is_op(event.key):
                continue
            microseconds = event.self_cpu_time_total
        times.append((event.key, event.count, microseconds))
    total = sum(t for _, _, t in times)
    times.sort(key=lambda row: -row[2])
    rows = [{"name": name, "calls": count / units, "ms": t / 1000.0 / units, "share": t / total if total else 0.0}
            for name, count, t in times[:top]]
    return {"unit": unit, "total_ms": total / 1000.0 / units, "rows": rows}


def _activities(device: torch.device) -> list:
    """The profiler activities of a run on ``device``: the host's ops, and on CUDA the device's kernels."""
    from torch.profiler import ProfilerActivity

    if device.type != "cuda" and not torch.cuda.is_available():
        # Without a GPU, Kineto logs "ERROR: gpuGetDeviceCount failed" (and USDT lines) on every profile, which
        # reads like a failure of the run; it reads the level when the profiler first starts. A level the user
        # set wins, and on a GPU machine its messages (CUPTI trouble) stay.
        os.environ.setdefault("KINETO_LOG_LEVEL", "6")
    return [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])


def _dataset(name: str, root: Optional[str], image_size: int, in_channels: int, classes: int, samples: int):
    from ..data import create_dataset

    if name == "synthetic":
        return create_dataset("synthetic", num_samples=samples, image_shape=(image_size, image_size, in_channels),
                              num_classes=classes)
    # Real data only: a missing dataset raises DatasetNotFoundError naming where it looked (no silent fallback).
    return create_dataset(name, root=root, split="train")


def count_ops_per_step(trainer: SupernetTrainer, steps: int = 2) -> Dict[str, float]:
    """Ops launched per training step, counted with torch.profiler.

    Counts the outermost ``aten::`` and ``bnao::`` op calls that compute (views and allocations excluded; a
    compiled bnao op counts once), split by phase
    (forward / backward / optimizer ranges recorded by the trainer); on a GPU each launches at least one
    kernel. On CPU, ``torch._foreach_*`` and ``clip_grad_norm_`` run one op per tensor, whereas on CUDA they
    launch a few multi-tensor kernels, so the optimizer count is a CPU figure. On CUDA the device kernels
    are counted as well.

    Returns:
        ``{"ops_per_step": ..., "kernels_per_step": ... (CUDA only)}``.
    """
    from torch.profiler import profile

    cuda = trainer.device.type == "cuda"
    with profile(activities=_activities(trainer.device)) as prof:
        trainer.train_steps(steps)
    events = list(prof.events())
    ranges = [(ev.name.split("::", 1)[1], ev.time_range.start, ev.time_range.end)
              for ev in events if ev.name in ("bnao::forward", "bnao::backward", "bnao::optimizer")]
    by_phase = {"forward": 0, "backward": 0, "optimizer": 0, "other": 0}
    ops = 0
    kernels = 0
    for ev in events:
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            kernels += 1
            continue
        parent = ev.cpu_parent
        if _is_op(ev.name) and ev.name not in _NO_KERNEL:
            # Outermost aten and bnao op calls (from Python or the autograd engine): each is at least one kernel
            # launch on a GPU; their CPU-internal helpers (e.g. oneDNN layout copies) are not counted.
            if parent is None or not _is_op(parent.name):
                ops += 1
                t = ev.time_range.start
                phase = next((n for n, a, b in ranges if a <= t <= b), "other")
                by_phase[phase] += 1
    out = {"ops_per_step": ops / steps}
    out.update({f"ops_{k}": v / steps for k, v in by_phase.items()})
    if cuda:
        out["kernels_per_step"] = kernels / steps
    return out


def profile_supernet(*, dataset: str = "synthetic", data_root: Optional[str] = None, space: str = "small",
                     layers: int = 3, channels: int = 20, classes: int = 10, batch_size: int = 64, steps: int = 50,
                     warmup: int = 5, device: str = "auto", bf16: bool = False, channels_last: bool = False,
                     pool_size: int = 1000, sampler: str = "proportional", eval_archs: int = 0,
                     eval_batch: int = 500, trace_dir: Optional[str] = None, count_ops: bool = True,
                     loader: str = "auto", seed: int = 0, sequence_archs: int = 5,
                     kernels: str = "auto", graph: str = "auto", top: int = 0) -> Dict[str, Any]:
    """Measures supernet training (and optionally pool evaluation) throughput.

    Args:
        dataset: ``"synthetic"`` (CIFAR-shaped random images) or a dataset name of ``bnao.data``.
        data_root: Data directory for real datasets.
        space: Op set.
        layers: ``N``.
        channels: ``C``.
        classes: Classes (synthetic data; real datasets use their own).
        batch_size: Training batch.
        steps: Timed steps.
        warmup: Untimed steps first (allocator, cuDNN autotuning, plan cache).
        device: ``"auto"``, ``"cpu"``, ``"cuda"``...
        bf16: bfloat16 autocast.
        channels_last: channels_last activations.
        pool_size: Random archs in the pool.
        sampler: ``"proportional"`` (to model size) or ``"uniform"``.
        eval_archs: Archs to score with :func:`evaluate_pool` (0: skip).
        eval_batch: Dev batch size for the evaluation.
        trace_dir: Writes a torch.profiler trace of a few steps there.
        count_ops: Count ops launched per step (two extra profiled steps).
        loader: Loader name (``"auto"`` picks the GPU-resident one when it fits).
        seed: Seed of pool, sampler, data and model.
        kernels: The supernet's cells: ``"auto"``, ``"fused"`` or ``"eager"`` (``Supernet(kernels=...)``).
        graph: Training steps as replayed CUDA graphs: ``"auto"``, ``"on"`` or ``"off"`` (``SupernetTrainer``).
        sequence_archs: Records the launch sequence of a training step for this many archs of the pool and
            reports whether it is the same for all (0: skip).
        top: Reports the ``top`` kernels (ops on a CPU) of a training step by time, and of an evaluated arch
            when ``eval_archs`` is set (:func:`top_kernels`; 0: skip).

    Returns:
        Dict of the figures (see ``bnao profile``).
    """
    from ..data import create_loader

    dev = resolve_device(device)
    torch.manual_seed(seed)
    sp = NAOSpace(op_set=space)
    ds = _dataset(dataset, data_root, 32, 3, classes, max(8 * batch_size, eval_batch, 4096))
    train_loader = create_loader(loader, ds, batch_size, device=dev, augment=True, shuffle=True, drop_last=True,
                                 seed=seed, channels_last=channels_last)
    pool, model, trainer = _build_training(
        sp, ds, train_loader, dev, layers=layers, channels=channels, total_steps=warmup + steps, bf16=bf16,
        channels_last=channels_last, pool_size=pool_size, sampler=sampler, seed=seed, kernels=kernels, graph=graph)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    if warmup:
        trainer.train_steps(warmup)
    result: Dict[str, Any] = {
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "dataset": dataset, "space": space, "layers": layers, "channels": channels, "classes": int(ds.num_classes),
        "batch_size": batch_size, "bf16": bf16, "channels_last": channels_last, "pool_size": pool_size,
        "sampler": sampler, **_cells(model, dev), "params": model.num_parameters(),
        "param_tensors": len(list(model.parameters())),
    }
    result.update(_time_training(trainer, steps))
    if dev.type == "cuda":
        result["peak_memory_mib"] = torch.cuda.max_memory_allocated(dev) / 2**20
    if count_ops:
        result.update(count_ops_per_step(trainer, 2))
    if sequence_archs:
        from .launches import compare_launch_sequences

        images, labels = next(iter(train_loader))
        archs = [tuple(row.tolist()) for row in pool[:sequence_archs]]
        result["launch_sequence"] = compare_launch_sequences(model, images, labels, archs, bf16)
    if top:
        profiled = min(3, steps)
        result["top_kernels"] = top_kernels(lambda: trainer.train_steps(profiled), dev, profiled, "step", top)
    if trace_dir:
        _write_trace(trainer, trace_dir, min(3, steps), dev)
        result["trace_dir"] = trace_dir
    if eval_archs:
        dev_loader = create_loader(loader, ds, eval_batch, device=dev, augment=False, shuffle=False,
                                   drop_last=False, seed=seed, channels_last=channels_last)
        archs, batch = pool[: min(eval_archs, len(pool))], next(iter(dev_loader))
        result.update(_time_evaluation(model, archs, batch, dev, bf16=bf16, graph=graph))
        if top:
            result["top_eval_kernels"] = top_kernels(
                lambda: evaluate_pool(model, archs, batch, bf16=bf16, graph=graph), dev, len(archs), "arch", top)
    return result


def _cells(model: Supernet, dev: torch.device) -> Dict[str, str]:
    """The cells a training step of ``model`` runs: ``{"kernels": "fused"}``, or ``{"kernels": "eager",
    "kernels_note": why}`` (the reason as :func:`~.fused_forward.cells_choice` gives it, as in
    :meth:`Supernet.cells_path`)."""
    fused, reason = cells_choice(model, dev, True, torch.float32)
    return {"kernels": "fused"} if fused else {"kernels": "eager", "kernels_note": reason}


def _cells_text(r: Dict[str, Any]) -> str:
    """``fused`` or ``eager (why)``: the result's ``kernels`` and ``kernels_note`` for the text output."""
    return f"{r['kernels']} ({r['kernels_note']})" if r.get("kernels_note") else str(r["kernels"])


def _build_training(sp: NAOSpace, ds, train_loader, dev: torch.device, *, layers: int, channels: int,
                    total_steps: int, bf16: bool, channels_last: bool, pool_size: int, sampler: str, seed: int,
                    kernels: str, graph: str) -> Tuple[np.ndarray, Supernet, SupernetTrainer]:
    """The random pool, the supernet and its trainer of a :func:`profile_supernet` run.

    Returns:
        ``(pool, model, trainer)``; the pool, the sampler and the model are drawn from ``seed`` (the model from
        the global torch seed).
    """
    from ..sampling import create_sampler

    num_classes = int(ds.num_classes)
    in_channels = int(ds.images.shape[-1]) if hasattr(ds, "images") else 3
    pool = sp.sample_array(pool_size, np.random.default_rng(seed))
    if sampler == "proportional":
        from ..size import model_size

        weights = np.asarray(model_size(pool, space=sp, layers=layers, channels=channels, classes=num_classes,
                                        in_channels=in_channels), dtype=np.float64)
    else:
        weights = np.ones(pool_size)
    smp = create_sampler(sampler, weights, seed=seed, device=dev)
    model = Supernet(sp, layers=layers, channels=channels, num_classes=num_classes, in_channels=in_channels,
                     total_steps=total_steps, kernels=kernels).to(dev)
    trainer = SupernetTrainer(model, smp, pool, train_loader, bf16=bf16, channels_last=channels_last,
                              steps_total=total_steps, device=dev, seed=seed, sync_timing=True, graph=graph)
    return pool, model, trainer


def _time_training(trainer: SupernetTrainer, steps: int) -> Dict[str, Any]:
    """Times ``steps`` training steps twice: once with synchronised phases (the split), once without (img/s).

    The split's synchronisation around every phase slows the steps, hence the separate plain run.
    """
    split = trainer.train_steps(steps)
    trainer.sync_timing = False
    plain = trainer.train_steps(steps)
    return {
        "steps": steps,
        "img_per_s": plain["img_per_s"],
        "ms_per_step": plain["ms_per_step"],
        "split_ms": {k: split[f"{k}_ms"] for k in ("draw", "forward", "backward", "optimizer")},
        "split_ms_per_step": split["ms_per_step"],
        "loss": plain["loss"],
        "step_path": dict(trainer.graph_status),
    }


def _write_trace(trainer: SupernetTrainer, trace_dir: str, steps: int, dev: torch.device) -> None:
    """Writes a torch.profiler (TensorBoard) trace of ``steps`` training steps to ``trace_dir``."""
    from torch.profiler import profile, tensorboard_trace_handler

    with profile(activities=_activities(dev), on_trace_ready=tensorboard_trace_handler(trace_dir)):
        trainer.train_steps(steps)


def _time_evaluation(model: Supernet, archs: np.ndarray, batch, dev: torch.device, *, bf16: bool, graph: str
                     ) -> Dict[str, Any]:
    """Pool-evaluation speed: :func:`evaluate_pool` of ``archs`` on ``batch``, timed on its second run."""
    # Warm-up on the same archs: a search builds a pool's device tables once (they are cached on the model).
    evaluate_pool(model, archs, batch, bf16=bf16, graph=graph)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    t0 = time.perf_counter()
    evaluate_pool(model, archs, batch, bf16=bf16, graph=graph)
    elapsed = time.perf_counter() - t0
    result = {"eval_archs": len(archs), "eval_batch": int(batch[1].shape[0]),
              "eval_archs_per_s": len(archs) / elapsed, "eval_path": dict(last_evaluation)}
    if dev.type == "cuda":
        result["peak_memory_mib"] = torch.cuda.max_memory_allocated(dev) / 2**20
    return result


def _whole_step(r: Dict[str, Any]) -> bool:
    """Whether the steps ran as the graph step's parts (replayed or not), which time forward, backward and the
    update as one phase."""
    return r.get("step_path", {}).get("mode", "eager") != "eager"


def _phase_label(r: Dict[str, Any], phase: str) -> str:
    if not _whole_step(r):
        return phase
    return {"forward": "forward+backward+update", "optimizer": "bookkeeping"}.get(phase, phase)


def format_result(r: Dict[str, Any]) -> str:
    """Human-readable lines of :func:`profile_supernet`'s result."""
    lines = [
        f"device {r['device']}  dataset {r['dataset']}  space {r['space']}  N={r['layers']} C={r['channels']} "
        f"classes={r['classes']}  batch {r['batch_size']}  {'bf16' if r['bf16'] else 'fp32'}"
        f"{'  channels_last' if r['channels_last'] else ''}  sampler {r['sampler']} over {r['pool_size']} archs"
        f"  cells {_cells_text(r)}",
        f"  step {r['step_path']['mode']} ({r['step_path']['reason']})" if "step_path" in r else "  step -",
        f"supernet: {r['params']:,} weights in {r['param_tensors']} tensors",
        f"training: {r['img_per_s']:,.1f} img/s, {r['ms_per_step']:.2f} ms/step ({r['steps']} steps)",
        "split (synchronised): " + ", ".join(f"{_phase_label(r, k)} {v:.2f} ms" for k, v in r["split_ms"].items()
                                             if not (k == "backward" and _whole_step(r)))
        + f" (total {r['split_ms_per_step']:.2f} ms/step)",
    ]
    if "ops_per_step" in r:
        line = (f"ops launched per step: {r['ops_per_step']:.0f} compute aten ops (forward {r['ops_forward']:.0f}, "
                f"backward {r['ops_backward']:.0f}, optimizer {r['ops_optimizer']:.0f}, other {r['ops_other']:.0f})")
        if "kernels_per_step" in r:
            line += f", {r['kernels_per_step']:.0f} CUDA kernels"
        lines.append(line)
    if "launch_sequence" in r:
        seq = r["launch_sequence"]
        verdict = ("identical for every arch" if seq["identical"] else
                   f"differs between archs ({seq['distinct']} distinct sequences)")
        lines.append(f"launch sequence of a training step over {seq['archs']} archs: {verdict}, "
                     f"{seq['ops_min']}-{seq['ops_max']} dispatched ops")
    what = "kernels and copies" if r["device"] != "cpu" else "ops (self CPU time)"
    for key in ("top_kernels", "top_eval_kernels"):
        if key in r:
            table = r[key]
            lines.append(f"top {what} per {'training step' if table['unit'] == 'step' else 'evaluated arch'} "
                         f"({table['total_ms']:.2f} ms per {table['unit']} in all):")
            lines += [f"  {row['share']:6.1%} {row['ms']:8.3f} ms {row['calls']:7.1f} calls  {row['name'][:110]}"
                      for row in table["rows"]]
    if "peak_memory_mib" in r:
        lines.append(f"peak GPU memory: {r['peak_memory_mib']:,.0f} MiB")
    if "eval_archs_per_s" in r:
        path = r.get("eval_path", {})
        lines.append(f"pool evaluation: {r['eval_archs_per_s']:.2f} archs/s ({r['eval_archs']} archs, batch "
                     f"{r['eval_batch']}; {path.get('mode', '?')}: {path.get('reason', '?')})")
    if "trace_dir" in r:
        lines.append(f"trace written to {r['trace_dir']}")
    return "\n".join(lines)
