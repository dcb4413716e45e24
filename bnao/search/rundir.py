"""The run directory of a search: config, checkpoint, pool, ranking, logs, plots.

Layout of ``RUN_DIR``::

    config.yaml       resolved configuration (every key)
    checkpoint.pt     last checkpoint (written atomically: temp file + fsync + rename)
    checkpoint.prev.pt  the checkpoint before it (resumed from when checkpoint.pt is damaged)
    changes.jsonl     config keys changed on --resume (batch sizes, device, ...), one record per resume
    progress.json     where the run stood at its last checkpoint (iteration, phase, step)
    pool.jsonl        one record per arch: string, hash, size, one-shot score per iteration, prediction
    ranking.jsonl     final ranking (re-ranked top archs first)
    best.json         best arch: string, model size, one-shot score, stand-alone accuracy
    history.jsonl     one summary record per iteration
    tb/               TensorBoard scalars
    plots/            PNG figures (score vs size, best per iteration, draws vs size)
    log.txt           the summary lines printed to the console
    rerank/           per-arch checkpoints of the final stand-alone re-ranking
"""

from __future__ import annotations

import shutil
import json
import os
from pathlib import Path
from typing import Any, Callable, Dict, Optional

import yaml

from ..safe_io import DamagedFileError, safe_load, save_atomic, write_error
from ..safe_io import atomic_write_bytes as _atomic_write_bytes


class RunDirError(RuntimeError):
    """The run directory cannot be used as asked (another run, missing checkpoint, ...)."""


class CheckpointsDamagedError(RunDirError):
    """Every checkpoint the run directory keeps is damaged: the run cannot continue."""


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Writes ``data`` to ``path`` so that a crash leaves either the old or the new file, never a torn one.

    Raises:
        FileWriteError: The write failed (disk full, permission); the previous file is intact.
    """
    _atomic_write_bytes(path, data)


def _position(state: Dict[str, Any]) -> str:
    """Where a run stood, e.g. ``iteration 1, phase train, step 40``."""
    where = f"iteration {state.get('iteration')}, phase {state.get('phase')}"
    if state.get("phase") == "train" and state.get("train_step") is not None:
        where += f", step {state.get('train_step')}"
    return where


class RunDir:
    """A search's output folder.

    Args:
        path: The folder.
    """

    def __init__(self, path: os.PathLike):
        self.path = Path(path)
        self.config_path = self.path / "config.yaml"
        self.checkpoint_path = self.path / "checkpoint.pt"
        self.previous_checkpoint_path = self.path / "checkpoint.prev.pt"
        self.changes_path = self.path / "changes.jsonl"
        self.pool_path = self.path / "pool.jsonl"
        self.ranking_path = self.path / "ranking.jsonl"
        self.best_path = self.path / "best.json"
        self.history_path = self.path / "history.jsonl"
        self.pareto_path = self.path / "pareto.jsonl"
        self.log_path = self.path / "log.txt"
        self.progress_path = self.path / "progress.json"
        self.plots = self.path / "plots"
        self.tb = self.path / "tb"
        # False on the ranks other than 0 of a run on several processes: rank 0 alone writes run files.
        self.writes = True

    # ------------------------------------------------------------- lifecycle
    def holds_run(self) -> bool:
        """True when the folder already holds a search (config or checkpoint)."""
        return self.config_path.exists() or self.checkpoint_path.exists() or self.previous_checkpoint_path.exists()

    def create(self, config: Dict[str, Any], overwrite: bool = False) -> None:
        """Prepares a fresh run; refuses a folder that holds another run unless ``overwrite``."""
        if self.holds_run() and not overwrite:
            raise RunDirError(
                f"{self.path} already holds a search run; continue it with `bnao search --resume {self.path}`, "
                "choose another --out, or pass --overwrite to replace it"
            )
        self.path.mkdir(parents=True, exist_ok=True)
        for name in ("checkpoint.pt", "checkpoint.prev.pt", "changes.jsonl", "progress.json", "pool.jsonl", "ranking.jsonl", "best.json", "history.jsonl", "log.txt",
                     "pareto.jsonl"):
            (self.path / name).unlink(missing_ok=True)
        shutil.rmtree(self.path / "rerank", ignore_errors=True)
        if self.tb.exists():
            for f in self.tb.glob("events.*"):
                f.unlink()
        atomic_write_bytes(self.config_path, yaml.safe_dump(config, sort_keys=False).encode())

    def read_config(self) -> Dict[str, Any]:
        """The run's resolved configuration, checked to be a whole search config.

        Raises:
            RunDirError: The folder holds no run, or its config.yaml is unreadable, not YAML, not a mapping,
                misses keys or holds values of the wrong type (the file and the way out are named).
        """
        if not self.config_path.exists():
            raise RunDirError(f"{self.path} holds no search run (no config.yaml); start one with --out {self.path}")
        try:
            data = yaml.safe_load(self.config_path.read_text())
        except (OSError, UnicodeDecodeError) as err:
            raise self._damaged_config(f"cannot be read ({err})") from None
        except yaml.YAMLError as err:
            raise self._damaged_config(f"is not valid YAML ({' '.join(str(err).split())})") from None
        if not isinstance(data, dict):
            raise self._damaged_config(f"is not a mapping of config keys (found {type(data).__name__})")
        return self._complete_config(data)

    def _complete_config(self, data: Dict[str, Any]) -> Dict[str, Any]:
        """``data`` checked against the search's keys and types; the ``distributed`` section may be missing
        (runs from before it ran as one process, which its defaults describe)."""
        from .config import DEFAULTS, ConfigError, flatten, merge

        present = flatten(data)
        missing = [k for k in flatten(DEFAULTS) if k not in present and not k.startswith("distributed.")]
        if missing:
            shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
            raise self._damaged_config(f"misses config keys ({shown})")
        try:
            return merge(DEFAULTS, data, source=str(self.config_path))
        except ConfigError as err:
            raise self._damaged_config(f"holds a bad value ({err})") from None

    def _damaged_config(self, problem: str) -> RunDirError:
        """The error for a damaged config.yaml: what is wrong and the two ways out."""
        return RunDirError(
            f"{self.config_path} {problem}; the run cannot be resumed from it: restore the file (it is written "
            f"when the run starts), or start a new run with `bnao search --out NEW_DIR ...` "
            f"(or --out {self.path} --overwrite to replace this one)")

    def discard_unstarted(self) -> bool:
        """Removes what :meth:`create` wrote when the run failed before its first checkpoint.

        A start-up failure (data not found, an arch file refused) then leaves no run behind, so the corrected
        command works with the same ``--out``. A run with a checkpoint is kept: it has work to resume.

        Returns:
            True when the run's files were removed.
        """
        if not self.writes or self.checkpoint_path.exists() or self.previous_checkpoint_path.exists():
            return False
        for path in (self.config_path, self.log_path, self.progress_path, self.changes_path):
            path.unlink(missing_ok=True)
        for folder in (self.tb, self.path):
            try:
                folder.rmdir()  # only when empty: files the user put there stay
            except OSError:
                pass
        return True

    def write_config(self, config: Dict[str, Any]) -> None:
        """Replaces config.yaml (a resume that changed only where the data lives, see ``search.resume``)."""
        if not self.writes:
            return
        _atomic_write_bytes(self.config_path, yaml.safe_dump(config, sort_keys=False).encode())

    # ------------------------------------------------------------ checkpoint
    def save_checkpoint(self, state: Dict[str, Any]) -> None:
        """Writes ``state`` atomically; the checkpoint it replaces is kept as ``checkpoint.prev.pt``.

        Raises:
            FileWriteError: The write failed; both kept checkpoints are intact.
        """
        if not self.writes:
            return
        save_atomic(state, self.checkpoint_path, previous=self.previous_checkpoint_path)

    def _read_checkpoint(self, path: Path) -> Dict[str, Any]:
        """One checkpoint file, or DamagedFileError (UnsafeFileError propagates: a planted file is never skipped)."""
        data = safe_load(path)
        if not isinstance(data, dict) or not isinstance(data.get("state"), dict) or "config" not in data:
            raise DamagedFileError(f"{path}: not a search checkpoint (found {type(data).__name__})")
        return data

    def load_checkpoint(self, warn: Optional[Callable[[str], None]] = None) -> Optional[Dict[str, Any]]:
        """The last good checkpoint, or None when the run stopped before its first one.

        When ``checkpoint.pt`` is damaged (or missing after a crash between the two
        renames of a save), the previous checkpoint is used and ``warn`` is told which
        work is redone.

        Raises:
            UnsafeFileError: A checkpoint needs arbitrary unpickling; it is refused unread.
            CheckpointsDamagedError: Every kept checkpoint is damaged.
        """
        latest, previous = self.checkpoint_path, self.previous_checkpoint_path
        if not latest.exists() and not previous.exists():
            return None
        try:
            return self._read_checkpoint(latest)
        except DamagedFileError as err:
            latest_problem = str(err)
        if not previous.exists():
            raise CheckpointsDamagedError(
                f"{latest_problem}; the run keeps no earlier checkpoint ({previous.name} is missing), so it cannot "
                f"continue: start it again with `bnao search --out {self.path} --overwrite ...`"
            )
        try:
            ckpt = self._read_checkpoint(previous)
        except DamagedFileError as err:
            raise CheckpointsDamagedError(
                f"both checkpoints of {self.path} are damaged: {latest_problem}; {err}. The run cannot continue: "
                f"start it again with `bnao search --out {self.path} --overwrite ...`"
            ) from None
        if warn is not None:
            warn(f"{latest_problem}; resuming from the previous checkpoint {previous.name} "
                 f"({_position(ckpt['state'])}): the work after it, up to {self._last_position()}, is redone")
        return ckpt

    def _last_position(self) -> str:
        """Where the run stood at its last checkpoint, from progress.json (written after each one)."""
        try:
            return _position(json.loads(self.progress_path.read_text()))
        except (OSError, ValueError, AttributeError):
            return "the damaged checkpoint"

    def record_changes(self, changes: Dict[str, Any], config: Dict[str, Any]) -> None:
        """Appends one resume's config changes ({key: [old, new]}) to changes.jsonl; config.yaml becomes ``config``."""
        if not self.writes:
            return
        lines = self.changes_path.read_text() if self.changes_path.exists() else ""
        lines += json.dumps({"resumed_with": changes, "exact_replay": False}, default=str) + "\n"
        _atomic_write_bytes(self.changes_path, lines.encode())
        self.write_config(config)

    # --------------------------------------------------------------- outputs
    def write_json(self, path: Path, obj: Any) -> None:
        if not self.writes:
            return
        atomic_write_bytes(path, (json.dumps(obj, indent=2) + "\n").encode())

    def write_jsonl(self, path: Path, records) -> None:
        if not self.writes:
            return
        atomic_write_bytes(path, "".join(json.dumps(r) + "\n" for r in records).encode())

    def log(self, line: str) -> None:
        if not self.writes:
            return
        try:
            with open(self.log_path, "a") as fh:
                fh.write(line + "\n")
        except OSError as err:
            raise write_error(self.log_path, err) from None
