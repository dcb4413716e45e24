"""Small helpers shared by the controller modules: threads, chunking, generator-driven dropout and init.

Every random number of the controller comes from one ``torch.Generator`` (CPU)
owned by :class:`~bnao.controller.NAOController`, so a run is reproducible from
its seed and a saved generator state, and the global torch RNG is never used.
"""

from __future__ import annotations

import functools
import math
from typing import Optional

import torch
from torch import nn

# Rows per forward pass in predict/generate/evaluation: bounds memory for pools of millions.
CHUNK_ROWS = 4096


def with_threads(method):
    """Runs a controller method under its ``num_threads`` setting (restored afterwards)."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        if self.num_threads is None:
            return method(self, *args, **kwargs)
        before = torch.get_num_threads()
        torch.set_num_threads(self.num_threads)
        try:
            return method(self, *args, **kwargs)
        finally:
            torch.set_num_threads(before)

    return wrapper


def dropout(x: torch.Tensor, p: float, training: bool, generator: Optional[torch.Generator]) -> torch.Tensor:
    """Inverted dropout whose mask is drawn from ``generator`` (``F.dropout`` cannot take one).

    The mask is drawn on the generator's device (CPU) and moved to ``x``'s, so
    CPU and GPU runs draw the same masks.
    """
    if not training or p <= 0.0:
        return x
    if generator is None:
        raise ValueError("dropout during training needs the controller's generator")
    keep = torch.rand(x.shape, generator=generator, device=generator.device) >= p
    return x * keep.to(device=x.device, dtype=x.dtype) / (1.0 - p)


@torch.no_grad()
def uniform_(t: torch.Tensor, bound: float, generator: torch.Generator) -> None:
    """Fills ``t`` with U(-bound, bound) drawn on the generator's device, then copied."""
    t.copy_(torch.empty(t.shape, device=generator.device).uniform_(-bound, bound, generator=generator))


@torch.no_grad()
def normal_(t: torch.Tensor, std: float, generator: torch.Generator) -> None:
    """Fills ``t`` with N(0, std^2) drawn on the generator's device, then copied."""
    t.copy_(torch.empty(t.shape, device=generator.device).normal_(0.0, std, generator=generator))


def reset_linear(layer: nn.Linear, generator: torch.Generator, bound: Optional[float] = None) -> None:
    """PyTorch's default Linear init (U(+-1/sqrt(fan_in))) or U(+-bound), from ``generator``."""
    b = 1.0 / math.sqrt(layer.in_features) if bound is None else bound
    uniform_(layer.weight, b, generator)
    if layer.bias is not None:
        uniform_(layer.bias, 1.0 / math.sqrt(layer.in_features), generator)


def reset_lstm(rnn: nn.LSTM, generator: torch.Generator) -> None:
    """PyTorch's default LSTM init (every tensor U(+-1/sqrt(hidden))), from ``generator``."""
    b = 1.0 / math.sqrt(rnn.hidden_size)
    for p in rnn.parameters():
        uniform_(p, b, generator)
