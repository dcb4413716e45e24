"""The controller's minibatch steps, each one replay of a CUDA graph where capture is possible.

A controller fit at the reference's settings runs about 10^5 minibatches (1,000 epochs of 90% of a pool of
1,000 to 1,600 archs, each 10x augmented, in batches of 100). Each is a small LSTM encoder-decoder forward
and backward, a gradient clip and an Adam step: a few hundred kernels of microseconds each, so on a GPU a
step costs its launches (about 9 ms a minibatch measured in a search on an H200, for well under 1 ms of work).

:class:`EpochSteps` runs an epoch's minibatches from static device buffers: the epoch's shuffled tokens and
targets, a device position that every step advances, and the loss sums. So a minibatch needs no host data
at all, and on CUDA it is one replay of a graph captured once per fit (one more for a short last batch). As
in :mod:`bnao.supernet.graph_step`, each minibatch size runs uncaptured first (the warm-up, which creates
Adam's state), is captured at its second run (capture records without running) and then replayed, so the
sequence of updates is that of the uncaptured loop. Uncaptured (on a CPU, with dropout, whose masks come from
the controller's CPU generator, with ``graph='off'``, or after a failed capture) the same step function runs:
the CPU tests check the arithmetic a GPU replays.
"""

from __future__ import annotations

import logging
import warnings
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..cuda_graphs import capture_blocker, capture_graphs

log = logging.getLogger(__name__)

#: Values of ``graph`` (NAOController.fit, config ``controller.graph``).
GRAPH_MODES = ("auto", "on", "off")


def graph_blocker(graph: str, device: torch.device, dropout: float) -> Optional[str]:
    """Why a fit's minibatches would not be replayed as CUDA graphs (None: they are captured).

    Raises:
        ValueError: An unknown ``graph``, or ``graph='on'`` where capture is impossible.
    """
    if graph not in GRAPH_MODES:
        raise ValueError(f"graph must be one of {GRAPH_MODES}, got {graph!r}")
    if graph == "off":
        return "graph='off'"
    why = capture_blocker(True, device)
    if why is None and dropout > 0:
        why = "dropout (its masks are drawn on the controller's CPU generator)"
    if why is not None and graph == "on":
        raise ValueError(f"controller graph='on': minibatches cannot be captured here: {why}")
    return why


def minibatch_sizes(count: int, batch_size: int) -> List[int]:
    """Rows of each minibatch of an epoch of ``count`` rows, in order: full batches, then the remainder."""
    return [batch_size] * (count // batch_size) + [count % batch_size] * (count % batch_size > 0)


def replays_any(count: int, batch_size: int, epochs: int) -> bool:
    """Whether a fit runs some minibatch size at least twice: only then is a captured graph ever replayed (each
    size's first run is its warm-up), so only then is capture (and a capturable Adam) worth it."""
    sizes = minibatch_sizes(count, batch_size)
    return epochs * max(sizes.count(size) for size in sizes) >= 2


def make_adam(params, lr: float, weight_decay: float, capturable: bool) -> torch.optim.Adam:
    """The controller's Adam: per parameter (``foreach=False``: measured as fast for its ~77k parameters on a CPU,
    and the same code path on every device), or, for captured minibatches, ``capturable=True`` (step counts on the
    device) with the multi-tensor update (fewer kernels in the graph)."""
    if capturable:
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay, foreach=True, capturable=True)
    return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay, foreach=False)


def set_capturable(optimizer: torch.optim.Adam, capturable: bool) -> None:
    """Switches a continued Adam (``reset_optimizer=False``) to or from :func:`make_adam`'s captured form, its step
    counts moved to the parameters' device or back to the CPU (where Adam keeps them otherwise)."""
    for group in optimizer.param_groups:
        group["capturable"], group["foreach"] = capturable, capturable
        for param in group["params"]:
            state = optimizer.state.get(param)
            if state and "step" in state:
                device = param.device if capturable else torch.device("cpu")
                state["step"] = state["step"].to(device=device, dtype=torch.float32)


class EpochSteps:
    """Minibatch steps over an epoch's data held in static device buffers (module docstring).

    Args:
        model: The controller's networks (encoder, predictor, decoder).
        optimizer: Its Adam (``capturable=True`` where graphs are captured).
        count: Training rows per epoch (the augmented training archs).
        length: Tokens per arch.
        batch_size: Minibatch size; the last minibatch of an epoch takes the remainder.
        trade_off: lambda of ``lambda * MSE + (1 - lambda) * NLL``.
        grad_clip: Max global gradient norm (``<= 0``: none).
        device: The controller's device.
        generator: The controller's generator (dropout masks).
        blocker: Why no graph is captured (:func:`graph_blocker`), or None.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, count: int, length: int, batch_size: int,
                 trade_off: float, grad_clip: float, device: torch.device, generator: torch.Generator,
                 blocker: Optional[str]):
        self.model, self.optimizer = model, optimizer
        self.params = list(model.parameters())
        self.trade_off, self.grad_clip = trade_off, grad_clip
        self.device, self.generator = device, generator
        self.tokens = torch.empty((count, length), dtype=torch.long, device=device)
        self.targets = torch.empty(count, dtype=torch.float32, device=device)
        self.position = torch.zeros((), dtype=torch.long, device=device)
        self.offsets = torch.arange(min(batch_size, count), device=device)
        self.sums = torch.zeros(3, dtype=torch.float32, device=device)  # loss, mse, nll, each times the rows
        self.sizes = minibatch_sizes(count, batch_size)  # a short last minibatch gets a second graph
        self._graphs: Dict[int, torch.cuda.CUDAGraph] = {}
        self._warm: set = set()
        self._capture = blocker is None
        self.mode, self.reason = "uncaptured", blocker or "not captured yet"

    def run_epoch(self, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """One epoch over ``tokens`` / ``targets`` (already shuffled) in minibatch order.

        Returns:
            ``[3]`` sums over the epoch's rows of the loss, MSE and NLL (device tensor, overwritten by the next
            epoch).
        """
        self.tokens.copy_(tokens)
        self.targets.copy_(targets)
        self.position.zero_()
        self.sums.zero_()
        for size in self.sizes:
            self._run(size)
        return self.sums

    def describe(self) -> Dict[str, str]:
        """``{"mode": "graph" | "uncaptured", "reason": ...}``."""
        return {"mode": self.mode, "reason": self.reason}

    def _run(self, size: int) -> None:
        graph = self._graphs.get(size)
        if graph is None and self._capture and size in self._warm:
            graph = self._try_capture(size)
        if graph is not None:
            graph.replay()
            return
        with warnings.catch_warnings():
            # A capturable Adam warns when it steps uncaptured: here that is the warm-up run before capture.
            warnings.filterwarnings("ignore", message=".*capturable=True.*")
            self._step(size)
        self._warm.add(size)

    def _try_capture(self, size: int) -> Optional["torch.cuda.CUDAGraph"]:
        graphs, error = capture_graphs((lambda: self._step(size),), self.device, None)
        if error is not None:
            self._capture = False
            if self._graphs:  # the full minibatches replay; only this (short) one runs uncaptured
                self.reason = f"captured; the {size}-row minibatch uncaptured: capture failed: {error}"
            else:
                self.mode, self.reason = "uncaptured", f"capture failed: {error}"
            log.warning("CUDA graph capture of the controller's minibatch failed (%s); running it uncaptured", error)
            return None
        self._graphs[size] = graphs[0]
        self.mode, self.reason = "graph", "captured"
        return graphs[0]

    def _step(self, size: int) -> None:
        """The minibatch at :attr:`position` (``size`` rows): forward, loss, backward, clip, Adam; then the sums
        and the position move on. Everything it reads of the data is device data, so it replays unchanged."""
        index = self.position + self.offsets[:size]
        tokens, targets = self.tokens.index_select(0, index), self.targets.index_select(0, index)
        model, generator = self.model, self.generator
        outputs, embedding = model.encoder(tokens, generator)
        predicted = model.predictor(embedding, generator)
        log_probs = model.decoder(tokens, embedding, outputs, generator)
        mse = F.mse_loss(predicted, targets)
        nll = F.nll_loss(log_probs.reshape(-1, log_probs.shape[-1]), tokens.reshape(-1))
        loss = self.trade_off * mse + (1.0 - self.trade_off) * nll
        # The gradients are written, not accumulated (a captured backward writes the same .grad tensors).
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.grad_clip > 0:
            nn.utils.clip_grad_norm_(self.params, self.grad_clip)
        self.optimizer.step()
        # On the device: no host synchronisation per minibatch.
        self.sums += torch.stack((loss.detach(), mse.detach(), nll.detach())) * size
        self.position += size
