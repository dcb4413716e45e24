"""Scoring a pool of archs with the shared weights (SPEC section 4, NAO-WS evaluation).

Every arch is run on held-out data with BatchNorm in training mode (batch
statistics, as NAO-WS does: running statistics of a supernet mean nothing for
one arch) but without touching the running statistics or the weights; no
gradients. Which data each arch sees is the caller's choice:

* ``fixed``: one list of batches, the same for every arch;
* ``random`` (the reference's): a :class:`RandomBatches` that hands every
  arch the next batch of a shuffled dev loader, a fresh uniformly random
  subset of the dev set, as the reference's ``next(iter(valid_queue))``
  over a ``SubsetRandomSampler`` does.

Per-arch results are collected on the device, so the only host
synchronisation is the final copy of the ``[n]`` results.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Iterable, List, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

from ..autocast import bf16_autocast
from ..size import as_arch_array
from .model import Supernet

Batch = Tuple[torch.Tensor, torch.Tensor]

#: Values of the evaluation-data option (``supernet.eval_data``).
EVAL_DATA_MODES = ("random", "fixed")


class RandomBatches:
    """A fresh random dev batch (or ``count`` of them) for every arch: the reference's evaluation data.

    Args:
        loader: A shuffled, seeded ``bnao.data`` loader over the dev set (no augmentation); iteration
            cycles through its epochs, each with a new order.
        count: Batches per arch.

    Calling the object returns the next ``count`` batches. Its state is the loader's
    (:meth:`state_dict`), so a resumed search scores every arch on the same images.
    """

    def __init__(self, loader: Any, count: int = 1):
        if count < 1:
            raise ValueError(f"count must be >= 1, got {count}")
        self.loader = loader
        self.count = int(count)
        self._stream = None

    def __call__(self) -> List[Batch]:
        if self._stream is None:
            self._stream = self.loader.stream()
        return [next(self._stream) for _ in range(self.count)]

    def state_dict(self) -> Dict[str, Any]:
        """The loader's position (epoch, batch)."""
        return self.loader.state_dict()

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restores :meth:`state_dict`; the next call gives the batches the saved object would have."""
        self.loader.load_state_dict(state)
        self._stream = None


def _as_batches(batches: Union[Batch, Iterable[Batch]]) -> Sequence[Batch]:
    if isinstance(batches, tuple) and len(batches) == 2 and torch.is_tensor(batches[0]):
        return [batches]
    out = list(batches)
    if not out:
        raise ValueError("evaluate_pool needs at least one (images, labels) batch")
    return out


@torch.no_grad()
def evaluate_pool(model: Supernet, archs: Union[np.ndarray, Sequence],
                  batches: Union[Batch, Iterable[Batch], Callable[[], List[Batch]]], *,
                  bf16: bool = False, graph: str = "auto") -> Tuple[np.ndarray, np.ndarray]:
    """Accuracy and loss of every arch of a pool with the supernet's shared weights.

    Args:
        model: The supernet.
        archs: ``int64 [n, 8B]`` pool, or one arch or a sequence of archs in any form
            :func:`~bnao.size.as_arch_array` takes (strings, lists, :class:`~bnao.space.Arch`).
        batches: The same data for every arch: one ``(images, labels)`` batch or several; or a callable
            (e.g. :class:`RandomBatches`) called once per arch for that arch's batches (the reference draws a
            fresh random batch of 500 dev images per arch).
        bf16: bfloat16 autocast.
        graph: ``"auto"``: on the fused path with one batch per arch, score each arch by replaying one CUDA
            graph (:func:`~bnao.supernet.graph_step.evaluate_pool_on_device`; the same arithmetic uncaptured on
            a CPU); ``"off"``: the arch-by-arch forward. :data:`last_evaluation` says which ran.

    Returns:
        ``(accuracy, loss)``, both ``float64 [n]``; with several batches, image-weighted means.
    """
    draw = batches if callable(batches) else None
    archs = as_arch_array(archs, model.space)  # an array, one arch or a list of archs (strings too), validated
    device = next(model.parameters()).device
    fixed = None if draw else _on_device(_as_batches(batches), device)
    if graph != "off":
        result = _evaluate_on_device(model, archs, fixed, draw, device, bf16)
        if result is not None:
            return result
    last_evaluation.update(mode="eager", reason="graph='off'" if graph == "off" else last_evaluation["reason"])
    n = len(archs)
    seen = torch.zeros(n, device=device, dtype=torch.float32)
    acc = torch.zeros(n, device=device, dtype=torch.float32)
    loss = torch.zeros(n, device=device, dtype=torch.float32)
    was_training = model.training
    model.eval()
    try:
        with bf16_autocast(device, bf16):
            for i, row in enumerate(archs.tolist()):
                arch = tuple(row)
                for x, y in fixed if fixed is not None else _on_device(_as_batches(draw()), device):
                    logits = model(x, arch, bn_train=True).float()
                    # Sums stay on the device: no synchronisation per arch.
                    loss[i] += F.cross_entropy(logits, y, reduction="sum")
                    acc[i] += (logits.argmax(1) == y).sum()
                    seen[i] += y.shape[0]
    finally:
        model.train(was_training)
    return (acc / seen).double().cpu().numpy(), (loss / seen).double().cpu().numpy()


#: How the last :func:`evaluate_pool` scored: ``{"mode": "graph" | "uncaptured" | "eager", "reason": ...}``.
last_evaluation: Dict[str, str] = {"mode": "eager", "reason": "no evaluation yet"}


def _evaluate_on_device(model: Supernet, archs: np.ndarray, fixed, draw, device: torch.device, bf16: bool):
    """:func:`evaluate_pool` by :func:`~bnao.supernet.graph_step.evaluate_pool_on_device`, or None where it
    does not apply (the reason goes to :data:`last_evaluation`)."""
    from .graph_step import evaluate_pool_on_device, evaluation_unsupported

    why = evaluation_unsupported(model, len(fixed) if fixed is not None else getattr(draw, "count", None), bf16)
    if why is not None:
        last_evaluation.update(mode="eager", reason=why)
        return None
    first = fixed if fixed is not None else _on_device(_as_batches(draw()), device)
    batches = {0: first[0]}

    def next_batch(i: int) -> Batch:
        if fixed is not None:
            return fixed[0]
        if i not in batches:
            batches.clear()
            batches[i] = _on_device(_as_batches(draw()), device)[0]
        return batches[i]

    was_training = model.training
    model.eval()
    try:
        loss, correct, seen, status = evaluate_pool_on_device(model, archs, next_batch, bf16=bf16)
    finally:
        model.train(was_training)
    last_evaluation.update(status)
    return (correct / seen).double().cpu().numpy(), (loss / seen).double().cpu().numpy()


def _on_device(batches: Sequence[Batch], device: torch.device) -> List[Batch]:
    return [(x.to(device, non_blocking=True), y.to(device, non_blocking=True)) for x, y in batches]


__all__ = ["evaluate_pool", "RandomBatches", "EVAL_DATA_MODES"]
