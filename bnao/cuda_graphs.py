"""CUDA graph capture shared by the replayed steps (the supernet's :mod:`~bnao.supernet.graph_step`, the
controller's :mod:`~bnao.controller.steps`): whether capture may be tried, and the capture itself, whose
failure is reported rather than raised (capture is an optimisation: the same bodies then run uncaptured)."""

from __future__ import annotations

import os
from typing import Optional

import torch


def capture_blocker(capture: bool, device: torch.device) -> Optional[str]:
    """Why no CUDA graph is captured on ``device`` (None: one is tried)."""
    if device.type != "cuda":
        return "CPU"
    if not capture:
        return "capture off"
    if os.environ.get("PYTORCH_NO_CUDA_MEMORY_CACHING", "").strip().lower() in ("1", "true", "yes", "on", "y"):
        # Capture needs the caching allocator's private pool: a plain cudaMalloc is refused during capture.
        return "PYTORCH_NO_CUDA_MEMORY_CACHING is set (capture needs the caching allocator)"
    return None


def capture_graphs(bodies, device: torch.device, generator: Optional[torch.Generator]):
    """Captures each of ``bodies`` (each already run once, uncaptured: the warm-up) as a CUDA graph.

    Returns:
        ``(graphs, None)``, or ``(None, why)`` where capture failed; then the current stream is restored, and
        the caller replaces ``generator`` (registered with the graphs: e.g. drop-path masks), which a failed
        capture can leave in capture mode (``DropPathMixin.renew_generator``).
    """
    stream = torch.cuda.current_stream(device)
    graphs = []
    try:
        with torch.cuda.device(device):
            for body in bodies:
                graph = torch.cuda.CUDAGraph()
                if generator is not None:
                    graph.register_generator_state(generator)
                with torch.cuda.graph(graph):
                    body()
                graphs.append(graph)
    except Exception as exc:  # capture is an optimisation: any failure falls back to the same bodies uncaptured
        torch.cuda.set_stream(stream)
        torch.cuda.synchronize(device)
        return None, f"{type(exc).__name__}: {exc}"
    return graphs, None
