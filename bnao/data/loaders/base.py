"""What every loader shares: epochs, positions, seeds and resumable state.

A loader walks epochs. Epoch ``e``'s order is a permutation drawn from
``(seed, e)``; batch ``b`` of it takes positions ``[b*B, (b+1)*B)`` and draws
its augmentation from a generator seeded with ``(seed, e, b)``. Nothing
depends on global RNG state or on how many batches came before, so
``(seed, epoch, position)`` is the whole state: a loader restored from
:meth:`Loader.state_dict` yields exactly the batches that the original would
have yielded next (for the loaders that say so; see each loader).
"""

from __future__ import annotations

import abc
from typing import Any, Dict, Iterator, Tuple, Union

import torch

from ..augment import AugmentConfig, resolve_augment

Batch = Tuple[torch.Tensor, torch.Tensor]

_MASK64 = (1 << 64) - 1


def mix_seed(*parts: int) -> int:
    """Hashes integers into one 63-bit seed (splitmix64 finaliser per part).

    Nearby inputs ``(seed, epoch, batch)`` give unrelated seeds, so the streams
    of consecutive batches do not overlap the way ``seed + batch`` would.
    """
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h = (h ^ (int(p) & _MASK64)) & _MASK64
        h = (h + 0x9E3779B97F4A7C15) & _MASK64
        h = ((h ^ (h >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        h = ((h ^ (h >> 27)) * 0x94D049BB133111EB) & _MASK64
        h ^= h >> 31
    return h >> 1


def epoch_permutation(seed: int, epoch: int, n: int, shuffle: bool,
                      generator: torch.Generator) -> torch.Tensor:
    """Order of epoch ``epoch`` (int64 ``[n]`` on the generator's device)."""
    if not shuffle:
        return torch.arange(n, device=generator.device)
    generator.manual_seed(mix_seed(seed, epoch, -1))
    return torch.randperm(n, generator=generator, device=generator.device)


class Loader(abc.ABC):
    """Base class: iteration over epochs with resumable ``(seed, epoch, position)``.

    Subclasses implement :meth:`_batches`. Iterating yields the rest of the
    current epoch, from :attr:`position`, and then moves to the next epoch, so
    ``for x, y in loader`` once per epoch needs no :meth:`set_epoch`.

    Args:
        dataset: The dataset to load.
        batch_size: Images per batch.
        device: Where batches are delivered.
        augment: ``True``, ``False`` or an :class:`~bnao.data.AugmentConfig`.
        shuffle: Draw a new order each epoch (else dataset order).
        drop_last: Drop the last incomplete batch of an epoch.
        seed: Seed of orders and augmentation.
        channels_last: Deliver images in ``torch.channels_last`` memory format.
    """

    name = "base"
    #: Whether a restored loader reproduces augmentation exactly (order always is).
    exact_resume = True

    def __init__(self, dataset: Any, batch_size: int, *, device: Union[str, torch.device] = "cpu",
                 augment: Union[bool, AugmentConfig] = True, shuffle: bool = True,
                 drop_last: bool = True, seed: int = 0, channels_last: bool = False):
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.dataset = dataset
        self.batch_size = int(batch_size)
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.augment = resolve_augment(augment)
        self.shuffle = bool(shuffle)
        self.drop_last = bool(drop_last)
        self.seed = int(seed)
        self.channels_last = bool(channels_last)
        self.epoch = 0
        self.position = 0
        if len(self) == 0:
            raise ValueError(f"{len(dataset)} images make no batch of {batch_size} with drop_last")

    def __len__(self) -> int:
        n, b = len(self.dataset), self.batch_size
        return n // b if self.drop_last else -(-n // b)

    def set_epoch(self, epoch: int) -> None:
        """Starts epoch ``epoch`` from its first batch."""
        self.epoch, self.position = int(epoch), 0

    def __iter__(self) -> Iterator[Batch]:
        if self.position >= len(self):  # every batch was taken but the loop not closed
            self.epoch, self.position = self.epoch + 1, 0
        epoch = self.epoch
        for batch in self._batches(epoch, self.position):
            self.position += 1
            yield batch
        self.epoch, self.position = epoch + 1, 0

    def stream(self) -> Iterator[Batch]:
        """Endless batches across epochs (for step-based training loops)."""
        while True:
            yield from self

    def state_dict(self) -> Dict[str, Any]:
        """Seed, epoch and position within the epoch, plus what they assume."""
        return {"loader": self.name, "seed": self.seed, "epoch": self.epoch, "position": self.position,
                "batch_size": self.batch_size, "num_samples": len(self.dataset),
                "shuffle": self.shuffle, "drop_last": self.drop_last}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restores :meth:`state_dict`; the next batch is the one the saved loader would give.

        Raises:
            ValueError: The state was saved with another batch size, dataset
                size, shuffle or drop_last, so positions would not line up.
        """
        for key in ("batch_size", "num_samples", "shuffle", "drop_last"):
            mine = self.state_dict()[key]
            if key in state and state[key] != mine:
                raise ValueError(f"loader state has {key}={state[key]!r}, this loader {mine!r}")
        self.seed, self.epoch, self.position = int(state["seed"]), int(state["epoch"]), int(state["position"])

    def batch_range(self, b: int) -> Tuple[int, int]:
        """Positions ``[start, stop)`` of batch ``b`` in the epoch order."""
        start = b * self.batch_size
        return start, min(start + self.batch_size, len(self.dataset))

    @abc.abstractmethod
    def _batches(self, epoch: int, start: int) -> Iterator[Batch]:
        """Batches of ``epoch`` from batch index ``start`` on (each backend's own pipeline)."""

    def _deliver(self, x: torch.Tensor, y: torch.Tensor) -> Batch:
        """Moves to the device and sets the memory format."""
        x = x.to(self.device, non_blocking=True)
        y = y.to(self.device, non_blocking=True)
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        return x.contiguous(memory_format=fmt), y

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({getattr(self.dataset, 'name', '?')}, batch_size={self.batch_size}, "
                f"device={self.device}, epoch={self.epoch}, position={self.position})")


class LoaderUnavailableError(ImportError):
    """A loader's optional dependency (DALI) or hardware is missing."""
