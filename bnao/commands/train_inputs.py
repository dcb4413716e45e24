"""What ``bnao train`` resolves before it trains: its settings, the arch, the run directory, the data, the config.

Split out of :mod:`bnao.commands.train` to keep that module short; it re-exports the public names.
Everything here runs before the process group is joined, and bad input raises :class:`UsageError`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

#: Settings without a preset: a short CIFAR-10 training at the search network's size (N=3, C=20, 10 epochs, the
#: re-ranking's epoch count and learning-rate peak) with batch 128, cosine lr 0.025 -> 0, aux 0.4, drop-path
#: keep 0.9 and no dropout. Not the search's re-ranking itself: its ``final.*`` settings (bnao/search/config.py)
#: are batch 64, lr 0.025 -> 0.001, drop-path keep 0.8 and dropout 0.4; pass those flags to reproduce it.
DEFAULTS: Dict[str, Any] = {
    "dataset": "cifar10",
    "space": "small",
    "nodes": 5,
    "layers": 3,
    "channels": 20,
    "epochs": 10,
    "batch_size": 128,
    "lr": 0.025,
    "lr_min": 0.0,
    "lr_schedule": "epoch",
    "weight_decay": 3e-4,
    "grad_clip": 5.0,
    "cutout": 0,
    "augment": True,
    "auxiliary_weight": 0.4,
    "drop_path_keep_prob": 0.9,
    "dropout": 0.0,
    "label_smoothing": 0.0,
    "seed": 0,
}

#: Named settings; explicit flags override them.
PRESETS: Dict[str, Dict[str, Any]] = {
    # NAO_V2/train_cifar.py defaults + train_NAONet_V2_36_cifar10.sh (--use_aux_head --cutout_size=16).
    "cifar10-final": {
        "dataset": "cifar10", "layers": 6, "channels": 36, "epochs": 600, "batch_size": 128, "lr": 0.025,
        "lr_min": 0.0, "weight_decay": 3e-4, "grad_clip": 5.0, "cutout": 16, "auxiliary_weight": 0.4,
        "drop_path_keep_prob": 0.8, "dropout": 0.4,
    },
}


# Files that mark a directory as holding a `bnao train` run.
RUN_FILES = ("config.json", "checkpoint.pt", "model.pt", "metrics.json")


class UsageError(Exception):
    """Bad input: reported as ``error: ...`` with exit code 2."""


def read_arch_argument(text: str) -> Any:
    """The arch value of the ARCH argument: the text itself, or what ``@FILE`` holds.

    Raises:
        UsageError: ``@FILE`` is missing, empty or holds JSON without an arch.
    """
    if not text.startswith("@"):
        return text
    path = Path(text[1:])
    try:
        content = path.read_text().strip()
    except OSError as err:
        raise UsageError(f"cannot read the arch file {path}: {err.strerror or err}") from None
    if not content:
        raise UsageError(f"the arch file {path} is empty")
    if content.startswith("{"):
        try:
            obj = json.loads(content)
        except json.JSONDecodeError as err:
            raise UsageError(f"{path} is not valid JSON: {err}") from None
        if isinstance(obj, dict) and "arch" in obj:
            return obj["arch"]
        if isinstance(obj, dict) and "best_arch" in obj:
            return obj["best_arch"]
        return obj
    # A file may hold several lines (a pool): the first non-comment line is the arch.
    lines = [ln for ln in content.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    return lines[0]


def check_run_dir(out: Path, resume: bool) -> None:
    """Refuses a directory that holds another run unless resuming, and a resume with nothing to resume.

    Raises:
        UsageError: The directory cannot be used.
    """
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} exists and is not a directory")
    present = [f for f in RUN_FILES if (out / f).exists()]
    if present and not resume:
        raise UsageError(f"{out} holds another run ({', '.join(present)}); pass --resume to continue it, "
                         "or choose a new --out directory")
    if resume and not (out / "config.json").exists():
        raise UsageError(f"nothing to resume in {out} (no config.json); drop --resume to start a new run there")


def load_datasets(settings: Dict[str, Any]):
    """Train and test splits for ``settings`` (with the limits applied)."""
    import numpy as np

    from ..data import DATASETS, create_dataset

    name, root = settings["dataset"], settings.get("data_dir")
    if name not in DATASETS:
        raise UsageError(DATASETS.unknown_name_message(name))
    train_limit = check_limit("--train-limit", settings.get("train_limit"))
    test_limit = check_limit("--test-limit", settings.get("test_limit"))
    kw: Dict[str, Any] = {}
    if name == "synthetic":
        # Generate only what is used: 50k CIFAR-shaped images are wasted on a quick run.
        kw = {"num_samples": 50000 if train_limit is None else train_limit}
    train = create_dataset(name, root=root, split="train", **kw)
    if name == "synthetic":
        kw = {"num_samples": 10000 if test_limit is None else test_limit}
    test = create_dataset(name, root=root, split="test", **kw)
    if train_limit is not None and len(train) > train_limit:
        train = train.subset(np.arange(train_limit))
    if test_limit is not None and len(test) > test_limit:
        test = test.subset(np.arange(test_limit))
    return train, test


def check_limit(option: str, value: Optional[int]) -> Optional[int]:
    """``value`` of an image-count option (``--train-limit N``), refused below 1.

    None means "no limit": 0 used to mean that too (a truthiness test), which turned a typo into a
    run on the whole data set.

    Raises:
        UsageError: ``value`` is below 1.
    """
    if value is not None and value < 1:
        raise UsageError(f"{option} must be >= 1, got {value}; leave {option} out to use every image")
    return value


def read_stored_config(out: Path) -> Dict[str, Any]:
    """The ``config.json`` of the run in ``out`` (for ``--resume``).

    Raises:
        UsageError: The file cannot be read or is not a JSON object.
    """
    path = out / "config.json"
    try:
        stored = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UsageError(f"cannot resume: {path} is unreadable or damaged ({err}); the run's settings are lost, "
                         "so start a new run: drop --resume and choose a new --out") from None
    if not isinstance(stored, dict) or "arch" not in stored:
        raise UsageError(f"cannot resume: {path} is not the config.json of a `bnao train` run (no \"arch\" "
                         "setting); drop --resume and choose a new --out") from None
    return stored


# argparse dest -> settings key, for every setting a preset may hold.
_SETTING_ARGS = ("dataset", "space", "nodes", "layers", "channels", "epochs", "batch_size", "lr", "lr_min",
                 "lr_schedule", "augment", "weight_decay", "grad_clip", "cutout", "auxiliary_weight",
                 "drop_path_keep_prob", "dropout", "label_smoothing", "seed")


def _explicit(args: argparse.Namespace) -> Dict[str, Any]:
    return {k: getattr(args, k) for k in _SETTING_ARGS if getattr(args, k) is not None}


def resolve_settings(args: argparse.Namespace, stored: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Defaults < preset < stored run (on --resume) < explicit flags."""
    settings = dict(DEFAULTS)
    preset = args.preset or (stored or {}).get("preset")
    if preset:
        settings.update(PRESETS[preset])
    if stored:
        settings.update({k: stored[k] for k in DEFAULTS if k in stored})
    settings.update(_explicit(args))
    settings["preset"] = preset
    for key in ("bf16", "channels_last"):
        settings[key] = bool(getattr(args, key) or (stored or {}).get(key, False))
    for key in ("train_limit", "test_limit", "data_dir", "loader"):
        value = getattr(args, key)
        settings[key] = value if value is not None else (stored or {}).get(key)
    return settings


def resolve_arch(arch_text: Optional[str], settings: Dict[str, Any], stored: Optional[Dict[str, Any]],
                  out: Path) -> Tuple[Any, Any]:
    """The search space of ``settings`` and the arch to train: ARCH, or the resumed run's arch.

    Args:
        arch_text: The ARCH argument (None when not given).
        settings: The resolved settings (``nodes`` and ``space`` are used).
        stored: The resumed run's ``config.json`` (None for a new run).
        out: The run directory (for the messages).

    Returns:
        ``(space, arch)``.

    Raises:
        UsageError: Bad space settings, no arch, an invalid arch, or an arch other than the resumed run's.
    """
    from ..space import InvalidArchError, NAOSpace

    try:
        space = NAOSpace(num_nodes=int(settings["nodes"]), op_set=settings["space"])
    except ValueError as err:
        raise UsageError(str(err)) from None
    if arch_text is None and stored is None:
        raise UsageError("give the arch to train (ARCH), or --resume an existing run")
    try:
        arch = space.arch(read_arch_argument(arch_text)) if arch_text is not None else space.arch(stored["arch"])
    except InvalidArchError as err:
        raise UsageError(f"invalid arch: {err}") from None
    if stored is not None and str(arch) != stored["arch"]:
        raise UsageError(f"{out} holds a run of arch {stored['arch']!r}, not {str(arch)!r}; "
                         "drop ARCH to resume it, or choose a new --out")
    return space, arch


def load_training_data(settings: Dict[str, Any]):
    """:func:`load_datasets`, with a missing data set reported as bad input.

    Raises:
        UsageError: The data set is unknown or not found.
    """
    from ..data import DatasetNotFoundError

    try:
        return load_datasets(settings)
    except DatasetNotFoundError as err:
        raise UsageError(str(err)) from None


def training_config(settings: Dict[str, Any], eval_every: int):
    """The trainer's config from the resolved settings, validated.

    Raises:
        UsageError: A setting the config rejects.
    """
    from ..train import make_config

    aux_weight = float(settings["auxiliary_weight"])
    keep = settings["drop_path_keep_prob"]
    grad_clip = float(settings["grad_clip"])
    try:
        config = make_config(
            skeleton="imagenet" if settings["dataset"] == "imagenet" else "cifar",
            layers=int(settings["layers"]), channels=int(settings["channels"]), epochs=int(settings["epochs"]),
            batch_size=int(settings["batch_size"]), lr_max=float(settings["lr"]), lr_min=float(settings["lr_min"]),
            lr_schedule=str(settings.get("lr_schedule", "epoch")), augment=bool(settings.get("augment", True)),
            weight_decay=float(settings["weight_decay"]), grad_clip=None if grad_clip == 0 else grad_clip,
            auxiliary=aux_weight > 0, auxiliary_weight=aux_weight,
            # Keep 1 is "off"; anything else, above 1 too, goes to the config's range check.
            drop_path_keep_prob=None if keep is None or float(keep) == 1.0 else float(keep),
            dropout=float(settings["dropout"]), cutout=int(settings["cutout"]),
            label_smoothing=float(settings["label_smoothing"]), bf16=settings["bf16"],
            channels_last=settings["channels_last"], loader=settings.get("loader") or "auto",
            eval_every=int(eval_every), seed=int(settings["seed"]))
        config.validate()
    except (TypeError, ValueError) as err:
        raise UsageError(_as_option(str(err))) from None
    return config


# StandaloneConfig field -> the `bnao train` option that sets it, where the two names differ.
_FIELD_OPTIONS = {"lr_max": "--lr", "auxiliary": "--auxiliary-weight"}


def _as_option(message: str) -> str:
    """A config error whose first word is a field name (``grad_clip must be ...``), named by its option."""
    from ..train.config import _CONFIG_FIELDS

    field, sep, rest = message.partition(" ")
    if sep and field in _CONFIG_FIELDS:
        return f"{_FIELD_OPTIONS.get(field, '--' + field.replace('_', '-'))} {rest}"
    return message
