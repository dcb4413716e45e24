"""Atomic checkpoint files and clear errors when one cannot be read.

A checkpoint is written to a temporary file in the destination's directory,
flushed to disk and then renamed over the destination with :func:`os.replace`.
A crash (or SIGKILL) at any moment therefore leaves either the previous
complete file or the new complete file, never a truncated one.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, Optional, Union

import torch

from ..safe_io import CheckpointError, DamagedFileError, UnsafeFileError, safe_load
from ..safe_io import save_atomic as _save_atomic

if TYPE_CHECKING:
    from ..distributed import Context

PathLike = Union[str, "os.PathLike[str]"]

__all__ = ["CheckpointError", "DamagedFileError", "UnsafeFileError", "load_file", "partial_of_rank", "save_atomic"]


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


def load_file(path: PathLike, kind: str, fix: str, map_location: Optional[Union[str, torch.device]] = "cpu",
              other_kinds: Optional[Dict[str, str]] = None) -> Dict[str, Any]:
    """Loads a file written by :func:`save_atomic` and checks its ``format`` tag.

    Args:
        path: The file.
        kind: Expected value of the file's ``"format"`` key (e.g. ``"bnao-standalone-checkpoint"``).
        fix: What the user can do about an unreadable file; appended to the error message.
        map_location: Where tensors are loaded (default CPU; the caller moves them).
        other_kinds: What to tell the user, by the ``format`` of a bnao file of another kind (``fix`` is
            for a damaged file, which a well-formed file of another kind is not).

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
        hint = (other_kinds or {}).get(found) if isinstance(found, str) else None
        raise CheckpointError(f"{path}: not a {kind} (found {found!r}). {hint or fix}")
    return data


def partial_of_rank(partial: Optional[Dict[str, Any]], parallel: Optional[Context],
                    path: Path) -> Optional[Dict[str, Any]]:
    """This rank's part of a checkpointed epoch stopped part-way.

    Raises:
        CheckpointError: The epoch was stopped under another number of processes: its per-rank sums and
            random streams do not map onto this one. (Checkpoints at epoch ends resume at any world size.)
    """
    saved = len(partial["by_rank"]) if partial is not None and "by_rank" in partial else 1
    world = parallel.world_size if parallel else 1
    if partial is None or (saved == 1 and world == 1):
        return partial
    if saved != world:
        raise CheckpointError(
            f"{path}: this training was stopped in the middle of an epoch with {saved} process(es); that epoch "
            f"resumes only with {saved} (its per-process sums and random streams are in the checkpoint). Resume "
            f"with torchrun --nproc_per_node={saved} (or as one process when 1); epoch-end checkpoints resume at "
            "any number of processes")
    return partial["by_rank"][parallel.rank]
