"""Atomic checkpoint files and clear errors when one cannot be read.

A checkpoint is written to a temporary file in the destination's directory,
flushed to disk and then renamed over the destination with :func:`os.replace`.
A crash (or SIGKILL) at any moment therefore leaves either the previous
complete file or the new complete file, never a truncated one.
"""

from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path
from typing import Any, Dict, Optional, Union

import torch

PathLike = Union[str, "os.PathLike[str]"]


class CheckpointError(RuntimeError):
    """A checkpoint or model file is missing, unreadable, or of the wrong kind."""


def save_atomic(obj: Any, path: PathLike) -> None:
    """Saves ``obj`` with :func:`torch.save` so that ``path`` is never left partly written.

    Args:
        obj: Anything :func:`torch.save` accepts.
        path: Destination file; its directory must exist.
    """
    path = Path(path)
    # Serialise to memory first: a failure while pickling then cannot leave even a temp file behind.
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=str(path.parent))
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(buffer.getbuffer())
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    # Persist the rename itself (the directory entry); not every platform allows opening a directory.
    try:
        dir_fd = os.open(str(path.parent), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)


def load_file(path: PathLike, kind: str, fix: str, map_location: Optional[Union[str, torch.device]] = "cpu") -> Dict[str, Any]:
    """Loads a file written by :func:`save_atomic` and checks its ``format`` tag.

    Args:
        path: The file.
        kind: Expected value of the file's ``"format"`` key (e.g. ``"bnao-standalone-checkpoint"``).
        fix: What the user can do about an unreadable file; appended to the error message.
        map_location: Where tensors are loaded (default CPU; the caller moves them).

    Returns:
        The stored dict.

    Raises:
        CheckpointError: The file is missing, truncated/corrupt, or not a ``kind`` file.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file. {fix}")
    try:
        # Only tensors and plain Python containers are stored, so the safe loader suffices.
        data = torch.load(str(path), map_location=map_location, weights_only=True)
    except Exception as err:  # noqa: BLE001 - zip, pickle and EOF errors all mean "unreadable"
        detail = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(
            f"{path}: cannot read this file as a {kind} ({type(err).__name__}: {detail}); it is corrupt or "
            f"truncated. {fix}"
        ) from None
    if not isinstance(data, dict) or data.get("format") != kind:
        found = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise CheckpointError(f"{path}: not a {kind} (found {found!r}). {fix}")
    return data
