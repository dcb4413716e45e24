"""Settings of a stand-alone training run (:class:`StandaloneConfig`) and their checks."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional

__all__ = ["LR_SCHEDULES", "StandaloneConfig", "check_loader", "make_config"]

#: ``StandaloneConfig.lr_schedule`` values: cosine set once per epoch (the reference's) or before every step.
LR_SCHEDULES = ("epoch", "step")


@dataclasses.dataclass
class StandaloneConfig:
    """Hyper-parameters of one stand-alone training run.

    Defaults are the NAO reference's CIFAR-10 final training except the
    network size, epochs and regularisers, which callers set (see
    ``bnao train --preset cifar10-final``).

    Attributes:
        skeleton: ``"cifar"`` or ``"imagenet"``.
        layers: ``N``, normal cells between reductions.
        channels: ``C`` of the first cells.
        num_classes: Classifier outputs (default: the training set's).
        in_channels: Image channels (default: the training set's).
        epochs: Training epochs.
        batch_size: Training batch size.
        eval_batch_size: Evaluation batch size.
        lr_max: Learning rate of the first epoch.
        lr_min: Learning rate the cosine decays towards.
        lr_schedule: ``"epoch"``: the cosine is set once per epoch, constant within it (the reference's);
            ``"step"``: it is set before every step, ``lr_min`` reached at the end of the last step (a
            finer anneal that short trainings gain from).
        momentum: SGD momentum.
        weight_decay: L2 weight decay.
        grad_clip: Gradient-norm clip (0 or None: off).
        auxiliary: Adds the auxiliary head after the second reduction cell.
        auxiliary_weight: Weight of the auxiliary loss.
        drop_path_keep_prob: Base drop-path keep probability (None: off).
        dropout: Dropout before the classifier (the reference's ``1 - keep_prob``).
        cutout: Cutout square side (0: off).
        augment: Random crop (pad 4) and flip for array datasets (False: neither; cutout stays).
        label_smoothing: Label smoothing of the training loss.
        bf16: Autocast forward passes to bfloat16.
        channels_last: Channels-last memory format for model and batches.
        loader: Loader name for ``bnao.data.create_loader`` (``"auto"``).
        eval_every: Evaluate every this many epochs (0: only after the last; the last is always evaluated).
        max_nonfinite_steps: Consecutive NaN/inf steps skipped before training stops with an error.
        seed: Seed of initialisation, data order, augmentation and drop-path.
    """

    skeleton: str = "cifar"
    layers: int = 3
    channels: int = 20
    num_classes: Optional[int] = None
    in_channels: Optional[int] = None
    epochs: int = 10
    batch_size: int = 128
    eval_batch_size: int = 500
    lr_max: float = 0.025
    lr_min: float = 0.0
    lr_schedule: str = "epoch"
    momentum: float = 0.9
    weight_decay: float = 3e-4
    grad_clip: Optional[float] = 5.0
    auxiliary: bool = False
    auxiliary_weight: float = 0.4
    drop_path_keep_prob: Optional[float] = None
    dropout: float = 0.0
    cutout: int = 0
    augment: bool = True
    label_smoothing: float = 0.0
    bf16: bool = False
    channels_last: bool = False
    loader: str = "auto"
    eval_every: int = 1
    max_nonfinite_steps: int = 3
    seed: int = 0

    def validate(self) -> None:
        """Raises ValueError for settings that cannot train."""
        for name in ("layers", "channels", "epochs", "batch_size", "eval_batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.lr_max <= 0 or self.lr_min < 0 or self.lr_min > self.lr_max:
            raise ValueError(f"need 0 <= lr_min <= lr_max and lr_max > 0, got lr_max={self.lr_max}, lr_min={self.lr_min}")
        if self.drop_path_keep_prob is not None and not 0.0 < self.drop_path_keep_prob <= 1.0:
            raise ValueError(f"drop_path_keep_prob must be in (0, 1], got {self.drop_path_keep_prob}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}")
        if self.cutout < 0:
            raise ValueError(f"cutout must be >= 0, got {self.cutout}")
        if self.max_nonfinite_steps < 1:
            raise ValueError("max_nonfinite_steps must be >= 1")
        self._validate_regularisers()
        if self.eval_every < 0:
            raise ValueError(f"eval_every must be >= 0 (0: evaluate only after the last epoch), got {self.eval_every}")
        check_loader(self.loader)

    def _validate_regularisers(self) -> None:
        """Raises ValueError for a gradient clip, auxiliary weight or label smoothing out of range."""
        # clip_grad_norm_ with a negative max norm flips the gradients' sign: training would ascend the loss.
        if self.grad_clip is not None and not self.grad_clip >= 0:
            raise ValueError(f"grad_clip must be >= 0 (0 turns clipping off), got {self.grad_clip}")
        # A negative weight would reward the auxiliary head for a larger loss.
        if self.auxiliary_weight < 0:
            raise ValueError(f"auxiliary_weight must be >= 0 (0: no auxiliary head), got {self.auxiliary_weight}")
        # 1 would make every target uniform (nothing left to learn); the search's check says the same.
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1) (0: off), got {self.label_smoothing}")

    def lr_at(self, epoch: int) -> float:
        """Cosine learning rate of epoch ``epoch`` (0-based), constant within the epoch as in the reference."""
        return self.lr_min + 0.5 * (self.lr_max - self.lr_min) * (1.0 + math.cos(math.pi * epoch / self.epochs))

    def lr_at_step(self, step: int, total_steps: int) -> float:
        """Learning rate of global step ``step`` (0-based) of ``total_steps``.

        ``lr_schedule="epoch"``: :meth:`lr_at` of the step's epoch. ``"step"``: the cosine of
        ``step / (total_steps - 1)``, so the first step runs at ``lr_max`` and the last at ``lr_min``.
        """
        if self.lr_schedule == "epoch":
            return self.lr_at(step * self.epochs // max(total_steps, 1))
        t = step / max(total_steps - 1, 1)
        return self.lr_min + 0.5 * (self.lr_max - self.lr_min) * (1.0 + math.cos(math.pi * t))


def check_loader(name: str) -> None:
    """Raises ValueError naming the available loaders when ``name`` is not a registered data loader."""
    from ..data import LOADERS  # lazily: the data package pulls in optional loaders

    if name not in LOADERS:
        # Worded after the setting, not the registry ("unknown loader"): `bnao eval` turns it into "--loader ...".
        raise ValueError(f"loader must be one of {', '.join(LOADERS.names())}, got {name!r}{LOADERS.suggest(name)}")


_CONFIG_FIELDS = {f.name for f in dataclasses.fields(StandaloneConfig)}


def make_config(**kwargs: Any) -> StandaloneConfig:
    """A :class:`StandaloneConfig` from keyword arguments, refusing unknown names with the closest valid one."""
    from ..registry import did_you_mean

    unknown = [k for k in kwargs if k not in _CONFIG_FIELDS]
    if unknown:
        k = unknown[0]
        raise TypeError(f"unknown stand-alone training setting {k!r}{did_you_mean(k, sorted(_CONFIG_FIELDS))}")
    return StandaloneConfig(**kwargs)
