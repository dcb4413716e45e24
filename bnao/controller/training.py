"""Training half of :class:`~bnao.controller.NAOController`: ``fit`` and what only it uses.

The controller's networks are trained jointly on (archs, normalised scores)
with NAO's swap augmentation, and the returned metrics rank the predictor and
score the decoder's reconstructions. The methods live on a mixin so that the
controller keeps one object (one generator, one optimizer) while this module
stays readable on its own.

Speed: the whole data set lives in tensors on the controller's device; an
epoch is a permutation and a loop over minibatch slices, with no per-sample
Python. Swap augmentation is one vectorised ``torch.where`` per epoch.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Dict, Optional

import numpy as np
import torch
import torch.nn.functional as F

from ..metrics import kendall_tau, pairwise_accuracy
from ._util import with_threads
from .steps import EpochSteps, graph_blocker, replays_any, set_capturable


class TrainingMixin:
    """``fit`` of :class:`~bnao.controller.NAOController` and its training helpers.

    Not usable on its own: it relies on the controller's ``space``, ``model``,
    ``device``, ``generator``, ``optimizer``, ``normalization`` and
    ``num_threads`` attributes and on its ``_make_optimizer`` and
    ``_encode_chunks`` methods.
    """

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

    # ---------------------------------------------------------------- training
    @with_threads
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
        graph: str = "auto",
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
            graph: ``"auto"``: on CUDA (without dropout) each minibatch is one replay of a captured CUDA graph
                (:mod:`~bnao.controller.steps`; Adam then runs with ``capturable=True``, the same update up to
                float rounding); ``"on"``: the same, an error where capture is impossible; ``"off"``: uncaptured.
                The result's ``graph`` says which ran and why.
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
            ``epochs``, ``seconds`` (wall time of the whole call),
            ``seconds_per_epoch`` (training epochs only) and ``graph`` (``{"mode", "reason"}``: how the
            minibatches ran).

        Raises:
            ValueError: Bad shapes, non-finite scores, fewer than 2 archs or a bad option.
        """
        arr = self.space.validate_array(archs)
        scores = np.asarray(scores, dtype=np.float64).reshape(-1)
        _check_fit_arguments(arr.shape[0], scores, epochs, batch_size, trade_off, expand, holdout)
        blocker = graph_blocker(graph, self.device, self.config["dropout"])
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

        rows = x_train.shape[0] * int(expand)
        if blocker is None and not replays_any(rows, batch_size, epochs):
            blocker = "every minibatch size runs once: nothing to replay"
        # Captured minibatches need Adam's step counts on the device (capturable); uncaptured ones keep the
        # default per-parameter Adam, the same code path on every device.
        capturable = blocker is None
        if reset_optimizer or self.optimizer is None:
            self.optimizer = self._make_optimizer(lr, weight_decay, capturable)
        else:
            for group in self.optimizer.param_groups:
                group["lr"] = lr
                group["weight_decay"] = weight_decay
            set_capturable(self.optimizer, capturable)
        t_train = time.perf_counter()
        steps = EpochSteps(self.model, self.optimizer, rows, x_train.shape[1], batch_size,
                           trade_off, grad_clip, self.device, self.generator, blocker)
        last = self._train_epochs(steps, x_train, y_train, epochs, int(expand) - 1, expand_redraw, progress)
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
                "graph": steps.describe(),
            }
        )
        return result

    def _train_epochs(self, steps: EpochSteps, x_train: torch.Tensor, y_train: torch.Tensor, epochs: int,
                      copies: int, expand_redraw: bool,
                      progress: Optional[Callable[[int, int, Dict[str, float]], None]]) -> Dict[str, float]:
        """The training epochs of :meth:`fit`, their minibatches run by ``steps``; returns the last epoch's mean
        ``loss``, ``mse`` and ``nll``."""
        last = {"loss": float("nan"), "mse": float("nan"), "nll": float("nan")}
        self.model.train()
        y_all = y_train.repeat(copies + 1)
        x_all = None
        for epoch in range(1, epochs + 1):
            if x_all is None or expand_redraw:
                x_all = torch.cat([x_train] + [self._swap_branches(x_train) for _ in range(copies)])
            perm = self._randperm(x_all.shape[0])
            sums = steps.run_epoch(x_all[perm], y_all[perm])
            if progress is not None or epoch == epochs:
                means = sums.cpu().numpy() / x_all.shape[0]
                last = {"loss": float(means[0]), "mse": float(means[1]), "nll": float(means[2])}
                if progress is not None:
                    progress(epoch, epochs, dict(last))
        self.model.eval()
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
