"""``bnao info``: versions, build flags, and which kernels and loaders are available."""

from __future__ import annotations

import argparse
import importlib
import json
import platform
import sys
from typing import Dict, List, Tuple

HELP = "versions, build flags, kernels and loaders available"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the report as JSON")


def _module_version(name: str) -> str:
    try:
        module = importlib.import_module(name)
    except Exception as err:  # noqa: BLE001 - any import failure means "not available"
        return f"not importable ({type(err).__name__}: {err})".splitlines()[0]
    return str(getattr(module, "__version__", "installed"))


def _fused_cells() -> str:
    """Where the supernet's fused cells are built and which activation dtypes they take."""
    from ..supernet.fused_forward import fused_built

    built = [device for device in ("cpu", "cuda") if fused_built(device)]
    if not built:
        return "not built (the eager cells run)"
    return (f"built for {', '.join(built)}; float32, float64 and bfloat16 activations (under bf16 autocast: "
            "bf16 storage, float32 weights, statistics and arithmetic)")


def collect() -> Dict[str, object]:
    """Gathers the report as a dict (also used by tests and bug reports)."""
    import warnings

    import torch

    from .. import __version__, extension

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = extension.has_ops()
    kernels: List[Tuple[str, bool, bool]] = [
        (op, extension.has_kernel(op, "cpu"), extension.has_kernel(op, "cuda")) for op in extension.op_names()
    ]
    devices = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            devices.append(f"cuda:{i} {p.name} ({p.total_memory / 2**30:.0f} GiB, sm_{p.major}{p.minor})")
    report: Dict[str, object] = {
        "bnao": __version__,
        "python": f"{sys.version.split()[0]} ({platform.platform()})",
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "numpy": _module_version("numpy"),
        "torchvision": _module_version("torchvision"),
        "dali": _module_version("nvidia.dali"),
        "extension_loaded": loaded,
        "extension_error": extension.load_error(),
        "build": extension.build_info(),
        "kernels": {op: {"cpu": cpu, "cuda": cuda} for op, cpu, cuda in kernels},
        "devices": devices or ["cpu only"],
        "fused_cells": _fused_cells(),
    }
    try:
        from ..data import list_loaders

        report["loaders"] = list_loaders()
        try:
            from ..data import available_loaders

            report["loaders_usable"] = available_loaders("cuda" if torch.cuda.is_available() else "cpu")
        except ImportError:
            pass
    except ImportError as err:
        report["loaders"] = f"unavailable ({err})"
    return report


def run(args: argparse.Namespace) -> int:
    report = collect()
    if getattr(args, "json", False):
        print(json.dumps(report, indent=2, default=str))
        return 0
    # One column wider than the longest key or op name (e.g. branch_round_backward).
    width = 2 + max([len(k) for k in report] + [2 + len(op) for op in report.get("kernels") or {}])
    for key, value in report.items():
        if key == "kernels":
            print(f"{'kernels':<{width}}" + ("(none: pure-PyTorch references in use)" if not value else ""))
            for op, where in value.items():
                backends = ", ".join(k for k, ok in where.items() if ok) or "none"
                print(f"  {op:<{width - 2}}{backends}")
        elif key == "extension_error" and value is None:
            continue
        else:
            if isinstance(value, (list, tuple)):
                value = ", ".join(str(v) for v in value)
            print(f"{key:<{width}}{value}")
    return 0


def main() -> int:
    """``python -m bnao.info``."""
    parser = argparse.ArgumentParser(prog="python -m bnao.info", description=HELP)
    add_arguments(parser)
    return run(parser.parse_args())
