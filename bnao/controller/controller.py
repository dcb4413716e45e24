"""The NAO controller: encoder, performance predictor and decoder, trained jointly (SPEC section 5).

:class:`NAOController` wraps the three networks with what a search needs:
``fit`` on (archs, one-shot accuracies), ``predict``, ``generate`` new archs by
gradient steps in the embedding space, and a ``state_dict`` that resumes a
search exactly.

Speed: the whole data set lives in tensors on the controller's device; an
epoch is a permutation and a loop over minibatch slices, with no per-sample
Python. Swap augmentation is one vectorised ``torch.where`` per epoch.
"""

from __future__ import annotations

import functools
import time
from typing import Any, Callable, Dict, Iterable, Optional, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..metrics import kendall_tau, pairwise_accuracy
from ..space import NAOSpace
from .decoder import Decoder
from .encoder import Encoder, arch_embedding
from .predictor import Predictor

_STATE_FORMAT = "bnao.controller/1"

# Rows per forward pass in predict/generate/evaluation: bounds memory for pools of millions.
_CHUNK = 4096

HashesLike = Union[np.ndarray, Iterable[int], None]


def _with_threads(method):
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


class _NAOModel(nn.Module):
    """Encoder, predictor and decoder under one module (one state dict, one optimizer)."""

    def __init__(self, space: NAOSpace, embedding_size: int, hidden_size: int, mlp_layers: int, mlp_hidden: int, dropout: float):
        super().__init__()
        low, high = space.token_bounds()
        self.encoder = Encoder(space.vocab_size, space.length, embedding_size, hidden_size, dropout)
        self.predictor = Predictor(hidden_size, mlp_layers, mlp_hidden, dropout)
        self.decoder = Decoder(space.vocab_size, space.length, hidden_size, low, high, dropout)

    def reset_parameters(self, generator: torch.Generator) -> None:
        self.encoder.reset_parameters(generator)
        self.predictor.reset_parameters(generator)
        self.decoder.reset_parameters(generator)


class NAOController:
    """Encoder / performance predictor / decoder of NAO for one search space.

    Args:
        space: The search space (its token encoding and bounds).
        embedding_size: Token embedding width of the encoder (NAO: 32).
        hidden_size: LSTM width of encoder and decoder (NAO: 64).
        mlp_layers: Hidden layers of the predictor (NAO: 0).
        mlp_hidden: Width of the predictor's hidden layers.
        dropout: Dropout on token embeddings and predictor hidden layers (NAO: 0).
        device: Torch device of the networks and the training data.
        seed: Seeds the controller's own ``torch.Generator`` (init, holdout
            split, shuffling, swap augmentation, dropout); the global torch RNG
            is neither used nor advanced.
        num_threads: If set, ``fit``/``predict``/``reconstruct``/``generate``
            run with ``torch.set_num_threads(num_threads)`` and restore the
            previous value afterwards. The kernels are small (batch 100, width
            64): one thread loses little, and on a shared CPU it avoids
            OpenMP threads spinning against other processes (measured 13x
            faster wall time on a loaded 2-core machine).
    """

    def __init__(
        self,
        space: NAOSpace,
        *,
        embedding_size: int = 32,
        hidden_size: int = 64,
        mlp_layers: int = 0,
        mlp_hidden: int = 64,
        dropout: float = 0.0,
        device: Union[str, torch.device] = "cpu",
        seed: int = 0,
        num_threads: Optional[int] = None,
    ):
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.space = space
        self.config: Dict[str, Any] = {
            "space": dict(space.config()),
            "embedding_size": int(embedding_size),
            "hidden_size": int(hidden_size),
            "mlp_layers": int(mlp_layers),
            "mlp_hidden": int(mlp_hidden),
            "dropout": float(dropout),
            "seed": int(seed),
        }
        self.device = torch.device(device)
        if num_threads is not None and num_threads < 1:
            raise ValueError(f"num_threads must be >= 1, got {num_threads}")
        self.num_threads = num_threads
        # A CPU generator: the same draws on every device, and its state is portable.
        self.generator = torch.Generator(device="cpu")
        self.generator.manual_seed(int(seed))
        # nn.Module constructors draw their default init from the global RNG; fork it so that
        # building a controller leaves the caller's RNG untouched, then re-draw from our generator.
        with torch.random.fork_rng(devices=[]):
            model = _NAOModel(space, embedding_size, hidden_size, mlp_layers, mlp_hidden, dropout)
        model.reset_parameters(self.generator)
        self.model = model.to(self.device)
        self.optimizer: Optional[torch.optim.Adam] = None
        # (min, max) of the raw scores of the last fit: NAO's min-max normalisation.
        self.normalization: Optional[Tuple[float, float]] = None
        self._low, self._high = space.token_bounds()

    # ------------------------------------------------------------------ helpers
    def _tokens(self, archs: np.ndarray) -> torch.Tensor:
        arr = self.space.validate_array(archs)
        return torch.from_numpy(self.space.encode(arr)).to(self.device)

    def _randperm(self, n: int) -> torch.Tensor:
        return torch.randperm(n, generator=self.generator).to(self.device)

    def _swap_branches(self, tokens: torch.Tensor) -> torch.Tensor:
        """A copy with the two branches of one random node per cell swapped (NAO's augmentation).

        Swapping branches gives the same architecture (node output = x + y), so
        the copy keeps the score. The node of each cell is drawn uniformly; when
        its two branches are equal the copy equals the original.
        """
        n = tokens.shape[0]
        b = self.space.num_nodes
        node = torch.randint(b, (n, 2), generator=self.generator).to(self.device)
        chosen = F.one_hot(node, b).bool()[:, :, :, None, None]  # [n, cell, node, 1, 1]
        view = tokens.reshape(n, 2, b, 2, 2)  # [n, cell, node, branch, (id, op)]
        return torch.where(chosen, view.flip(3), view).reshape(n, -1)

    def _normalize(self, scores: np.ndarray) -> np.ndarray:
        lo, hi = self.normalization
        if hi > lo:
            return (scores - lo) / (hi - lo)
        # All scores equal: nothing to rank; the midpoint keeps the sigmoid unsaturated.
        return np.full_like(scores, 0.5)

    def _make_optimizer(self, lr: float, weight_decay: float) -> torch.optim.Adam:
        # foreach=False: the per-parameter loop measured as fast for these ~77k parameters on CPU,
        # and it is the same code path on every device.
        return torch.optim.Adam(self.model.parameters(), lr=lr, weight_decay=weight_decay, foreach=False)

    @torch.no_grad()
    def _encode_chunks(self, tokens: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Predicted scores and greedy reconstructions of ``tokens`` (eval mode, chunked)."""
        preds, decoded = [], []
        for s in range(0, tokens.shape[0], _CHUNK):
            out, emb = self.model.encoder(tokens[s : s + _CHUNK])
            preds.append(self.model.predictor(emb))
            decoded.append(self.model.decoder.greedy(emb, out))
        return torch.cat(preds), torch.cat(decoded)

    # ---------------------------------------------------------------- training
    @_with_threads
    def fit(
        self,
        archs: np.ndarray,
        scores: np.ndarray,
        *,
        epochs: int = 1000,
        batch_size: int = 100,
        lr: float = 1e-3,
        trade_off: float = 0.8,
        expand: int = 10,
        expand_redraw: bool = False,
        grad_clip: float = 5.0,
        holdout: float = 0.1,
        weight_decay: float = 0.0,
        reset_optimizer: bool = True,
        progress: Optional[Callable[[int, int, Dict[str, float]], None]] = None,
    ) -> Dict[str, Any]:
        """Trains encoder, predictor and decoder jointly on (archs, raw accuracies).

        Scores are min-max normalised to [0, 1] over all the given archs, as NAO
        does; the (min, max) pair is kept (``normalization``) for
        ``predict(raw=True)``. A random ``holdout`` fraction is kept out of
        training and used for the returned metrics (NAO's 90/10 split); when it
        has fewer than 2 archs the metrics are measured on the training archs
        (``eval_set`` says which). Augmentation as the reference's
        ``controller_expand``: the training archs plus ``expand - 1`` copies of
        them, each with the two branches of one random node per cell swapped
        (same arch, same score), drawn once before training, so an epoch has
        ``expand`` times the training archs (``expand_redraw`` draws the copies
        afresh every epoch instead). Loss =
        ``trade_off * MSE + (1 - trade_off) * NLL``; Adam; gradient-norm clip.

        The networks keep their weights across calls (NAO trains one controller
        through the whole search). NAO builds a new Adam for every training
        round: ``reset_optimizer=True`` (default) does the same;
        ``reset_optimizer=False`` continues the previous Adam state.

        Args:
            archs: ``[n, 8B]`` archs, ``n >= 2``.
            scores: ``[n]`` raw scores (e.g. one-shot accuracies), higher is better.
            epochs: Passes over the (augmented) training archs (NAO: 1000).
            batch_size: Minibatch size (NAO: 100).
            lr: Adam learning rate (NAO: 1e-3).
            trade_off: lambda of the loss (NAO: 0.8).
            expand: Copies of the training archs per epoch, the original included (reference: 10; 1: none).
            expand_redraw: Draw the swapped copies again every epoch (default: once, as the reference).
            grad_clip: Max global gradient norm (NAO: 5); ``<= 0`` disables clipping.
            holdout: Fraction of archs held out for the metrics, in ``[0, 1)``.
            weight_decay: Adam weight decay (L2).
            reset_optimizer: Start a fresh Adam (NAO) instead of continuing the last one.
            progress: Called after every epoch as ``progress(epoch, epochs, {"loss", "mse", "nll"})``
                (epoch counts from 1).

        Returns:
            A dict: ``loss``, ``mse``, ``nll`` (means over the last epoch);
            ``pairwise_accuracy`` and ``kendall_tau`` of the predictor against
            the normalised scores of the evaluation set; ``reconstruction_exact``
            (fraction of archs decoded to exactly their token sequence),
            ``reconstruction_token`` (fraction of tokens) and
            ``reconstruction_same_arch`` (decoded arch equal up to branch swaps);
            ``eval_set`` ("holdout" or "train"); ``num_train``, ``num_holdout``,
            ``epochs``, ``seconds`` (wall time of the whole call) and
            ``seconds_per_epoch`` (training epochs only).

        Raises:
            ValueError: Bad shapes, non-finite scores, fewer than 2 archs or a bad option.
        """
        arr = self.space.validate_array(archs)
        scores = np.asarray(scores, dtype=np.float64).reshape(-1)
        _check_fit_arguments(arr.shape[0], scores, epochs, batch_size, trade_off, expand, holdout)
        n = arr.shape[0]
        t_start = time.perf_counter()

        self.normalization = (float(scores.min()), float(scores.max()))
        target_all = torch.from_numpy(self._normalize(scores)).float().to(self.device)
        tokens_all = torch.from_numpy(self.space.encode(arr)).to(self.device)

        num_holdout = int(round(n * holdout))
        num_holdout = min(num_holdout, n - 1)
        split = self._randperm(n)
        train_idx, hold_idx = split[num_holdout:], split[:num_holdout]
        x_train, y_train = tokens_all[train_idx], target_all[train_idx]

        if reset_optimizer or self.optimizer is None:
            self.optimizer = self._make_optimizer(lr, weight_decay)
        else:
            for group in self.optimizer.param_groups:
                group["lr"] = lr
                group["weight_decay"] = weight_decay
        t_train = time.perf_counter()
        last = self._train_epochs(x_train, y_train, epochs, batch_size, trade_off, int(expand) - 1, expand_redraw,
                                  grad_clip, progress)
        train_seconds = time.perf_counter() - t_train

        eval_set = "holdout" if num_holdout >= 2 else "train"
        eval_idx = hold_idx if eval_set == "holdout" else train_idx
        metrics = self._evaluate(tokens_all[eval_idx], target_all[eval_idx])
        result: Dict[str, Any] = dict(last)
        result.update(metrics)
        result.update(
            {
                "eval_set": eval_set,
                "num_train": int(train_idx.shape[0]),
                "num_holdout": int(num_holdout),
                "epochs": int(epochs),
                "seconds": time.perf_counter() - t_start,
                "seconds_per_epoch": train_seconds / epochs if epochs else 0.0,
            }
        )
        return result

    def _train_epochs(self, x_train: torch.Tensor, y_train: torch.Tensor, epochs: int, batch_size: int,
                      trade_off: float, copies: int, expand_redraw: bool, grad_clip: float,
                      progress: Optional[Callable[[int, int, Dict[str, float]], None]]) -> Dict[str, float]:
        """The training epochs of :meth:`fit`; returns the last epoch's mean ``loss``, ``mse`` and ``nll``."""
        opt = self.optimizer
        model = self.model
        params = list(model.parameters())
        gen = self.generator
        last = {"loss": float("nan"), "mse": float("nan"), "nll": float("nan")}
        model.train()
        y_all = y_train.repeat(copies + 1)
        x_all = None
        for epoch in range(1, epochs + 1):
            if x_all is None or expand_redraw:
                x_all = torch.cat([x_train] + [self._swap_branches(x_train) for _ in range(copies)])
            x, y = x_all, y_all
            m = x.shape[0]
            perm = self._randperm(m)
            x, y = x[perm], y[perm]
            loss_sum = torch.zeros((), device=self.device)
            mse_sum = torch.zeros((), device=self.device)
            nll_sum = torch.zeros((), device=self.device)
            for s in range(0, m, batch_size):
                xb, yb = x[s : s + batch_size], y[s : s + batch_size]
                out, emb = model.encoder(xb, gen)
                pred = model.predictor(emb, gen)
                log_probs = model.decoder(xb, emb, out, gen)
                mse = F.mse_loss(pred, yb)
                nll = F.nll_loss(log_probs.reshape(-1, log_probs.shape[-1]), xb.reshape(-1))
                loss = trade_off * mse + (1.0 - trade_off) * nll
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if grad_clip > 0:
                    nn.utils.clip_grad_norm_(params, grad_clip)
                opt.step()
                # Accumulate on the device: no host sync per minibatch.
                nb = xb.shape[0]
                loss_sum = loss_sum + loss.detach() * nb
                mse_sum = mse_sum + mse.detach() * nb
                nll_sum = nll_sum + nll.detach() * nb
            if progress is not None or epoch == epochs:
                sums = torch.stack((loss_sum, mse_sum, nll_sum)).cpu().numpy() / m
                last = {"loss": float(sums[0]), "mse": float(sums[1]), "nll": float(sums[2])}
                if progress is not None:
                    progress(epoch, epochs, dict(last))
        model.eval()
        return last

    def _evaluate(self, tokens: torch.Tensor, targets: torch.Tensor) -> Dict[str, float]:
        """Predictor ranking and decoder reconstruction on ``tokens`` (normalised ``targets``)."""
        pred, decoded = self._encode_chunks(tokens)
        pred_np = pred.cpu().numpy().astype(np.float64)
        true_np = targets.cpu().numpy().astype(np.float64)
        decoded_np = decoded.cpu().numpy()
        tokens_np = tokens.cpu().numpy()
        same_tokens = decoded_np == tokens_np
        same_arch = self.space.hash_array(self.space.decode(decoded_np)) == self.space.hash_array(self.space.decode(tokens_np))
        n = tokens_np.shape[0]
        return {
            "pairwise_accuracy": pairwise_accuracy(true_np, pred_np) if n >= 2 else float("nan"),
            "kendall_tau": kendall_tau(true_np, pred_np) if n >= 2 else float("nan"),
            "reconstruction_exact": float(same_tokens.all(axis=1).mean()),
            "reconstruction_token": float(same_tokens.mean()),
            "reconstruction_same_arch": float(same_arch.mean()),
        }

    # --------------------------------------------------------------- inference
    @_with_threads
    @torch.no_grad()
    def predict(self, archs: np.ndarray, *, raw: bool = False) -> np.ndarray:
        """Predicted scores of archs.

        Args:
            archs: ``[n, 8B]`` archs (or one arch).
            raw: Map back to the scale of the scores of the last ``fit``
                (``min + p * (max - min)``) instead of the normalised [0, 1].

        Returns:
            ``[n]`` float64 scores: in [0, 1] (normalised), or raw.
        """
        tokens = self._tokens(archs)
        self.model.eval()
        preds = []
        for s in range(0, tokens.shape[0], _CHUNK):
            _, emb = self.model.encoder(tokens[s : s + _CHUNK])
            preds.append(self.model.predictor(emb))
        p = torch.cat(preds).cpu().numpy().astype(np.float64) if preds else np.zeros(0)
        if raw:
            if self.normalization is None:
                raise RuntimeError("predict(raw=True) needs a fitted controller (no score range yet)")
            lo, hi = self.normalization
            p = lo + p * (hi - lo)
        return p

    @_with_threads
    def reconstruct(self, archs: np.ndarray) -> np.ndarray:
        """Encodes and greedily decodes archs (no embedding move): ``[n, 8B]`` archs."""
        tokens = self._tokens(archs)
        self.model.eval()
        _, decoded = self._encode_chunks(tokens)
        return self.space.decode(decoded.cpu().numpy())

    @_with_threads
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
        for s in range(0, tokens.shape[0], _CHUNK):
            with torch.no_grad():
                out, _ = self.model.encoder(tokens[s : s + _CHUNK])
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
        for s in range(0, out_all.shape[0], _CHUNK):
            moved = F.normalize(out_all[s : s + _CHUNK] + eta * grad_all[s : s + _CHUNK], p=2, dim=-1)
            decoded.append(self.model.decoder.greedy(arch_embedding(moved), moved))
        return self.space.decode(torch.cat(decoded).cpu().numpy())

    # ------------------------------------------------------------- persistence
    def state_dict(self) -> Dict[str, Any]:
        """Everything a resumed search needs: config, weights, Adam state, normalisation, RNG.

        Tensors are moved to the CPU so that the dict loads on any device.
        """
        return {
            "format": _STATE_FORMAT,
            "config": {k: (dict(v) if isinstance(v, dict) else v) for k, v in self.config.items()},
            "model": {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()},
            "optimizer": _to_cpu(self.optimizer.state_dict()) if self.optimizer is not None else None,
            "normalization": self.normalization,
            "generator": self.generator.get_state(),
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restores a :meth:`state_dict`; the controller must have been built with the same config.

        The seed may differ (the generator state is restored from ``state``).

        Raises:
            ValueError: A foreign dict or a different architecture/space config.
        """
        if state.get("format") != _STATE_FORMAT:
            raise ValueError(f"not a controller state (format {state.get('format')!r}, expected {_STATE_FORMAT!r})")
        ours = {k: v for k, v in self.config.items() if k != "seed"}
        theirs = {k: v for k, v in state["config"].items() if k != "seed"}
        if ours != theirs:
            diff = sorted(k for k in set(ours) | set(theirs) if ours.get(k) != theirs.get(k))
            raise ValueError(f"controller config differs from the saved one in: {', '.join(diff)}")
        self.model.load_state_dict(state["model"])
        if state["optimizer"] is not None:
            self.optimizer = self._make_optimizer(1e-3, 0.0)
            # Adam casts its state to the parameters' device on load.
            self.optimizer.load_state_dict(state["optimizer"])
        else:
            self.optimizer = None
        norm = state["normalization"]
        self.normalization = None if norm is None else (float(norm[0]), float(norm[1]))
        self.generator.set_state(state["generator"])
        self.config["seed"] = state["config"]["seed"]

    def num_parameters(self) -> int:
        """Trainable parameters of encoder, predictor and decoder together."""
        return sum(p.numel() for p in self.model.parameters())

    def __repr__(self) -> str:
        cfg = ", ".join(f"{k}={v}" for k, v in self.config.items() if k != "space")
        return f"NAOController({self.space!r}, {cfg}, device={str(self.device)!r})"


def _check_fit_arguments(n: int, scores: np.ndarray, epochs: int, batch_size: int, trade_off: float, expand: int,
                         holdout: float) -> None:
    """Raises ValueError for arguments :meth:`NAOController.fit` cannot train with."""
    if scores.shape[0] != n:
        raise ValueError(f"{n} archs but {scores.shape[0]} scores")
    if n < 2:
        raise ValueError(f"the controller needs at least 2 archs to train, got {n}")
    if not np.isfinite(scores).all():
        raise ValueError("scores must be finite")
    if not 0.0 <= holdout < 1.0:
        raise ValueError(f"holdout must be in [0, 1), got {holdout}")
    if not 0.0 <= trade_off <= 1.0:
        raise ValueError(f"trade_off must be in [0, 1], got {trade_off}")
    if isinstance(expand, bool) or int(expand) != expand or expand < 1:
        raise ValueError(f"expand must be an integer >= 1 (copies of the training archs), got {expand!r}")
    if epochs < 0 or batch_size < 1:
        raise ValueError(f"need epochs >= 0 and batch_size >= 1, got {epochs} and {batch_size}")


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


def _to_cpu(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu().clone()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_to_cpu(v) for v in obj]
    return obj
