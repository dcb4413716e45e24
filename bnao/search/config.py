"""Search configuration: defaults, YAML presets, command-line overrides.

A configuration is a nested dict whose keys and value types are fixed by
:data:`DEFAULTS`: the settings of the paper's reference code (NAO_pytorch,
NAO_V2, ``train_search.py``) for CIFAR-10, SPEC sections 4-6. Where bnao
offers something the reference does not do, the key says so in its comment
and its default is the reference's behaviour. A
YAML file or a ``key=value`` override may only set keys that exist there; an
unknown key is refused with the closest valid key named, so a typo never
silently falls back to a default.

The machinery serves other commands too: a :class:`ConfigSchema` names the
defaults, the types of keys that default to None and the presets' folder, and
every function below takes ``schema=`` (default: the search's,
:data:`SEARCH_SCHEMA`). ``bnao rank`` uses its own (``bnao.rank.config``).
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import os
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Tuple

import yaml

# Keys whose default is None take these types when set.
_OPTIONAL_TYPES: Dict[str, Tuple[type, ...]] = {
    "data.root": (str,),
    "data.train_limit": (int,),
    "supernet.steps_per_epoch": (int,),
    "search.pool_file": (str,),
    "final.channels": (int,),
    "final.layers": (int,),
    "sampler.size_layers": (int,),
    "sampler.size_channels": (int,),
    # Size budgets of the final network (bnao.search.budget): numbers such as 3.5e6 or 600000000.
    "search.min_params": (float,),
    "search.max_params": (float,),
    "search.min_madds": (float,),
    "search.max_madds": (float,),
}

# Keys that take one of a few words.
_CHOICES: Dict[str, Tuple[str, ...]] = {
    "supernet.lr_schedule": ("epoch", "step"),
    "final.lr_schedule": ("epoch", "step"),
    "supernet.eval_data": ("random", "fixed"),
    "supernet.unused_slot_update": ("decay", "freeze"),
    "supernet.kernels": ("auto", "fused", "eager"),
    "supernet.graph": ("auto", "on", "off"),
    "controller.graph": ("auto", "on", "off"),
    "sampler.size_measure": ("params", "madds"),
}

DEFAULTS: Dict[str, Any] = {
    "seed": 0,
    "device": "auto",  # auto | cpu | cuda | cuda:N
    # CPU threads of torch (0: torch's default). CPU results depend on the thread
    # count, so a resumed run must use the same count to match exactly.
    "threads": 0,
    "data": {
        "dataset": "cifar10",
        "root": None,  # data dir; searched as documented by bnao.data
        "dev_fraction": 0.1,  # 45k / 5k on CIFAR-10
        "loader": "auto",
        "cutout": 0,
        "train_limit": None,  # use only the first N training images (quick runs)
        # Shape of `dataset: synthetic` (random images, for timing without real data).
        "synthetic_samples": 50000,
        "synthetic_size": 32,
        "synthetic_channels": 3,
        "synthetic_classes": 10,
    },
    "space": {"name": "nao", "op_set": "small", "num_nodes": 5},
    "supernet": {
        "skeleton": "cifar",  # cifar (32x32-style) | imagenet (two stride-2 stems)
        "layers": 3,
        "channels": 20,
        "batch_size": 64,
        "epochs": 50,  # per search iteration
        "steps_per_epoch": None,  # default: training images // batch size
        "lr_max": 0.025,
        "lr_min": 0.001,
        # Cosine lr per "epoch" (the reference: set at each epoch start, the first epoch already one
        # step into the cosine) or per "step" (smooth; bnao's option).
        "lr_schedule": "epoch",
        "momentum": 0.9,
        "weight_decay": 3e-4,
        "grad_clip": 5.0,
        "drop_path_keep_prob": 0.9,
        # The reference applies drop-path to every branch, identity included; false exempts identity.
        "drop_path_identity": True,
        "label_smoothing": 0.0,
        "bf16": False,
        "channels_last": False,
        # Cells on the "fused" kernels (the arch as device data, csrc/cell/DESIGN.md), the "eager"
        # PyTorch ones, or "auto": fused where they are built for the device.
        "kernels": "auto",
        # Each training step on the fused path as two replayed CUDA graphs ("auto": where the step allows it,
        # else the eager step; "on": an error where it does not; "off"): bnao/supernet/graph_step.py.
        "graph": "auto",
        "eval_batch_size": 500,
        "eval_batches": 1,
        # Data each arch is scored on: "random" (the reference: a fresh random dev batch per arch)
        # or "fixed" (the same first dev batches for every arch and iteration).
        "eval_data": "random",
        # Slots the step's arch does not use: "decay" (the reference under the PyTorch of its time:
        # every slot used at least once gets momentum and weight decay every step) or "freeze".
        "unused_slot_update": "decay",
        "checkpoint_every": 1000,  # training steps between mid-phase checkpoints
    },
    "sampler": {
        "name": "proportional",  # proportional | uniform
        "alpha": 1.0,
        "uniform_mix": 0.0,
        "size_measure": "params",  # params | madds
        # The network whose size drives sampling: the search network's N and C by default (the
        # reference's), independent of the final training's.
        "size_layers": None,
        "size_channels": None,
    },
    "controller": {
        "epochs": 1000,
        "batch_size": 100,
        "lr": 0.001,
        "trade_off": 0.8,
        "mlp_layers": 0,
        "mlp_hidden": 64,
        "embedding_size": 32,
        "hidden_size": 64,
        # Copies of the controller's training archs: the original plus expand-1 copies with the two
        # branches of one random node per cell swapped, drawn once per fit (the reference's
        # controller_expand=10); 1 = no augmentation.
        "expand": 10,
        # Draw the swapped copies afresh every epoch instead of once (bnao's option).
        "expand_redraw": False,
        # Each minibatch as one replayed CUDA graph ("auto": on CUDA without dropout; "on": an error where
        # capture is impossible; "off"): bnao/controller/steps.py. The same updates; Adam then keeps its step
        # counts on the GPU (capturable), which changes only float rounding.
        "graph": "auto",
    },
    "search": {
        "pool_size": 1000,
        "pool_file": None,
        "skip_invalid": False,
        "iterations": 3,
        "top_k": 100,  # seeds for generation
        "new_per_iteration": 300,
        # Not in the reference: top up an iteration with one-position mutations of the seeds when
        # the controller decodes fewer new archs than new_per_iteration.
        "fill_with_mutations": False,
        # Not in the reference: keep every arch inside a size budget, measured on the final network
        # (final.layers / final.channels) at the data's image size; None = unbounded.
        "max_params": None,
        "min_params": None,
        "max_madds": None,
        "min_madds": None,
    },
    # Several processes (torchrun --nproc_per_node=K -m bnao search ...; see bnao.distributed).
    "distributed": {
        # Seconds a rank waits in a collective (the others' step, rank 0's controller phase, the slowest
        # rank's share of the re-rank) before it stops with an error: a hung or lost rank.
        "timeout_s": 3600.0,
        # Debug: compare every step's arch across ranks and stop with an error when they differ.
        "check_arch": False,
        # Written by bnao search, not read: how the run was launched (processes, backend, machines).
        "world_size": 1,
        "backend": "none",
        "hosts": "",
    },
    # Stand-alone training after the search. The re-rank's defaults are the reference's
    # (train_and_evaluate_top_on_cifar10): the search network's N and C, 10 epochs, batch 64, cosine
    # 0.025 -> 0.001 per epoch, auxiliary head (0.4), drop-path 0.8, dropout 0.4. One difference: its
    # drop-path ramp spans the search iteration's step count, bnao's the re-rank's own length.
    "final": {
        "rerank_top": 5,
        "epochs": 10,
        "layers": None,  # default: the supernet's
        "channels": None,
        "batch_size": 64,
        "lr_max": 0.025,
        "lr_min": 0.001,
        # Not the reference's when changed: "step" sets the cosine before every step instead of once an epoch.
        "lr_schedule": "epoch",
        "weight_decay": 3e-4,
        "auxiliary": True,
        "auxiliary_weight": 0.4,
        "drop_path_keep_prob": 0.8,
        "dropout": 0.4,
        "cutout": 0,
        # Random crop (padding 4) and flip of the training images; false: neither (cutout stays).
        "augment": True,
        # Not in the reference's search script (it leaves this to train_cifar.py): train the re-rank's
        # winner on the whole training split for this many epochs and test it (0: skip).
        "full_epochs": 0,
    },
}


class ConfigError(ValueError):
    """A configuration file or override is invalid."""


@dataclasses.dataclass(frozen=True)
class ConfigSchema:
    """What one kind of configuration may hold.

    Attributes:
        defaults: Nested dict of every key with its default (its type is the key's type).
        optional_types: Types of the keys whose default is None.
        preset_subdir: Folder of the presets under ``configs/`` ("" = ``configs/`` itself).
    """

    defaults: Dict[str, Any]
    optional_types: Dict[str, Tuple[type, ...]]
    preset_subdir: str = ""

    def valid_keys(self) -> Dict[str, Any]:
        """Flat ``{"a.b": default}`` of every key."""
        return flatten(self.defaults)


def flatten(config: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``."""
    out: Dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


_VALID_KEYS = flatten(DEFAULTS)

#: The search's configuration (``bnao search``, ``configs/*.yaml``).
SEARCH_SCHEMA = ConfigSchema(DEFAULTS, _OPTIONAL_TYPES)


def _closest(key: str, schema: Optional[ConfigSchema] = None) -> str:
    valid = (schema or SEARCH_SCHEMA).valid_keys()
    match = difflib.get_close_matches(key, valid, n=1, cutoff=0.4)
    if not match:
        leaf = key.rsplit(".", 1)[-1]
        match = [k for k in valid if k.rsplit(".", 1)[-1] == leaf][:1]
    return f"; did you mean {match[0]!r}?" if match else ""


def _coerce(key: str, value: Any, schema: Optional[ConfigSchema] = None) -> Any:
    schema = schema or SEARCH_SCHEMA
    default = schema.valid_keys()[key]
    optional_types = schema.optional_types
    if value is None:
        if default is None or key in optional_types:
            return None
        raise ConfigError(f"config key {key!r} cannot be null")
    if default is None:
        types = optional_types.get(key, (str,))
    else:
        types = (type(default),)
    if float in types and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if float in types and isinstance(value, str):
        # YAML 1.1 reads 3.5e6 and 600e6 (no dot or no exponent sign) as strings; they mean numbers.
        number = _finite_float(value)
        if number is not None:
            return number
    if isinstance(value, bool) and key in _CHOICES and ("on" if value else "off") in _CHOICES[key]:
        # YAML 1.1 reads an unquoted on/off (also yes/no, true/false) as a boolean: graph=off means "off".
        return "on" if value else "off"
    if isinstance(value, bool) and bool not in types:
        raise ConfigError(f"config key {key!r} expects {types[0].__name__}, got a boolean {value!r}")
    if not isinstance(value, types):
        raise ConfigError(f"config key {key!r} expects {types[0].__name__}, got {type(value).__name__} {value!r}")
    if key in _CHOICES and value not in _CHOICES[key]:
        raise ConfigError(f"config key {key!r} must be one of {', '.join(_CHOICES[key])}; got {value!r}")
    return value


def _finite_float(text: str) -> Optional[float]:
    try:
        number = float(text.strip())
    except ValueError:
        return None
    return number if math.isfinite(number) else None


def _set(config: Dict[str, Any], key: str, value: Any, schema: Optional[ConfigSchema] = None) -> None:
    valid = (schema or SEARCH_SCHEMA).valid_keys()
    if key not in valid:
        if any(k.startswith(key + ".") for k in valid):
            raise ConfigError(f"config key {key!r} is a section; set one of its keys, e.g. {key}.<name>=...")
        raise ConfigError(f"unknown config key {key!r}{_closest(key, schema)}")
    node = config
    *parents, leaf = key.split(".")
    for part in parents:
        node = node[part]
    node[leaf] = _coerce(key, value, schema)


def merge(config: Dict[str, Any], updates: Dict[str, Any], source: str = "config",
          schema: Optional[ConfigSchema] = None) -> Dict[str, Any]:
    """Returns ``config`` updated by a nested dict of ``updates`` (validated)."""
    out = copy.deepcopy(config)
    if not isinstance(updates, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level, got {type(updates).__name__}")
    for key, value in flatten(updates).items():
        try:
            _set(out, key, value, schema)
        except ConfigError as err:
            raise ConfigError(f"{source}: {err}") from None
    return out


def parse_overrides(items: Iterable[str]) -> Dict[str, Any]:
    """``["a.b=3", "c=x"]`` -> flat dict with YAML-typed values."""
    out: Dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. supernet.epochs=5)")
        key, text = item.split("=", 1)
        try:
            out[key.strip()] = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError as err:
            raise ConfigError(f"override {item!r}: value is not valid YAML ({' '.join(str(err).split())})") from None
    return out


def apply_overrides(config: Dict[str, Any], overrides: Dict[str, Any],
                    schema: Optional[ConfigSchema] = None) -> Dict[str, Any]:
    """Applies flat ``key=value`` overrides (validated)."""
    out = copy.deepcopy(config)
    for key, value in overrides.items():
        try:
            _set(out, key, value, schema)
        except ConfigError as err:
            raise ConfigError(f"command line: {err}") from None
    return out


def preset_dirs(schema: Optional[ConfigSchema] = None) -> List[Path]:
    """Where presets are looked up: the installed package data, then the source tree."""
    here = Path(__file__).resolve().parent.parent
    sub = (schema or SEARCH_SCHEMA).preset_subdir
    return [here / "configs" / sub, here.parent / "configs" / sub]


def list_presets(schema: Optional[ConfigSchema] = None) -> List[str]:
    """Names of the available presets (``configs/*.yaml``, or the schema's folder)."""
    names = set()
    for folder in preset_dirs(schema):
        if folder.is_dir():
            names.update(p.stem for p in folder.glob("*.yaml"))
    return sorted(names)


def load_yaml(path: os.PathLike, schema: Optional[ConfigSchema] = None) -> Dict[str, Any]:
    """Reads a YAML config file with a clear error when it is missing or malformed."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist (presets: {', '.join(list_presets(schema))})")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({' '.join(str(err).split())})") from None
    return data


def resolve_preset(name_or_path: str, schema: Optional[ConfigSchema] = None) -> Path:
    """A preset name (``demo``) or a path to a YAML file."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        return path
    for folder in preset_dirs(schema):
        candidate = folder / f"{name_or_path}.yaml"
        if candidate.is_file():
            return candidate
    raise ConfigError(f"unknown preset {name_or_path!r}; available: {', '.join(list_presets(schema))}")


def load_config(preset: Optional[str] = None, overrides: Iterable[str] = (),
                schema: Optional[ConfigSchema] = None) -> Dict[str, Any]:
    """Defaults, then a preset or YAML file, then ``key=value`` overrides (all checked against ``schema``)."""
    config = copy.deepcopy((schema or SEARCH_SCHEMA).defaults)
    if preset:
        path = resolve_preset(preset, schema)
        config = merge(config, load_yaml(path, schema), source=str(path), schema=schema)
    return apply_overrides(config, parse_overrides(overrides), schema)


def diff(old: Dict[str, Any], new: Dict[str, Any]) -> List[str]:
    """Keys whose values differ, as ``key: old -> new`` lines."""
    a, b = flatten(old), flatten(new)
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
