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

The trainer's epoch (its steps, skipped non-finite steps and stops mid-epoch)
is in :mod:`bnao.train.epoch`, its checkpoint in :mod:`bnao.train.trainer_state`.
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import numpy as np
import torch

from ..device import resolve_device
from ..data_parallel import GradientSync, ShardedLoader
from ..distributed import Context, any_rank, sum_across_ranks
from ..data.loaders.base import mix_seed
from ..nets.network import build_network
from ..space.nao import ArchLike, NAOSpace
from ..signals import Stopped, stop_requested
from ..size import check_image_size, image_hw
from .config import StandaloneConfig
from .epoch import _SALT_INIT, _SALT_LOADER, EpochTrainingMixin
from .evaluate import count_parameters, evaluate_model
from .trainer_state import StandaloneStateMixin


def _dataset_shape(dataset: Any) -> Tuple[int, int]:
    """``(num_classes, in_channels)`` of a bnao dataset."""
    shape = getattr(dataset, "image_shape", None)
    in_channels = int(shape[-1]) if shape is not None and not isinstance(shape, int) else 3
    return int(dataset.num_classes), in_channels


class StandaloneTrainer(EpochTrainingMixin, StandaloneStateMixin):
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
        data_info: What to record about the training data in the checkpoint (``dataset``, ``data_dir``);
            the image side is added from ``train_data``.

    Raises:
        bnao.space.InvalidArchError: The arch is not in ``space``.
        ValueError: An invalid setting.
    """

    def __init__(self, arch: ArchLike, space: NAOSpace, train_data: Any, eval_data: Any = None,
                 config: Optional[StandaloneConfig] = None, *, device: Union[str, torch.device, None] = "auto",
                 checkpoint_path: Optional[Union[str, os.PathLike]] = None, progress: bool = False,
                 on_epoch: Optional[Callable[[Dict[str, Any]], None]] = None, parallel: Optional[Context] = None,
                 data_info: Optional[Dict[str, Any]] = None):
        self.parallel = parallel if parallel is not None and parallel.enabled else None
        self.grad_sync = GradientSync(self.parallel) if self.parallel else None
        self.space = space
        self.arch = space.arch(arch)
        self.config = dataclasses.replace(config) if config is not None else StandaloneConfig()
        cfg = self.config
        num_classes, in_channels = _dataset_shape(train_data)
        if cfg.num_classes is None:
            cfg.num_classes = num_classes
        elif cfg.num_classes < num_classes:  # a label past the classifier's outputs fails deep inside the loss
            raise ValueError(f"num_classes={cfg.num_classes} but the training data has {num_classes} classes; "
                             f"leave num_classes unset to take the data's, or set it to at least {num_classes}")
        if cfg.in_channels is None:
            cfg.in_channels = in_channels
        cfg.validate()
        # Refused here, else the first forward fails deep inside a convolution (None: the data does not say).
        hw = image_hw(train_data)
        if hw is not None:
            check_image_size(cfg.skeleton, *hw)
        self.train_data, self.eval_data = train_data, eval_data
        self.device = resolve_device(device)
        self.checkpoint_path = Path(checkpoint_path) if checkpoint_path is not None else None
        self.progress, self.on_epoch = progress, on_epoch
        # What the training data was, kept in the checkpoint like model.pt keeps it, so that exporting a
        # checkpoint traces at the data's image size (28 for Fashion-MNIST) instead of the skeleton's.
        # Square images only: the export traces at image_size x image_size.
        self.data_info = {"image_size": hw[0] if hw is not None and hw[0] == hw[1] else None, **(data_info or {})}

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

    def config_dict(self) -> Dict[str, Any]:
        """The resolved configuration plus arch and space (stored in checkpoints and model files)."""
        return {"arch": str(self.arch), "space": self.space.config(), **dataclasses.asdict(self.config)}

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


# Names that lived here before the splits (config.py, api.py, epoch.py, trainer_state.py): still importable
# from this module.
_MOVED = {"LR_SCHEDULES": "config", "make_config": "config", "train_standalone": "api", "rerank": "api",
          "NonFiniteLossError": "epoch", "_SALT_EPOCH": "epoch", "CHECKPOINT_FORMAT": "trainer_state",
          "CHECKPOINT_VERSION": "trainer_state", "_RESUME_FREE": "trainer_state"}


def __getattr__(name: str):
    if name in _MOVED:
        import importlib

        return getattr(importlib.import_module(f".{_MOVED[name]}", __package__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
