"""What a resumed search may change, and what to say when a run runs out of memory.

A run resumed with ``bnao search --resume RUN_DIR key=value`` keeps its config
except for :data:`RESUMABLE_KEYS`: keys that change how the work is computed
(batch sizes, precision, memory layout, threads, device), not what is searched
(space, pool, sampler, schedules, seeds). Such a change is recorded in the run
directory (``changes.jsonl``) and ends the guarantee that the run replays an
uninterrupted one exactly. :data:`LOCATION_KEYS` (where the data lives) may
change too, without ending it; every other change is refused, naming the keys.
"""

from __future__ import annotations

import copy
from typing import Any, Dict, Tuple

from .config import ConfigError, flatten

#: Keys a resumed run may change, with why each does not change what is searched.
RESUMABLE_KEYS: Dict[str, str] = {
    "supernet.batch_size": "images per supernet step",
    "supernet.eval_batch_size": "images per evaluation batch",
    "controller.batch_size": "archs per controller step",
    "final.batch_size": "images per re-rank step",
    "supernet.bf16": "bf16 autocast",
    "supernet.channels_last": "memory layout",
    "threads": "CPU threads",
    "device": "device",
    # Per-rank BatchNorm batches change with the process count, so exact replay ends (see bnao.distributed);
    # the data order, sampler, schedules and loader positions are global and carry over to any count.
    "distributed.world_size": "processes (torchrun)",
    "distributed.backend": "collective backend",
    "distributed.hosts": "machines",
    "distributed.timeout_s": "collective timeout",
    "distributed.check_arch": "arch check across ranks",
}

#: Keys that say only where the inputs live, not what they are: they may change on resume (the data moved,
#: or the first try named the wrong folder) and, the data being the same, the run still replays exactly.
LOCATION_KEYS: Dict[str, str] = {
    "data.root": "data directory",
}

#: Keys a checkpoint's config may differ in from the run's: the resumable and location keys, plus the steps
#: per epoch that :func:`keep_schedule` pins when a batch size change would otherwise change it.
RESTORE_MAY_DIFFER = frozenset(RESUMABLE_KEYS) | frozenset(LOCATION_KEYS) | {"supernet.steps_per_epoch"}

#: Per phase of a run, the key whose halving is the first thing to try after running out of memory.
_OOM_KEY_BY_PHASE = {
    "train": "supernet.batch_size",
    "eval": "supernet.eval_batch_size",
    "controller": "controller.batch_size",
    "generate": "controller.batch_size",
    "rerank": "final.batch_size",
    "final": "final.batch_size",
}


class ResumeChangeError(ConfigError):
    """A resumed run was asked to change a key that changes what is searched."""


def split_changes(old: Dict[str, Any], new: Dict[str, Any]) -> Dict[str, Tuple[Any, Any]]:
    """The resumable changes from ``old`` to ``new``; refuses any other change.

    Args:
        old: The run's config (``config.yaml``).
        new: The config asked for on resume.

    Returns:
        ``{key: (old value, new value)}`` of the changed resumable and location keys.

    Raises:
        ResumeChangeError: A key outside :data:`RESUMABLE_KEYS` and :data:`LOCATION_KEYS` differs (all such
            keys are named).
    """
    flat_old, flat_new = flatten(old), flatten(new)
    changed = [k for k in sorted(set(flat_old) | set(flat_new)) if flat_old.get(k) != flat_new.get(k)]
    refused = [k for k in changed if k not in RESUMABLE_KEYS and k not in LOCATION_KEYS]
    if refused:
        lines = [f"{k}: {flat_old.get(k)!r} -> {flat_new.get(k)!r}" for k in refused]
        raise ResumeChangeError(
            "a resumed run keeps what it searches; these keys cannot change on --resume:\n  " + "\n  ".join(lines)
            + "\nstart a new run (--out) to change them; on --resume only "
            + ", ".join([*RESUMABLE_KEYS, *LOCATION_KEYS]) + " may change"
        )
    return {k: (flat_old.get(k), flat_new.get(k)) for k in changed}


def replay_changes(changes: Dict[str, Tuple[Any, Any]]) -> Dict[str, Tuple[Any, Any]]:
    """The changes that end exact replay: all but those of :data:`LOCATION_KEYS`."""
    return {k: v for k, v in changes.items() if k not in LOCATION_KEYS}


def keep_schedule(config: Dict[str, Any], ckpt: Dict[str, Any],
                  changes: Dict[str, Tuple[Any, Any]]) -> Dict[str, Any]:
    """Pins the supernet's steps per epoch when its batch size changes on resume.

    With ``supernet.steps_per_epoch`` unset, an epoch is ``images // batch_size``
    steps, so a new batch size would change the number of steps per iteration and
    with it the lr schedule and the drop-path ramp of the iteration in progress.
    Pinning the checkpoint's value keeps every schedule in steps; only the images
    per step change. The pinned key is added to ``changes`` (and so recorded).

    Args:
        config: The resumed run's config (not modified).
        ckpt: The checkpoint being resumed.
        changes: The resumable changes (updated in place).

    Returns:
        The config to run with.
    """
    if "supernet.batch_size" not in changes or config["supernet"]["steps_per_epoch"]:
        return config
    steps_per_iteration = int(ckpt["trainer"]["schedule"]["steps"])
    steps_per_epoch = max(1, steps_per_iteration // int(config["supernet"]["epochs"]))
    pinned = copy.deepcopy(config)
    pinned["supernet"]["steps_per_epoch"] = steps_per_epoch
    changes["supernet.steps_per_epoch"] = (None, steps_per_epoch)
    return pinned


def rescale_loader_state(state: Any, batch_size: int) -> Any:
    """A loader state saved at another batch size, moved to the same image of the epoch at ``batch_size``.

    Args:
        state: A loader's ``state_dict()`` (returned as it is when its batch size is ``batch_size``).
        batch_size: The batch size of the loader it is loaded into.
    """
    if not isinstance(state, dict) or state.get("batch_size") in (None, batch_size):
        return state
    rescaled = dict(state)
    rescaled["position"] = int(state["position"]) * int(state["batch_size"]) // int(batch_size)
    rescaled["batch_size"] = int(batch_size)
    return rescaled


def describe_changes(changes: Dict[str, Tuple[Any, Any]]) -> str:
    """One line naming each change, e.g. ``supernet.batch_size 256 -> 128``."""
    return ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changes.items())


def out_of_memory(err: BaseException) -> bool:
    """Whether ``err`` is a CUDA or host out-of-memory error."""
    if isinstance(err, MemoryError):
        return True
    oom_type = getattr(__import__("torch"), "OutOfMemoryError", None)
    if oom_type is not None and isinstance(err, oom_type):
        return True
    text = str(err).lower()
    return isinstance(err, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def oom_advice(err: BaseException, run_dir: str, config: Dict[str, Any], phase: str) -> str:
    """The message of a run stopped by an out-of-memory error: what ran out, where, how to continue."""
    flat = flatten(config)
    key = _OOM_KEY_BY_PHASE.get(phase, "supernet.batch_size")
    current = flat.get(key)
    smaller = max(1, int(current) // 2) if isinstance(current, int) else None
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    kind = "host" if isinstance(err, MemoryError) or "cuda" not in first.lower() else "CUDA"
    suggestion = f"{key}={smaller}" if smaller else f"{key}=<smaller>"
    bf16 = "" if flat.get("supernet.bf16") else " or supernet.bf16=true"
    return (
        f"{kind} out of memory in phase {phase} ({first}). The run keeps its last checkpoint; continue it with "
        f"smaller batches: `bnao search --resume {run_dir} {suggestion}` (or another batch size{bf16}). "
        f"The change is recorded in {run_dir}/changes.jsonl, and the resumed run no longer replays an "
        "uninterrupted one exactly"
    )

