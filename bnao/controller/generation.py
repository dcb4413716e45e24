"""Generation half of :class:`~bnao.controller.NAOController`: new archs from seed archs.

The seeds' encoder outputs are moved uphill on the predictor's gradient with
growing step sizes and decoded (constrained greedy, so always valid) until
enough archs not seen before are found. The methods live on a mixin so that the
controller keeps one object while this module stays readable on its own.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Iterable, Optional, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

from ._util import CHUNK_ROWS, with_threads
from .encoder import arch_embedding

HashesLike = Union[np.ndarray, Iterable[int], None]


class GenerationMixin:
    """``generate`` of :class:`~bnao.controller.NAOController` and its helpers.

    Not usable on its own: it relies on the controller's ``space``, ``model``,
    ``device`` and ``num_threads`` attributes.
    """

    @with_threads
    def generate(
        self,
        seeds: np.ndarray,
        num_new: int,
        *,
        exclude_hashes: HashesLike = None,
        eta_start: float = 1.0,
        eta_step: float = 1.0,
        eta_growth: float = 1.0,
        max_rounds: int = 51,
        accept: Optional[Callable[[np.ndarray], np.ndarray]] = None,
        return_info: bool = False,
    ) -> Union[np.ndarray, Tuple[np.ndarray, Dict[str, Any]]]:
        """New archs by moving the seeds' encoder outputs uphill on the predictor.

        For every seed, ``h' = normalize(h + eta * d pred / d h)`` per encoder
        step, the arch embedding is the normalised mean of ``h'``, and the
        decoder decodes it (constrained greedy, so always valid). Round ``r``
        uses ``eta_r``, with ``eta_1 = eta_start`` and
        ``eta_{r+1} = eta_r * eta_growth + eta_step``. A decoded arch is
        accepted when its canonical hash is in neither ``exclude_hashes``, the
        seeds, nor the archs accepted so far; rounds go on until ``num_new``
        are accepted or ``max_rounds`` rounds ran. Within a round archs are
        taken in seed order (give the seeds best first, as NAO does).

        The defaults are NAO's (and the Balanced NAO reference's): step sizes
        1, 2, 3, ... and the loop stops after step size 51
        (``max_step_size = 50`` with the check after the round).

        Args:
            seeds: ``[k, 8B]`` seed archs (NAO: the top 100 by score).
            num_new: How many new archs to return.
            exclude_hashes: Canonical hashes (``space.hash_array``) that do not
                count as new: a ``uint64`` array or any iterable of ints (the
                whole pool, usually).
            eta_start: Step size of the first round.
            eta_step: Added to the step size after each round.
            eta_growth: Multiplies the step size after each round (1 = linear).
            max_rounds: Upper bound on rounds.
            accept: Optional filter (e.g. a size budget): ``accept(archs [n, 8B]) -> bool [n]``. A
                decoded arch it rejects is not taken, and rounds go on (up to ``max_rounds``) to find others.
            return_info: Also return a dict of details.

        Returns:
            ``[m, 8B]`` int64 archs, ``m <= num_new``, in the order found; ``m``
            is smaller than ``num_new`` only when ``max_rounds`` ran out (no
            warning is issued; check ``len``). With ``return_info``, a tuple
            ``(archs, info)``: ``info`` has ``count`` (m), ``rounds`` (rounds
            run), ``eta`` (the last step size), ``etas`` (``[m]`` step size at
            which each arch was found), ``seed_index`` (``[m]`` index of the
            seed it came from) and ``rejected`` (distinct new archs ``accept`` turned down).
        """
        seed_arr = self.space.validate_array(seeds)
        if num_new < 0:
            raise ValueError(f"num_new must be >= 0, got {num_new}")
        if seed_arr.shape[0] == 0 and num_new > 0:
            raise ValueError("generate needs at least one seed arch")
        excl = _as_hash_array(exclude_hashes)
        excl = np.union1d(excl, self.space.hash_array(seed_arr))  # sorted, unique

        found_archs, found_hashes, found_eta, found_seed = [], np.zeros(0, np.uint64), [], []
        rejected_hashes = np.zeros(0, np.uint64)
        rounds = 0
        eta = float(eta_start)
        if num_new > 0:
            out_all, grad_all = self._encoder_outputs_and_gradients(seed_arr)
            have = 0
            while have < num_new and rounds < max_rounds:
                rounds += 1
                if rounds > 1:
                    eta = eta * eta_growth + eta_step
                cand = self._decode_moved(out_all, grad_all, eta)
                hashes = self.space.hash_array(cand)
                fresh = ~_member(hashes, excl) & ~np.isin(hashes, found_hashes)
                if accept is not None and fresh.any():
                    allowed = np.zeros_like(fresh)
                    allowed[fresh] = np.asarray(accept(cand[fresh]), dtype=bool)
                    # Distinct archs turned down over all rounds (an arch is often decoded again).
                    rejected_hashes = np.union1d(rejected_hashes, hashes[fresh & ~allowed])
                    fresh &= allowed
                idx = np.flatnonzero(fresh)
                # First occurrence of each hash, in seed order.
                _, first = np.unique(hashes[idx], return_index=True)
                idx = idx[np.sort(first)][: num_new - have]
                if idx.size:
                    found_archs.append(cand[idx])
                    found_hashes = np.concatenate((found_hashes, hashes[idx]))
                    found_eta.append(np.full(idx.size, eta))
                    found_seed.append(idx)
                    have += idx.size

        length = self.space.length
        result = np.concatenate(found_archs) if found_archs else np.zeros((0, length), dtype=np.int64)
        if not return_info:
            return result
        info = {
            "count": int(result.shape[0]),
            "rounds": rounds,
            "eta": eta,
            "etas": np.concatenate(found_eta) if found_eta else np.zeros(0),
            "seed_index": np.concatenate(found_seed) if found_seed else np.zeros(0, dtype=np.int64),
            "rejected": int(rejected_hashes.size),
        }
        return result, info

    def _encoder_outputs_and_gradients(self, seed_arr: np.ndarray) -> Tuple[torch.Tensor, torch.Tensor]:
        """The seeds' encoder outputs and the predictor's gradient with respect to them (in chunks)."""
        tokens = torch.from_numpy(self.space.encode(seed_arr)).to(self.device)
        self.model.eval()
        outs, grads = [], []
        for s in range(0, tokens.shape[0], CHUNK_ROWS):
            with torch.no_grad():
                out, _ = self.model.encoder(tokens[s : s + CHUNK_ROWS])
            out = out.detach().requires_grad_(True)
            with torch.enable_grad():
                pred = self.model.predictor(arch_embedding(out))
                (grad,) = torch.autograd.grad(pred.sum(), out)
            outs.append(out.detach())
            grads.append(grad)
        return torch.cat(outs), torch.cat(grads)

    @torch.no_grad()
    def _decode_moved(self, out_all: torch.Tensor, grad_all: torch.Tensor, eta: float) -> np.ndarray:
        """Archs decoded (constrained greedy) from the encoder outputs moved by ``eta`` along the gradient."""
        decoded = []
        for s in range(0, out_all.shape[0], CHUNK_ROWS):
            moved = F.normalize(out_all[s : s + CHUNK_ROWS] + eta * grad_all[s : s + CHUNK_ROWS], p=2, dim=-1)
            decoded.append(self.model.decoder.greedy(arch_embedding(moved), moved))
        return self.space.decode(torch.cat(decoded).cpu().numpy())


def _as_hash_array(hashes: HashesLike) -> np.ndarray:
    """Hashes as a sorted unique ``uint64`` array (Python ints >= 2**63 are fine)."""
    if hashes is None:
        return np.zeros(0, dtype=np.uint64)
    if isinstance(hashes, np.ndarray):
        return np.unique(hashes.astype(np.uint64, copy=False).reshape(-1))
    return np.unique(np.fromiter((int(h) for h in hashes), dtype=np.uint64))


def _member(values: np.ndarray, sorted_set: np.ndarray) -> np.ndarray:
    """``np.isin`` against a sorted unique array in O(k log N): no re-sort of a million-arch pool per round."""
    if sorted_set.size == 0:
        return np.zeros(values.shape, dtype=bool)
    pos = np.minimum(np.searchsorted(sorted_set, values), sorted_set.size - 1)
    return sorted_set[pos] == values
