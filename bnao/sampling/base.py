"""The sampler interface: reproducible draws of item indices from a pool.

A sampler turns a weight vector (one weight per architecture of the pool) into
a target distribution, builds its alias table once, and then draws indices in
O(1) each from a counter-based random stream ``(seed, position)``. Because draw
``k`` of a stream depends only on the table, the seed and ``k``, a sampler can
pre-compute a buffer of draws (making one ``draw()`` from Python cost well
under a microsecond) without changing the sequence, and a resumed sampler
continues exactly where the saved one stopped.
"""

from __future__ import annotations

import hashlib
import numbers
from abc import ABC, abstractmethod
from typing import Any, Dict, List, Optional, Union

import numpy as np
import torch

from ..ops import sampler as ops

WeightsLike = Union[torch.Tensor, np.ndarray, List[float], tuple]

# Draws computed per op call for single draw() calls. Large enough that the
# op call is amortised to a few ns per draw, small enough that a refill stays
# short (a 1e7-item table is 80 MB, so every draw is a cache miss there).
_BUFFER_CPU = 8192
# A CUDA refill costs a synchronising copy (tens of microseconds): buffer more.
_BUFFER_CUDA = 65536

STATE_FORMAT = 1


def validate_weights(weights: WeightsLike) -> torch.Tensor:
    """Checks a weight vector and returns it as a contiguous float64 CPU tensor.

    Args:
        weights: One non-negative, finite weight per item (tensor, array or
            sequence of numbers), at least one of them positive.

    Returns:
        1-D float64 CPU tensor.

    Raises:
        ValueError: The weights are empty, not 1-D, not numeric, negative, NaN,
            infinite or all zero; the message names the problem and the fix.
    """
    if isinstance(weights, torch.Tensor):
        w = weights.detach()
    else:
        try:
            w = torch.as_tensor(np.asarray(weights))
        except (TypeError, ValueError, RuntimeError) as err:
            raise ValueError(
                f"weights must be a 1-D sequence of numbers, got {type(weights).__name__} ({err}); "
                "pass a list, NumPy array or tensor with one weight per item"
            ) from None
    if w.dtype == torch.bool or w.is_complex() or not (w.is_floating_point() or _is_integer_dtype(w.dtype)):
        raise ValueError(
            f"weights must be real numbers, got dtype {w.dtype}; pass float or integer weights (e.g. model sizes)"
        )
    if w.dim() == 0:  # e.g. create_sampler("proportional", 5): a pool size where weights are wanted
        raise ValueError(
            f"weights must be 1-D with one weight per item (e.g. the archs' model sizes), got the single number "
            f"{w.item()!r}; only the uniform sampler takes a pool size instead of weights"
        )
    if w.dim() != 1:
        raise ValueError(
            f"weights must be 1-D with one weight per item, got shape {tuple(w.shape)}; "
            "flatten it (weights.reshape(-1)) or pass a single row"
        )
    if w.numel() == 0:
        raise ValueError("weights are empty; the pool needs at least one item")
    # The checks run in NumPy: single-threaded and predictable, whereas torch's
    # intra-op threads add milliseconds of wake-up latency on a busy machine.
    if w.dtype in (torch.float16, torch.bfloat16):
        w = w.float()  # no NumPy equivalent for bfloat16; float32 holds both exactly
    # A copy: the sampler keeps these weights, so it must not alias the caller's array.
    arr = np.array(w.cpu().numpy(), dtype=np.float64, copy=True)
    finite = np.isfinite(arr)
    if not finite.all():
        i = int(np.argmin(finite))
        raise ValueError(
            f"weight {i} is {arr[i]}; every weight must be finite "
            "(replace NaN/inf, e.g. with torch.nan_to_num, or drop the item)"
        )
    negative = arr < 0
    if negative.any():
        i = int(np.argmax(negative))
        raise ValueError(f"weight {i} is negative ({arr[i]}); weights must be >= 0 (use 0 to exclude an item)")
    if not (arr > 0).any():
        raise ValueError("all weights are zero; give at least one item a positive weight")
    # The table build adds left to right; that sum can only overflow when
    # max * n does, so the (allocating) sequential sum runs only then.
    if not np.isfinite(float(arr.max()) * arr.size):
        with np.errstate(over="ignore"):  # an overflowing sum is reported below, not warned about
            total = float(np.cumsum(arr)[-1])
        if not np.isfinite(total):
            raise ValueError("the weights sum to infinity; divide them by their maximum")
    return torch.from_numpy(arr)


def _is_integer_dtype(dtype: torch.dtype) -> bool:
    return not dtype.is_floating_point and not dtype.is_complex and dtype != torch.bool


def _check_device(device: Union[str, torch.device]) -> torch.device:
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {dev} was requested but no CUDA GPU is visible; use device='cpu'")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"samplers run on 'cpu' or 'cuda', got device {dev}")
    return dev


class Sampler(ABC):
    """Draws item indices from a fixed target distribution over a pool.

    Subclasses define the distribution through :meth:`_target_weights`; this
    class owns the alias table, the random stream and the state.

    Args:
        weights: One weight per item of the pool (see :func:`validate_weights`).
        seed: Key of the random stream (any int; used modulo 2^64).
        device: Where the table lives and where ``draw(n)`` returns indices.
    """

    #: Registry name, recorded in :meth:`state_dict`.
    name: str = ""

    def __init__(self, weights: WeightsLike, *, seed: int = 0, device: Union[str, torch.device] = "cpu"):
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
            raise ValueError(f"seed must be an integer, got {seed!r}")
        self._seed = int(seed)
        self._device = _check_device(device)
        # Draws are buffered: `_buffer` holds, reversed, the draws with stream
        # counters [_stream_end - len(_buffer), _stream_end), so the number of
        # draws taken is _stream_end - len(_buffer) and draw() is a bare pop().
        self._stream_end = 0
        self._buffer: List[int] = []
        self._buffer_size = _BUFFER_CUDA if self._device.type == "cuda" else _BUFFER_CPU
        self._table_digest: Optional[str] = None
        self.set_weights(weights)

    # ------------------------------------------------------------------ distribution
    @abstractmethod
    def _target_weights(self, weights: torch.Tensor) -> torch.Tensor:
        """Unnormalised float64 CPU weights of the target distribution for validated ``weights``."""

    def _options(self) -> Dict[str, Any]:
        """Constructor options recorded in the state (besides weights, seed, device)."""
        return {}

    def _load_options(self, options: Dict[str, Any]) -> None:
        """Restores the options saved by :meth:`_options`."""
        if options:
            raise ValueError(f"{type(self).__name__} takes no options, the state has {sorted(options)}")

    def set_weights(self, weights: WeightsLike) -> None:
        """Replaces the pool and rebuilds the table, keeping the stream position.

        Args:
            weights: One weight per item of the new pool.

        Raises:
            ValueError: The weights are not usable (see :func:`validate_weights`).
        """
        w = validate_weights(weights)
        target = self._target_weights(w)
        # Built on the CPU and moved: the CUDA op builds on the CPU anyway, and
        # one build path keeps tables identical across devices.
        table = ops.alias_table(target)
        consumed = self.num_drawn
        self._weights = w
        self._target = target
        self._table = table.to(self._device)
        self._table_digest = None
        self._buffer = []  # drawn from the old table: recompute from the new one
        self._stream_end = consumed

    def probabilities(self) -> torch.Tensor:
        """Target probability of each item (float64 CPU tensor summing to 1)."""
        return self._target / self._target.sum()

    # ------------------------------------------------------------------ draws
    def draw(self, n: Optional[int] = None) -> Union[int, torch.Tensor]:
        """Draws the next index, or the next ``n`` indices.

        Args:
            n: None for one draw, else the number of draws.

        Returns:
            A Python int when ``n`` is None, else an int64 tensor of ``n``
            indices on the sampler's device. Either way the stream advances by
            the number of draws, and ``draw()`` k times gives the same indices
            as ``draw(k)``.
        """
        if n is None:
            try:
                return self._buffer.pop()
            except IndexError:
                return self._refill().pop()
        if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 0:
            raise ValueError(f"n must be a non-negative integer or None, got {n!r}")
        start = self.num_drawn
        out = ops.alias_draw(self._table, int(n), self._seed, start)
        self._buffer = []  # those draws were just returned in `out` (or come after them)
        self._stream_end = start + int(n)
        return out

    def _refill(self) -> List[int]:
        start = self._stream_end  # the buffer is empty: every buffered draw was taken
        draws = ops.alias_draw(self._table, self._buffer_size, self._seed, start).tolist()
        draws.reverse()  # list.pop() takes from the end
        self._buffer = draws
        self._stream_end = start + self._buffer_size
        return draws

    # ------------------------------------------------------------------ properties
    @property
    def num_drawn(self) -> int:
        """Number of draws taken so far (buffered but untaken draws do not count)."""
        return self._stream_end - len(self._buffer)

    @property
    def num_items(self) -> int:
        """Size of the pool."""
        return int(self._weights.numel())

    @property
    def seed(self) -> int:
        """Key of the random stream."""
        return self._seed

    @property
    def device(self) -> torch.device:
        """Device of the table and of ``draw(n)`` results."""
        return self._device

    @property
    def weights(self) -> torch.Tensor:
        """The pool's weights as given (float64 CPU tensor)."""
        return self._weights

    @property
    def table(self) -> torch.Tensor:
        """The packed alias table (int64, on the sampler's device)."""
        return self._table

    def table_digest(self) -> str:
        """SHA-256 of the packed table: equal digests mean equal draw sequences for a seed."""
        if self._table_digest is None:
            self._table_digest = hashlib.sha256(self._table.cpu().numpy().tobytes()).hexdigest()
        return self._table_digest

    # ------------------------------------------------------------------ state
    def state_dict(self) -> Dict[str, Any]:
        """Everything needed to continue the exact sequence elsewhere.

        Returns:
            Dict with the sampler name, seed, number of draws taken, weights,
            options and the table digest (used to verify the rebuilt table).
        """
        return {
            "sampler": self.name,
            "format": STATE_FORMAT,
            "seed": self._seed,
            "num_drawn": self.num_drawn,
            "weights": self._weights.clone(),
            "options": self._options(),
            "table_sha256": self.table_digest(),
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restores a state from :meth:`state_dict`; the next draws continue its sequence.

        Args:
            state: A dict returned by :meth:`state_dict` of the same kind of sampler.

        Raises:
            ValueError: The state belongs to another sampler or format, or the
                rebuilt table differs from the saved one (the sequence would differ).
        """
        missing = {"sampler", "format", "seed", "num_drawn", "weights", "options", "table_sha256"} - set(state)
        if missing:
            raise ValueError(f"sampler state is missing {sorted(missing)}; pass a dict from Sampler.state_dict()")
        if state["sampler"] != self.name:
            raise ValueError(
                f"sampler state is for {state['sampler']!r}, this sampler is {self.name!r}; "
                f"create it with create_sampler({state['sampler']!r}, ...)"
            )
        if state["format"] != STATE_FORMAT:
            raise ValueError(f"sampler state format {state['format']} is not supported (expected {STATE_FORMAT})")
        num_drawn = int(state["num_drawn"])
        if num_drawn < 0:
            raise ValueError(f"sampler state has a negative draw count ({num_drawn})")
        before = dict(self.__dict__)  # a failed load leaves the sampler as it was
        try:
            self._load_options(dict(state["options"]))
            self._seed = int(state["seed"])
            self.set_weights(state["weights"])
            if self.table_digest() != state["table_sha256"]:
                raise ValueError(
                    "the alias table rebuilt from the saved weights differs from the saved one, so the "
                    "sequence would not continue exactly; was the state written by another bnao version?"
                )
        except Exception:
            self.__dict__.clear()
            self.__dict__.update(before)
            raise
        self._buffer = []
        self._stream_end = num_drawn

    def __repr__(self) -> str:
        options = "".join(f", {k}={v!r}" for k, v in self._options().items())
        return (
            f"{type(self).__name__}(num_items={self.num_items}{options}, seed={self._seed}, "
            f"device={str(self._device)!r}, num_drawn={self.num_drawn})"
        )
