"""Device selection shared by every command and trainer."""

from __future__ import annotations

from typing import Union

import torch


def resolve_device(device: Union[str, torch.device, None] = "auto") -> torch.device:
    """``"auto"``/None -> the first CUDA GPU when there is one, else the CPU; anything else as given.

    Raises:
        ValueError: a CUDA device was asked for and no GPU is visible.
    """
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r} was asked for but no CUDA GPU is visible; use cpu or auto")
    return dev
