"""Device selection shared by every command and trainer, and the host-to-device copies of small data."""

from __future__ import annotations

from typing import Union

import torch


def resolve_device(device: Union[str, torch.device, None] = "auto") -> torch.device:
    """``"auto"``/None -> the first CUDA GPU when there is one, else the CPU; anything else as given.

    Raises:
        ValueError: the name is not a device (``"gpu"``), or a CUDA device was asked for and no GPU is visible.
    """
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:  # torch's message lists every backend it knows; the user needs the ones bnao runs on
        raise ValueError(f"unknown device {str(device)!r}; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r} was asked for but no CUDA GPU is visible; use cpu or auto")
    return dev


def copy_flag_to_host(flag: torch.Tensor, host: torch.Tensor) -> "torch.cuda.Event":
    """Starts copying a one-element CUDA flag into pinned host memory behind the work queued so far.

    The host can then wait for just that work (``event.synchronize()``), not for what is launched after it;
    the trainers use it to read a step's finiteness without draining the GPU.

    Args:
        flag: A one-element tensor on a CUDA device.
        host: A one-element pinned CPU tensor of the flag's dtype; it holds the value once the event is done.

    Returns:
        The event recorded after the copy, on the current stream of the flag's device (which the copy ran
        on; the current device may be another GPU).
    """
    host.copy_(flag.view(1), non_blocking=True)
    event = torch.cuda.Event()
    event.record(torch.cuda.current_stream(flag.device))
    return event


def upload(tensor: torch.Tensor, device: Union[str, torch.device]) -> torch.Tensor:
    """``tensor`` (on the CPU) on ``device``; to a GPU through pinned memory, without blocking the host.

    A pageable host-to-device copy makes the host wait for the GPU (a profile shows ``Memcpy HtoD (Pageable
    -> Device)``). The pinned block is held by the caching host allocator until its copy has run, so the
    source may go out of scope at once.
    """
    if torch.device(device).type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def to_device(values, dtype: torch.dtype, device: Union[str, torch.device]) -> torch.Tensor:
    """``torch.tensor(values, dtype)`` on ``device`` (:func:`upload`)."""
    return upload(torch.tensor(values, dtype=dtype), device)

