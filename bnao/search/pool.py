"""The architecture pool of a search: integer arrays, not Python objects.

A pool of a million archs is a few flat numpy arrays (archs as ``int8``
``[n, 8B]``, canonical hashes, model sizes, the iteration each arch joined,
one-shot scores per iteration, predicted scores), so that adding, hashing,
sizing and sampling stay vectorised and the memory stays small (~60 bytes an
arch for B=5).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Tuple

import numpy as np

from ..safe_io import atomic_write_lines
from ..space import InvalidArchError, NAOSpace


class PoolFileError(ValueError):
    """A pool file holds an invalid line (its line number is in the message)."""


@dataclass
class Pool:
    """Architectures of a search and everything measured about them.

    Attributes:
        space: The search space of the archs.
        archs: ``int8 [n, 8B]`` architectures.
        hashes: ``uint64 [n]`` canonical hashes (unique within the pool).
        sizes: ``int64 [n]`` model sizes (the sampler's weights).
        born: ``int16 [n]`` iteration at which each arch joined.
        scores: one-shot accuracy per search iteration, ``float32 [n_at_that_time]``.
        predicted: ``float32 [n]`` latest controller prediction (NaN before any).
    """

    space: NAOSpace
    archs: np.ndarray
    hashes: np.ndarray
    sizes: np.ndarray
    born: np.ndarray
    scores: List[np.ndarray] = field(default_factory=list)
    predicted: Optional[np.ndarray] = None

    # ------------------------------------------------------------ creation
    @classmethod
    def empty(cls, space: NAOSpace) -> "Pool":
        return cls(
            space=space,
            archs=np.zeros((0, space.length), dtype=np.int8),
            hashes=np.zeros(0, dtype=np.uint64),
            sizes=np.zeros(0, dtype=np.int64),
            born=np.zeros(0, dtype=np.int16),
            predicted=np.zeros(0, dtype=np.float32),
        )

    def __len__(self) -> int:
        return int(self.archs.shape[0])

    def add(self, archs: np.ndarray, sizes: np.ndarray, iteration: int) -> np.ndarray:
        """Adds archs not yet in the pool (by canonical hash); returns the indices of those added.

        Args:
            archs: ``[k, 8B]`` integer archs (validated by the caller).
            sizes: ``[k]`` model sizes of ``archs``.
            iteration: Search iteration the archs join at.
        """
        archs = np.asarray(archs, dtype=np.int64)
        if archs.ndim != 2 or archs.shape[1] != self.space.length:
            raise ValueError(f"archs must have shape [k, {self.space.length}] (8B integers each), got {archs.shape}")
        sizes = np.asarray(sizes, dtype=np.int64).reshape(-1)
        if archs.shape[0] != sizes.shape[0]:
            raise ValueError(f"{archs.shape[0]} archs but {sizes.shape[0]} sizes")
        hashes = self.space.hash_array(archs)
        # Keep the first occurrence of each hash among the new ones and drop those already present.
        _, first = np.unique(hashes, return_index=True)
        first.sort()
        keep = first[~np.isin(hashes[first], self.hashes)]
        start = len(self)
        self.archs = np.concatenate([self.archs, archs[keep].astype(np.int8)])
        self.hashes = np.concatenate([self.hashes, hashes[keep]])
        self.sizes = np.concatenate([self.sizes, sizes[keep]])
        self.born = np.concatenate([self.born, np.full(keep.size, iteration, dtype=np.int16)])
        self.predicted = np.concatenate([self.predicted, np.full(keep.size, np.nan, dtype=np.float32)])
        return np.arange(start, len(self))

    # -------------------------------------------------------------- scores
    def set_scores(self, iteration: int, scores: np.ndarray) -> None:
        """Records the one-shot scores of every arch of the pool at ``iteration``."""
        scores = np.asarray(scores, dtype=np.float32)
        if scores.shape != (len(self),):
            raise ValueError(f"expected {len(self)} scores, got {scores.shape}")
        while len(self.scores) <= iteration:
            self.scores.append(np.zeros(0, dtype=np.float32))
        self.scores[iteration] = scores

    def latest_scores(self) -> np.ndarray:
        """Scores of the last evaluated iteration (NaN for archs added since)."""
        out = np.full(len(self), np.nan, dtype=np.float32)
        for s in self.scores:
            if s.size:
                out[: s.size] = s
        return out

    def top(self, k: int, scores: Optional[np.ndarray] = None) -> np.ndarray:
        """Indices of the ``k`` best archs by ``scores`` (latest scores by default), best first."""
        scores = self.latest_scores() if scores is None else scores
        order = np.argsort(-np.nan_to_num(scores, nan=-np.inf), kind="stable")
        return order[:k]

    # ---------------------------------------------------------- persistence
    def state_dict(self) -> Dict[str, object]:
        return {
            "space": self.space.config(),
            "archs": self.archs.copy(),
            "hashes": self.hashes.copy(),
            "sizes": self.sizes.copy(),
            "born": self.born.copy(),
            "scores": [s.copy() for s in self.scores],
            "predicted": self.predicted.copy(),
        }

    def load_state_dict(self, state: Dict[str, object]) -> None:
        if state["space"] != self.space.config():
            raise ValueError(f"pool was saved for space {state['space']}, not {self.space.config()}")
        self.archs = np.asarray(state["archs"], dtype=np.int8)
        self.hashes = np.asarray(state["hashes"], dtype=np.uint64)
        self.sizes = np.asarray(state["sizes"], dtype=np.int64)
        self.born = np.asarray(state["born"], dtype=np.int16)
        self.scores = [np.asarray(s, dtype=np.float32) for s in state["scores"]]
        self.predicted = np.asarray(state["predicted"], dtype=np.float32)

    def iter_records(self, columns: Optional[Dict[str, np.ndarray]] = None) -> Iterator[Dict[str, object]]:
        """One JSON-ready record per arch (arch string, hash, size, scores per iteration, prediction).

        Args:
            columns: Extra integer columns (name -> ``[n]`` array), written after ``size``
                (the search's final-network sizes, which its budget is measured on).
        """
        columns = columns or {}
        padded = [np.concatenate([s, np.full(len(self) - s.size, np.nan, np.float32)]) for s in self.scores]
        score_matrix = np.stack(padded, axis=1) if padded else np.zeros((len(self), 0), np.float32)
        for i in range(len(self)):
            yield {
                "arch": " ".join(map(str, self.archs[i].tolist())),
                "hash": f"{int(self.hashes[i]):016x}",
                "size": int(self.sizes[i]),
                **{name: int(values[i]) for name, values in columns.items()},
                "iteration_added": int(self.born[i]),
                "one_shot": [None if np.isnan(v) else round(float(v), 6) for v in score_matrix[i]],
                "predicted": None if np.isnan(self.predicted[i]) else round(float(self.predicted[i]), 6),
            }

    def write_jsonl(self, path: str, columns: Optional[Dict[str, np.ndarray]] = None) -> None:
        """Writes the pool as JSON lines, atomically (``columns``: see :meth:`iter_records`)."""
        # Streamed (a pool of 1e6 is hundreds of MB of JSON); a failed write keeps the old file (FileWriteError).
        atomic_write_lines(path, (json.dumps(record) + "\n" for record in self.iter_records(columns)))


def read_pool_file(path: str, space: NAOSpace, skip_invalid: bool = False) -> Tuple[np.ndarray, List[str]]:
    """Reads archs, one per line (reference string form or JSON); ``#`` comments and blank lines skipped.

    Also reads the ``pool.jsonl`` of an earlier run (the ``"arch"`` field of each record).

    Returns:
        ``(archs [k, 8B] int64, problems)`` where ``problems`` lists the skipped lines.

    Raises:
        PoolFileError: a line is invalid and ``skip_invalid`` is False.
        FileNotFoundError: the file does not exist.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"pool file {path!r} does not exist")
    rows, problems = [], []
    with open(path, "rb") as fh:  # decoded per line: a non-UTF-8 line is one bad line, not a crash
        for lineno, raw in enumerate(fh, 1):
            try:
                text = raw.decode("utf-8").split("#", 1)[0].strip()
                if not text:
                    continue
                value = json.loads(text)["arch"] if text.startswith("{") and '"arch"' in text else text
                rows.append(space.arch(value).to_array())
            except (InvalidArchError, ValueError, KeyError, TypeError) as err:
                message = f"{path}:{lineno}: {err}"
                if not skip_invalid:
                    raise PoolFileError(message + " (pass --skip-invalid to skip such lines)") from None
                problems.append(message)
    if not rows:
        raise PoolFileError(f"{path}: no valid architecture found")
    return np.stack(rows), problems
