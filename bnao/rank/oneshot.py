"""One-shot side: a supernet trained on only the experiment's archs, every arch scored with the shared weights.

One job = one supernet run for a (sampler, seed, setting): it trains to the
largest of its epoch counts and scores every arch after each count on the way
(``supernet.schedule: shared``, the cosine lr and the drop-path ramp span the
run's whole length), or trains exactly one count with its own schedule
(``separate``, the paper's protocol; one job per count).

Everything random in a job derives from its seed: the supernet's weights and
drop-path masks, the sampler's stream, the training order and augmentation,
and the random evaluation batches. The archs and the data are the same for
every job.
"""

from __future__ import annotations

import time
from typing import Any, Dict, List, Sequence

import numpy as np
import torch

from ..data import AugmentConfig, create_loader
from ..data.loaders.base import mix_seed
from ..device import resolve_device
from ..sampling import create_sampler
from ..supernet import RandomBatches, Supernet, SupernetTrainer, evaluate_pool

# Salts of the random streams one job seed feeds.
_SALT_INIT, _SALT_LOADER, _SALT_EVAL = 0x5EED, 0x10AD, 0xE7A1


def make_jobs(config: Dict[str, Any]) -> List[Dict[str, Any]]:
    """The supernet runs of an experiment: the main grid, then the variants.

    Main grid: every sampler x seed (x epoch count with ``schedule: separate``), scored with
    ``supernet.eval_data``. Variants (first seed, largest count): the other evaluation data
    (``extra_eval_data``: the main run scored a second time, no extra training) and one run per
    sampler with the other unused-slot update.
    """
    sc = config["supernet"]
    epochs = list(sc["epochs"])
    other_eval = {"random": "fixed", "fixed": "random"}[sc["eval_data"]]
    other_slots = {"decay": "freeze", "freeze": "decay"}[sc["unused_slot_update"]]
    first_seed = sc["seeds"][0]
    jobs = []
    # Seed-major order: the samplers of one seed finish together, so a partial results.json compares them.
    for seed in sc["seeds"]:
        for sampler in config["sampler"]["names"]:
            runs = [[e] for e in epochs] if sc["schedule"] == "separate" else [epochs]
            for run_epochs in runs:
                extra = (other_eval if config["variants"]["eval_data"] and seed == first_seed
                         and run_epochs[-1] == epochs[-1] else None)
                jobs.append({"sampler": sampler, "seed": seed, "epochs": run_epochs, "eval_data": sc["eval_data"],
                             "extra_eval_data": extra, "unused_slot_update": sc["unused_slot_update"],
                             "variant": None})
    for sampler in config["sampler"]["names"]:
        if config["variants"]["unused_slot_update"]:
            jobs.append({"sampler": sampler, "seed": first_seed, "epochs": [epochs[-1]], "eval_data": sc["eval_data"],
                         "extra_eval_data": None, "unused_slot_update": other_slots,
                         "variant": f"unused_slot_update={other_slots}"})
    return jobs


def _eval_data(mode: str, dev: Any, config: Dict[str, Any], device: torch.device, seed: int, epochs: int):
    """The evaluation data of one scoring: the first dev batches (fixed) or a fresh random batch per arch."""
    sc, dc = config["supernet"], config["data"]
    size = min(int(sc["eval_batch_size"]), len(dev))
    if mode == "fixed":
        loader = create_loader(dc["loader"], dev, size, device=device, augment=False, shuffle=False,
                               drop_last=False, seed=0)
        batches = []
        for batch in loader:
            batches.append(batch)
            if len(batches) >= int(sc["eval_batches"]):
                break
        return batches
    loader = create_loader(dc["loader"], dev, size, device=device, augment=False, shuffle=True, drop_last=True,
                           seed=mix_seed(seed, _SALT_EVAL, epochs))
    return RandomBatches(loader, count=int(sc["eval_batches"]))


def _build(state: Dict[str, Any], job: Dict[str, Any], device: torch.device):
    config, data, space = state["config"], state["data"], state["space"]
    sc = config["supernet"]
    seed = int(job["seed"])
    loader = create_loader(config["data"]["loader"], data.train, int(sc["batch_size"]), device=device,
                           augment=AugmentConfig() if config["data"]["augment"] else False, shuffle=True,
                           drop_last=True, seed=mix_seed(seed, _SALT_LOADER))
    steps_per_epoch = int(sc["steps_per_epoch"] or len(loader))
    total = steps_per_epoch * int(job["epochs"][-1])
    keep = float(sc["drop_path_keep_prob"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(mix_seed(seed, _SALT_INIT))
        model = Supernet(space, skeleton="cifar", layers=int(sc["layers"]), channels=int(sc["channels"]),
                         num_classes=data.num_classes, in_channels=data.in_channels,
                         drop_path_keep_prob=None if keep >= 1.0 else keep, total_steps=total,
                         seed=mix_seed(seed, _SALT_INIT, 1)).to(device)
    sampler = create_sampler(job["sampler"], np.asarray(state["sizes"], dtype=np.float64),
                             alpha=float(config["sampler"]["alpha"]), seed=seed, device=device)
    trainer = SupernetTrainer(
        model, sampler, np.asarray(state["archs"], dtype=np.int64), loader, lr_max=float(sc["lr_max"]),
        lr_min=float(sc["lr_min"]), momentum=float(sc["momentum"]), weight_decay=float(sc["weight_decay"]),
        grad_clip=float(sc["grad_clip"]), steps_total=total, device=device, seed=seed,
        lr_steps_per_epoch=steps_per_epoch if sc["lr_schedule"] == "epoch" else None,
        unused_slot_update=job["unused_slot_update"])
    return model, trainer, steps_per_epoch


def train_and_score(state: Dict[str, Any], job: Dict[str, Any]) -> Dict[str, Any]:
    """Runs one supernet job (a :func:`~bnao.rank.workers.run_jobs` job).

    Returns:
        ``{"scores": {E: {eval mode: [accuracy per arch]}}, "draws": steps per arch, "steps", "seconds",
        "train_seconds", "eval_seconds", "train_loss"}``.
    """
    config = state["config"]
    device = resolve_device(config["device"])
    model, trainer, steps_per_epoch = _build(state, job, device)
    archs = np.asarray(state["archs"], dtype=np.int64)
    scores: Dict[int, Dict[str, List[float]]] = {}
    train_seconds = eval_seconds = 0.0
    stats: Dict[str, float] = {}
    for epochs in job["epochs"]:
        start = time.perf_counter()
        stats = trainer.train_steps(epochs * steps_per_epoch - trainer.global_step)
        train_seconds += time.perf_counter() - start
        start = time.perf_counter()
        scores[epochs] = {}
        modes = [job["eval_data"]]
        if job["extra_eval_data"] and epochs == job["epochs"][-1]:
            modes.append(job["extra_eval_data"])
        for mode in modes:
            batches = _eval_data(mode, state["data"].dev, config, device, int(job["seed"]), epochs)
            acc, _ = evaluate_pool(model, archs, batches)
            scores[epochs][mode] = acc.tolist()
        eval_seconds += time.perf_counter() - start
    return {"scores": scores, "draws": trainer.draw_counts().tolist(), "steps": int(trainer.global_step),
            "train_seconds": train_seconds, "eval_seconds": eval_seconds, "seconds": train_seconds + eval_seconds,
            "train_loss": float(stats.get("loss", float("nan")))}


def run_label(job: Dict[str, Any]) -> str:
    """A short description of a job for progress lines."""
    label = f"{job['sampler']} seed {job['seed']} E={','.join(map(str, job['epochs']))}"
    return label + (f" [{job['variant']}]" if job["variant"] else "")


def collect(jobs_results: Sequence, config: Dict[str, Any]) -> Dict[str, Any]:
    """Sorts job results into the main scores and the variants.

    Returns:
        ``{"main": {sampler: {E: {seed: scores}}}, "variants": [{"name", "sampler", "seed", "epochs",
        "scores"}], "runs": [per job: label, steps, seconds, draws]}``.
    """
    sc = config["supernet"]
    main: Dict[str, Dict[int, Dict[int, List[float]]]] = {s: {} for s in config["sampler"]["names"]}
    variants, runs = [], []
    for job, result in jobs_results:
        runs.append({"label": run_label(job), "sampler": job["sampler"], "seed": job["seed"], "epochs": job["epochs"],
                     "variant": job["variant"], "steps": result["steps"], "seconds": result["seconds"],
                     "train_seconds": result["train_seconds"], "eval_seconds": result["eval_seconds"],
                     "train_loss": result["train_loss"], "draws": result["draws"]})
        for epochs, by_mode in result["scores"].items():
            for mode, values in by_mode.items():
                if job["variant"] is None and mode == sc["eval_data"]:
                    main[job["sampler"]].setdefault(int(epochs), {})[int(job["seed"])] = values
                else:
                    name = job["variant"] or f"eval_data={mode}"
                    variants.append({"name": name, "sampler": job["sampler"], "seed": job["seed"],
                                     "epochs": int(epochs), "scores": values})
    return {"main": main, "variants": variants, "runs": runs}


__all__ = ["collect", "make_jobs", "run_label", "train_and_score"]
