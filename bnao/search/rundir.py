"""The run directory of a search: config, checkpoint, pool, ranking, logs, plots.

Layout of ``RUN_DIR``::

    config.yaml       resolved configuration (every key)
    checkpoint.pt     last checkpoint (written atomically: temp file + fsync + rename)
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

import io
import shutil
import json
import os
from pathlib import Path
from typing import Any, Dict, Optional

import torch
import yaml


class RunDirError(RuntimeError):
    """The run directory cannot be used as asked (another run, missing checkpoint, ...)."""


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Writes ``data`` to ``path`` so that a crash leaves either the old or the new file, never a torn one."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    try:  # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass


class RunDir:
    """A search's output folder.

    Args:
        path: The folder.
    """

    def __init__(self, path: os.PathLike):
        self.path = Path(path)
        self.config_path = self.path / "config.yaml"
        self.checkpoint_path = self.path / "checkpoint.pt"
        self.pool_path = self.path / "pool.jsonl"
        self.ranking_path = self.path / "ranking.jsonl"
        self.best_path = self.path / "best.json"
        self.history_path = self.path / "history.jsonl"
        self.pareto_path = self.path / "pareto.jsonl"
        self.log_path = self.path / "log.txt"
        self.progress_path = self.path / "progress.json"
        self.plots = self.path / "plots"
        self.tb = self.path / "tb"

    # ------------------------------------------------------------- lifecycle
    def holds_run(self) -> bool:
        """True when the folder already holds a search (config or checkpoint)."""
        return self.config_path.exists() or self.checkpoint_path.exists()

    def create(self, config: Dict[str, Any], overwrite: bool = False) -> None:
        """Prepares a fresh run; refuses a folder that holds another run unless ``overwrite``."""
        if self.holds_run() and not overwrite:
            raise RunDirError(
                f"{self.path} already holds a search run; continue it with `bnao search --resume {self.path}`, "
                "choose another --out, or pass --overwrite to replace it"
            )
        self.path.mkdir(parents=True, exist_ok=True)
        for name in ("checkpoint.pt", "progress.json", "pool.jsonl", "ranking.jsonl", "best.json", "history.jsonl", "log.txt",
                     "pareto.jsonl"):
            (self.path / name).unlink(missing_ok=True)
        shutil.rmtree(self.path / "rerank", ignore_errors=True)
        if self.tb.exists():
            for f in self.tb.glob("events.*"):
                f.unlink()
        atomic_write_bytes(self.config_path, yaml.safe_dump(config, sort_keys=False).encode())

    def read_config(self) -> Dict[str, Any]:
        if not self.config_path.exists():
            raise RunDirError(f"{self.path} holds no search run (no config.yaml); start one with --out {self.path}")
        return yaml.safe_load(self.config_path.read_text())

    # ------------------------------------------------------------ checkpoint
    def save_checkpoint(self, state: Dict[str, Any]) -> None:
        buffer = io.BytesIO()
        torch.save(state, buffer)
        atomic_write_bytes(self.checkpoint_path, buffer.getvalue())

    def load_checkpoint(self) -> Optional[Dict[str, Any]]:
        """The last checkpoint, or None when the run stopped before its first one."""
        if not self.checkpoint_path.exists():
            return None
        try:
            return torch.load(self.checkpoint_path, map_location="cpu", weights_only=False)
        except Exception as err:  # noqa: BLE001 - any unpickling failure means a corrupt file
            raise RunDirError(
                f"checkpoint {self.checkpoint_path} is corrupt or truncated ({type(err).__name__}: {err}); "
                "checkpoints are written atomically, so this file was damaged after it was written: "
                "restore it from a backup or start the run again with --overwrite"
            ) from None

    # --------------------------------------------------------------- outputs
    def write_json(self, path: Path, obj: Any) -> None:
        atomic_write_bytes(path, (json.dumps(obj, indent=2) + "\n").encode())

    def write_jsonl(self, path: Path, records) -> None:
        atomic_write_bytes(path, "".join(json.dumps(r) + "\n" for r in records).encode())

    def log(self, line: str) -> None:
        with open(self.log_path, "a") as fh:
            fh.write(line + "\n")
