"""Atomic checkpoint files and clear errors when one cannot be read.

A checkpoint is written to a temporary file in the destination's directory,
flushed to disk and then renamed over the destination with :func:`os.replace`.
A crash (or SIGKILL) at any moment therefore leaves either the previous
complete file or the new complete file, never a truncated one.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, Optional, Union

import torch

from ..safe_io import CheckpointError, DamagedFileError, UnsafeFileError, safe_load
from ..safe_io import save_atomic as _save_atomic

PathLike = Union[str, "os.PathLike[str]"]

__all__ = ["CheckpointError", "DamagedFileError", "UnsafeFileError", "load_file", "save_atomic"]


def save_atomic(obj: Any, path: PathLike, previous: Optional[PathLike] = None) -> None:
    """Saves ``obj`` with :func:`torch.save` so that ``path`` is never left partly written.

    NumPy values are encoded so that :func:`load_file` reads the file back with
    ``weights_only=True`` (see :mod:`bnao.safe_io`).

    Args:
        obj: Anything :func:`torch.save` accepts.
        path: Destination file; its directory must exist.
        previous: When given, the current ``path`` is kept under this name (last two versions).

    Raises:
        FileWriteError: The write failed; the existing file is intact.
    """
    _save_atomic(obj, path, previous)


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
        UnsafeFileError: Loading the file would need arbitrary unpickling; it is refused unread.
        DamagedFileError: The file is truncated or corrupt.
        CheckpointError: The file is missing, or not a ``kind`` file.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file. {fix}")
    try:
        # Only tensors and plain Python are stored, so the safe loader suffices (and a planted
        # file cannot run code).
        data = safe_load(path, map_location=map_location)
    except UnsafeFileError:
        raise
    except DamagedFileError as err:
        raise DamagedFileError(f"{err} (expected a {kind}). {fix}") from None
    if not isinstance(data, dict) or data.get("format") != kind:
        found = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise CheckpointError(f"{path}: not a {kind} (found {found!r}). {fix}")
    return data
