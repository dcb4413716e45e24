"""Soft loading of the compiled core ``bnao._C``.

bnao works without its compiled core: every op has a pure-PyTorch reference
(``bnao/ops``) that is used when the extension was not built, failed to load,
or has no kernel for the tensor's device. One warning says so, once.
"""

from __future__ import annotations

import json
import os
import warnings
from functools import lru_cache
from typing import Dict, Optional

import torch

_LOAD_ERROR: Optional[str] = None


@lru_cache(maxsize=None)
def _load() -> bool:
    global _LOAD_ERROR
    if os.environ.get("BNAO_DISABLE_EXTENSION") == "1":
        _LOAD_ERROR = "disabled by BNAO_DISABLE_EXTENSION=1"
        return False
    try:
        from . import _C  # noqa: F401  (import runs the op registrations)
    except ImportError as err:
        _LOAD_ERROR = str(err)
        warnings.warn(
            f"bnao: the compiled core bnao._C is not available ({err}); running on the "
            "pure-PyTorch reference kernels, which are slower. Rebuild with "
            "`pip install --no-build-isolation -e .` (needs a C++ compiler; `bnao info` shows the build).",
            RuntimeWarning,
            stacklevel=3,
        )
        return False
    return True


def has_ops() -> bool:
    """True when the compiled core loaded and its ops are registered in ``torch.ops.bnao``."""
    return _load()


def load_error() -> Optional[str]:
    """Why the compiled core did not load (None when it did)."""
    _load()
    return _LOAD_ERROR


def has_kernel(op_name: str, device: str = "cpu") -> bool:
    """True when ``torch.ops.bnao.<op_name>`` has a kernel for the given device type."""
    if not has_ops():
        return False
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(torch.device(device).type)
    if key is None:  # bnao has kernels for CPUs and CUDA GPUs only; callers fall back to the references
        return False
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"bnao::{op_name}", key)
    except RuntimeError:
        return False


def has_cuda_ops() -> bool:
    """True when the compiled core was built with CUDA kernels."""
    return has_kernel("alias_draw", "cuda")


def build_info() -> Dict[str, object]:
    """Flags recorded by setup.py when ``bnao._C`` was built (empty when unknown)."""
    path = os.path.join(os.path.dirname(__file__), "_build_info.json")
    try:
        with open(path) as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return {}


def op_names() -> list:
    """Names of the ops declared in the ``bnao`` op library (empty without the extension)."""
    if not has_ops():
        return []
    return sorted(
        name.split("::", 1)[1]
        for name in torch._C._dispatch_get_all_op_names()
        if name.startswith("bnao::")
    )
