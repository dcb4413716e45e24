"""Stand-alone training of one architecture (final training and the search's re-ranking).

The recipe is the NAO reference's ``train_cifar.py`` (NAO_V2, used by
Balanced NAO): SGD with momentum 0.9 and weight decay 3e-4, cosine learning
rate from ``lr_max`` to ``lr_min`` set once per epoch, gradient-norm clip 5,
optional auxiliary head (loss weight 0.4), drop-path scaled by cell depth and
training progress, dropout before the classifier, cutout through the data
loader's augmentation.

Exact resume
------------
A checkpoint is written atomically at the end of every epoch. Everything
random is a pure function of ``(seed, epoch)``: the loader draws each epoch's
order and augmentation from ``(seed, epoch, batch)`` and the global torch
generator (drop-path masks, dropout) is reseeded from ``(seed, epoch)`` at
the start of every epoch, inside :func:`torch.random.fork_rng` so the
caller's RNG is left alone. The learning rate is a function of the epoch.
Restoring model, optimizer (momentum buffers) and epoch therefore continues
exactly where the uninterrupted run would be: on the CPU the final weights
are bit-identical.
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..device import resolve_device
from ..data_parallel import GradientSync, ShardedLoader
from ..distributed import Context, any_rank, average_buffers, sum_across_ranks
from ..data.loaders.base import mix_seed
from ..nets.network import build_network
from ..space.nao import ArchLike, NAOSpace
from ..signals import Stopped, stop_requested
from .checkpoint import CheckpointError, load_file, partial_of_rank, save_atomic
from .config import StandaloneConfig
from .evaluate import count_parameters, evaluate_model

CHECKPOINT_FORMAT = "bnao-standalone-checkpoint"
CHECKPOINT_VERSION = 1

# Salts that separate the random streams derived from the one user seed.
_SALT_INIT, _SALT_EPOCH, _SALT_LOADER = 0x1A17, 0xE90C, 0x10AD


class NonFiniteLossError(RuntimeError):
    """Training diverged: the loss (or gradient norm) stayed NaN/inf for several steps."""


# Settings that may differ between a checkpoint and the run resuming it: they
# change neither the weights nor the order of anything random.
_RESUME_FREE = ("eval_every", "eval_batch_size", "loader", "max_nonfinite_steps")

def _dataset_shape(dataset: Any) -> Tuple[int, int]:
    """``(num_classes, in_channels)`` of a bnao dataset."""
    shape = getattr(dataset, "image_shape", None)
    in_channels = int(shape[-1]) if shape is not None and not isinstance(shape, int) else 3
    return int(dataset.num_classes), in_channels


class StandaloneTrainer:
    """Trains one arch from scratch and evaluates it; resumable from its checkpoint.

    Args:
        arch: The arch (any form :meth:`NAOSpace.arch` accepts).
        space: Its search space.
        train_data: Training dataset (``bnao.data`` ArrayDataset or FolderDataset).
        eval_data: Evaluation dataset (test split for final training, dev split for re-ranking), or None.
        config: Hyper-parameters; ``num_classes``/``in_channels`` default to the training set's.
        device: ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:N"``.
        checkpoint_path: Where to checkpoint after every epoch (None: no checkpoints).
        progress: Shows a progress bar per epoch (tqdm, on stderr).
        on_epoch: Called with each epoch's record after its checkpoint is written.
        parallel: Several processes (:mod:`bnao.distributed`): data-parallel training, each rank on its slice
            of every batch with gradients averaged over the ranks; rank 0 writes the checkpoint (None: one
            process). ``device`` must then be this rank's device.

    Raises:
        bnao.space.InvalidArchError: The arch is not in ``space``.
        ValueError: An invalid setting.
    """

    def __init__(self, arch: ArchLike, space: NAOSpace, train_data: Any, eval_data: Any = None,
                 config: Optional[StandaloneConfig] = None, *, device: Union[str, torch.device, None] = "auto",
                 checkpoint_path: Optional[Union[str, os.PathLike]] = None, progress: bool = False,
                 on_epoch: Optional[Callable[[Dict[str, Any]], None]] = None, parallel: Optional[Context] = None):
        self.parallel = parallel if parallel is not None and parallel.enabled else None
        self.grad_sync = GradientSync(self.parallel) if self.parallel else None
        self.space = space
        self.arch = space.arch(arch)
        self.config = dataclasses.replace(config) if config is not None else StandaloneConfig()
        cfg = self.config
        num_classes, in_channels = _dataset_shape(train_data)
        if cfg.num_classes is None:
            cfg.num_classes = num_classes
        if cfg.in_channels is None:
            cfg.in_channels = in_channels
        cfg.validate()
        self.train_data, self.eval_data = train_data, eval_data
        self.device = resolve_device(device)
        self.checkpoint_path = Path(checkpoint_path) if checkpoint_path is not None else None
        self.progress, self.on_epoch = progress, on_epoch

        from ..data import create_loader  # lazily: the data package pulls in optional loaders

        # Cutout is part of the loader's augmentation so that it is drawn from the loader's resumable stream.
        augment: Any = False
        if cfg.augment or cfg.cutout:
            from ..data.augment import AugmentConfig

            augment = AugmentConfig(cutout=cfg.cutout) if cfg.augment else AugmentConfig(
                crop_padding=0, flip=False, cutout=cfg.cutout)
        # On the CPU, PyTorch's depthwise-conv weight gradient is ~40x slower on NCHW than on NHWC tensors
        # (measured: 12.6 s vs 0.29 s a step at N=1, C=8, batch 128, 28x28), so the CPU always trains NHWC.
        self.channels_last = cfg.channels_last or self.device.type == "cpu"
        self.train_loader = create_loader(
            cfg.loader, train_data, cfg.batch_size, device=self.device, augment=augment, shuffle=True,
            drop_last=True, seed=mix_seed(cfg.seed, _SALT_LOADER), channels_last=self.channels_last)
        if self.parallel:
            self.train_loader = ShardedLoader(self.train_loader, self.parallel, "batch_size")
        self.steps_per_epoch = len(self.train_loader)
        self.total_steps = self.steps_per_epoch * cfg.epochs

        with torch.random.fork_rng(devices=self._rng_devices()):
            torch.manual_seed(mix_seed(cfg.seed, _SALT_INIT))
            self.model = build_network(
                self.arch, space, skeleton=cfg.skeleton, layers=cfg.layers, channels=cfg.channels,
                num_classes=cfg.num_classes, in_channels=cfg.in_channels, auxiliary=cfg.auxiliary,
                drop_path_keep_prob=cfg.drop_path_keep_prob, dropout=cfg.dropout, total_steps=self.total_steps)
        memory_format = torch.channels_last if self.channels_last else torch.preserve_format
        self.model.to(device=self.device, memory_format=memory_format)
        self.params = count_parameters(self.model)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=cfg.lr_max, momentum=cfg.momentum,
                                         weight_decay=cfg.weight_decay)
        self.epoch = 0  # epochs completed
        self.global_step = 0
        self.history: List[Dict[str, Any]] = []
        self.seconds = 0.0  # training + evaluation time over all sessions
        self.result: Optional[Dict[str, Any]] = None
        # Sums and RNG state of an epoch stopped part-way (graceful stop), to continue it exactly.
        self._partial: Optional[Dict[str, Any]] = None

    # ------------------------------------------------------------------ helpers
    def _rng_devices(self) -> List[int]:
        if self.device.type == "cuda":
            return [self.device.index if self.device.index is not None else torch.cuda.current_device()]
        return []

    def _read_flag(self, flag: torch.Tensor) -> bool:
        """A 0-dim bool tensor's value; on CUDA through pinned memory, waiting only for the work queued so far."""
        if self.device.type != "cuda":
            return bool(flag)
        if getattr(self, "_flag_host", None) is None:
            self._flag_host = torch.zeros(1, dtype=torch.bool, pin_memory=True)
        self._flag_host.copy_(flag.view(1), non_blocking=True)
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        event.synchronize()
        return bool(self._flag_host[0])

    def _autocast(self):
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=self.config.bf16)

    def _loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Training loss of one output head (cross-entropy with optional label smoothing)."""
        return F.cross_entropy(logits.float(), labels, label_smoothing=self.config.label_smoothing)

    def config_dict(self) -> Dict[str, Any]:
        """The resolved configuration plus arch and space (stored in checkpoints and model files)."""
        return {"arch": str(self.arch), "space": self.space.config(), **dataclasses.asdict(self.config)}

    # --------------------------------------------------------------- checkpoint
    def state_dict(self) -> Dict[str, Any]:
        """Everything needed to continue training (written at the end of every epoch)."""
        return {
            "format": CHECKPOINT_FORMAT,
            "version": CHECKPOINT_VERSION,
            "config": self.config_dict(),
            "epoch": self.epoch,
            "global_step": self.global_step,
            "steps_per_epoch": self.steps_per_epoch,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            # The lr is a function of the epoch (cosine), so the schedule's whole state is the epoch.
            "schedule": {"kind": f"cosine-per-{self.config.lr_schedule}", "epoch": self.epoch, "lr_max": self.config.lr_max,
                         "lr_min": self.config.lr_min, "epochs": self.config.epochs},
            # Global torch RNG is reseeded from (seed, epoch) each epoch; kept for the record.
            "rng": {"seed": self.config.seed, "scheme": "torch.manual_seed(mix_seed(seed, 0xE90C, epoch)) per epoch"},
            "loader": self.train_loader.state_dict(),
            "history": self.history,
            "seconds": self.seconds,
            "result": self.result,
            "partial_epoch": self._partial,
        }

    def save_checkpoint(self) -> None:
        """Writes :meth:`state_dict` atomically to ``checkpoint_path`` (no-op without one)."""
        if self.checkpoint_path is None or (self.parallel and not self.parallel.is_main):
            return
        self.checkpoint_path.parent.mkdir(parents=True, exist_ok=True)
        save_atomic(self.state_dict(), self.checkpoint_path)

    def load_checkpoint(self, path: Optional[Union[str, os.PathLike]] = None) -> None:
        """Restores a checkpoint written by :meth:`save_checkpoint` with the same settings.

        Raises:
            CheckpointError: Unreadable file, or it was written for another arch or other settings
                (the message names the keys that differ).
        """
        path = Path(path) if path is not None else self.checkpoint_path
        if path is None:
            raise ValueError("no checkpoint path given")
        fix = ("Delete it to start this training over, or point to an intact checkpoint "
               "(a file is replaced only by a complete new one, so a damaged file was damaged after writing).")
        state = load_file(path, CHECKPOINT_FORMAT, fix)
        if state.get("version") != CHECKPOINT_VERSION:
            raise CheckpointError(f"{path}: checkpoint version {state.get('version')} is not supported "
                                  f"(this bnao writes version {CHECKPOINT_VERSION}). {fix}")
        saved, mine = dict(state["config"]), self.config_dict()
        for f in dataclasses.fields(StandaloneConfig):  # settings added since the checkpoint was written
            if f.name not in saved and f.default is not dataclasses.MISSING:
                saved[f.name] = f.default
        differ = sorted(k for k in set(saved) | set(mine)
                        if k not in _RESUME_FREE and saved.get(k) != mine.get(k))
        if differ:
            pairs = ", ".join(f"{k}: checkpoint {saved.get(k)!r} vs now {mine.get(k)!r}" for k in differ)
            raise CheckpointError(f"{path}: cannot resume, the run's settings differ ({pairs}). "
                                  "Resume with the original settings, or use a new output/checkpoint location.")
        if state["steps_per_epoch"] != self.steps_per_epoch:
            raise CheckpointError(f"{path}: cannot resume, the checkpoint has {state['steps_per_epoch']} steps per "
                                  f"epoch and this data {self.steps_per_epoch} (a different training set?).")
        try:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.train_loader.load_state_dict(state["loader"])
        except (RuntimeError, ValueError, KeyError) as err:
            raise CheckpointError(f"{path}: checkpoint does not fit this network ({err}). {fix}") from None
        self.epoch = int(state["epoch"])
        self.global_step = int(state["global_step"])
        self.history = list(state["history"])
        self.seconds = float(state["seconds"])
        self.result = state.get("result")
        self._partial = partial_of_rank(state.get("partial_epoch"), self.parallel, path)

    # ------------------------------------------------------------------ running
    @torch.no_grad()
    def evaluate(self, data: Any = None, batch_size: Optional[int] = None) -> Dict[str, float]:
        """Accuracy and mean cross-entropy of the model on ``data`` (default: the eval set), BN in eval mode.

        Returns:
            ``{"acc": fraction correct, "loss": mean loss, "n": images}``.
        """
        data = self.eval_data if data is None else data
        if data is None:
            raise ValueError("no evaluation data")
        if self.parallel:  # every rank scores every world_size-th image; the sums are added up
            rank, world = self.parallel.rank, self.parallel.world_size
            part = evaluate_model(self.model, data.subset(np.arange(rank, len(data), world)),
                                  batch_size or self.config.eval_batch_size, self.device, loader=self.config.loader,
                                  channels_last=self.channels_last, bf16=self.config.bf16)
            acc, loss, n = sum_across_ranks([part["acc"] * part["n"], part["loss"] * part["n"], part["n"]],
                                            "the evaluation")
            return {"acc": acc / max(n, 1), "loss": loss / max(n, 1), "n": int(n)}
        return evaluate_model(self.model, data, batch_size or self.config.eval_batch_size, self.device,
                              loader=self.config.loader, channels_last=self.channels_last,
                              bf16=self.config.bf16)

    def _train_epoch(self, epoch: int) -> Dict[str, Any]:
        cfg, model = self.config, self.model
        lr = cfg.lr_at(epoch) if cfg.lr_schedule == "epoch" else cfg.lr_at_step(epoch * self.steps_per_epoch,
                                                                                 self.total_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        model.train()
        partial, self._partial = self._partial, None
        if partial is None:
            self.train_loader.set_epoch(epoch)
            # Rank 0 draws one process's stream; the others their own (rank-salted), not copies of it.
            rank = (self.parallel.rank,) if self.parallel and self.parallel.rank else ()
            torch.manual_seed(mix_seed(cfg.seed, _SALT_EPOCH, epoch, *rank))
        else:  # continue an epoch stopped part-way: the loader's position came with the checkpoint
            self._set_rng(partial["rng"])
        loss_sum = torch.tensor(partial["loss_sum"] if partial else 0.0, dtype=torch.float64, device=self.device)
        correct = torch.tensor(partial["correct"] if partial else 0, dtype=torch.int64, device=self.device)
        seen, skipped, bad_run = (partial["seen"], partial["skipped"], partial["bad_run"]) if partial else (0, 0, 0)
        batches = self.train_loader
        bar = None
        if self.progress:
            from tqdm import tqdm

            bar = tqdm(total=self.steps_per_epoch, desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False,
                       unit="step", dynamic_ncols=True)
        per_step = cfg.lr_schedule == "step"
        for images, labels in batches:
            model.set_step(self.global_step)
            if per_step:
                for group in self.optimizer.param_groups:
                    group["lr"] = cfg.lr_at_step(self.global_step, self.total_steps)
            with self._autocast():
                out = model(images)
            logits, aux_logits = out if isinstance(out, tuple) else (out, None)
            loss = self._loss(logits, labels)
            if aux_logits is not None:
                loss = loss + cfg.auxiliary_weight * self._loss(aux_logits, labels)
            self.optimizer.zero_grad(set_to_none=True)
            # A non-finite loss or gradient would poison the weights and momentum: skip the update. The
            # backward and the clipping are queued before the host looks at the flag, so the GPU keeps
            # working while the host waits (the backward of a rare bad step is wasted, not harmful).
            loss.backward()
            ok = torch.isfinite(loss.detach())
            if self.grad_sync is not None:  # average over the ranks; all agree on skipping and stopping
                agreed = self.grad_sync.reduce(list(model.parameters()), loss, stop_requested())
                ok = torch.tensor(agreed, device=self.device)
            if cfg.grad_clip:
                norm = nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                ok = ok & torch.isfinite(norm)
            finite = self._read_flag(ok)
            if finite:
                self.optimizer.step()
                bad_run = 0
                n = labels.shape[0]
                loss_sum += loss.detach().double() * n
                correct += (logits.detach().argmax(1) == labels).sum()
                seen += n
            else:
                skipped += 1
                bad_run += 1
                self.optimizer.zero_grad(set_to_none=True)
                if bad_run >= cfg.max_nonfinite_steps:
                    if bar is not None:
                        bar.close()
                    kept = (f"the last good checkpoint (end of epoch {self.epoch}) is kept at {self.checkpoint_path}"
                            if self.checkpoint_path is not None and self.epoch > 0 else "no checkpoint was written")
                    raise NonFiniteLossError(
                        f"training diverged: loss or gradient was {loss.item()} for {bad_run} consecutive steps "
                        f"(epoch {epoch + 1}, step {self.global_step + 1}, lr {lr:g}); {kept}. Lower the learning "
                        "rate, turn off bf16, or check the data for NaNs.")
            self.global_step += 1
            if bar is not None:
                bar.update(1)
                if seen and self.global_step % 20 == 0:
                    bar.set_postfix(loss=f"{float(loss_sum) / seen:.3f}")
            stop = self.grad_sync.stop_agreed if self.grad_sync is not None else stop_requested()
            if stop and self.train_loader.position < self.steps_per_epoch:
                if bar is not None:
                    bar.close()
                self._stop_mid_epoch(epoch, float(loss_sum), int(correct), seen, skipped, bad_run)
        if bar is not None:
            bar.close()
        if self.parallel:  # one model and one record on every rank
            average_buffers(model)
            loss_sum, correct, seen = sum_across_ranks([float(loss_sum), int(correct), seen], "the epoch's statistics")
        return {"epoch": epoch + 1, "lr": lr, "train_loss": float(loss_sum) / max(seen, 1),
                "train_acc": float(correct) / max(seen, 1), "skipped_steps": skipped}

    def _rng_state(self) -> Dict[str, Any]:
        state = {"cpu": torch.get_rng_state()}
        if self.device.type == "cuda":
            state["cuda"] = torch.cuda.get_rng_state(self.device)
        return state

    def _set_rng(self, state: Dict[str, Any]) -> None:
        torch.set_rng_state(state["cpu"])
        if "cuda" in state and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda"], self.device)

    def _stop_mid_epoch(self, epoch: int, loss_sum: float, correct: int, seen: int, skipped: int, bad_run: int) -> None:
        """Checkpoints the epoch in progress at this step boundary and raises :class:`Stopped`."""
        self._partial = {"loss_sum": loss_sum, "correct": correct, "seen": seen, "skipped": skipped,
                         "bad_run": bad_run, "rng": self._rng_state()}
        if self.parallel:  # each rank's sums and random stream, kept by rank in the one checkpoint
            from ..distributed import gather_objects

            average_buffers(self.model)
            self._partial = {"by_rank": gather_objects(self._partial, "a stop mid-epoch")}
        self.save_checkpoint()
        raise Stopped(f"epoch {epoch + 1}, step {self.train_loader.position} of {self.steps_per_epoch}")

    def fit(self, resume: bool = True) -> Dict[str, Any]:
        """Trains the remaining epochs, evaluating and checkpointing after each.

        Args:
            resume: Continue from ``checkpoint_path`` when it exists (else start over and overwrite it).

        Returns:
            See :func:`~bnao.train.api.train_standalone`.

        Raises:
            NonFiniteLossError: The loss stayed NaN/inf for ``max_nonfinite_steps`` steps.
            CheckpointError: The checkpoint to resume from is unreadable or from other settings.
        """
        if resume and self.checkpoint_path is not None and self.checkpoint_path.exists():
            self.load_checkpoint()
        cfg = self.config
        with torch.random.fork_rng(devices=self._rng_devices()):
            while self.epoch < cfg.epochs:
                # The checkpoint of the last finished epoch is this step boundary (agreed by all ranks).
                if any_rank(stop_requested(), "a stop check") if self.parallel else stop_requested():
                    raise Stopped(f"the end of epoch {self.epoch}")
                start = time.perf_counter()
                record = self._train_epoch(self.epoch)
                last = self.epoch + 1 == cfg.epochs
                if self.eval_data is not None and (last or (cfg.eval_every and (self.epoch + 1) % cfg.eval_every == 0)):
                    ev = self.evaluate()
                    record.update(eval_acc=ev["acc"], eval_loss=ev["loss"])
                else:
                    record.update(eval_acc=None, eval_loss=None)
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                record["seconds"] = time.perf_counter() - start
                self.seconds += record["seconds"]
                self.epoch += 1
                self.history.append(record)
                if last:
                    self.result = self._result()
                self.save_checkpoint()
                if self.on_epoch is not None:
                    self.on_epoch(dict(record))
        if self.result is None:  # epochs == completed already but no result stored (cannot happen for v1 files)
            self.result = self._result()
        return dict(self.result)

    def _result(self) -> Dict[str, Any]:
        last = self.history[-1] if self.history else {}
        acc = last.get("eval_acc")
        return {
            "arch": str(self.arch),
            "eval_acc": acc,
            "eval_error": None if acc is None else 1.0 - acc,
            "eval_loss": last.get("eval_loss"),
            "train_loss": last.get("train_loss"),
            "params": self.params,
            "epochs": self.epoch,
            "steps": self.global_step,
            "seconds": self.seconds,
            "history": [dict(h) for h in self.history],
        }


# Names that lived here before the split (config.py, api.py): still importable from this module.
_MOVED = {"LR_SCHEDULES": "config", "make_config": "config", "train_standalone": "api", "rerank": "api"}


def __getattr__(name: str):
    if name in _MOVED:
        import importlib

        return getattr(importlib.import_module(f".{_MOVED[name]}", __package__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
