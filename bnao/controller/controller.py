"""The NAO controller: encoder, performance predictor and decoder, trained jointly (SPEC section 5).

:class:`NAOController` wraps the three networks with what a search needs:
``fit`` on (archs, one-shot accuracies), ``predict``, ``generate`` new archs by
gradient steps in the embedding space, and a ``state_dict`` that resumes a
search exactly.

The methods are spread over modules by concern: training (``fit``) in
:mod:`.training`, generation (``generate``) in :mod:`.generation`, both mixed
into :class:`NAOController` here with construction, inference and persistence.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple, Union

import numpy as np
import torch
from torch import nn

from ..space import NAOSpace
from ._util import CHUNK_ROWS, with_threads
from .decoder import Decoder
from .encoder import Encoder
from .generation import GenerationMixin, HashesLike
from .predictor import Predictor
from .steps import make_adam
from .training import TrainingMixin

__all__ = ["HashesLike", "NAOController"]

_STATE_FORMAT = "bnao.controller/1"


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


class NAOController(TrainingMixin, GenerationMixin):
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

    def _make_optimizer(self, lr: float, weight_decay: float, capturable: bool = False) -> torch.optim.Adam:
        return make_adam(self.model.parameters(), lr, weight_decay, capturable)

    @torch.no_grad()
    def _encode_chunks(self, tokens: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Predicted scores and greedy reconstructions of ``tokens`` (eval mode, chunked)."""
        preds, decoded = [], []
        for s in range(0, tokens.shape[0], CHUNK_ROWS):
            out, emb = self.model.encoder(tokens[s : s + CHUNK_ROWS])
            preds.append(self.model.predictor(emb))
            decoded.append(self.model.decoder.greedy(emb, out))
        return torch.cat(preds), torch.cat(decoded)

    # --------------------------------------------------------------- inference
    @with_threads
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
        for s in range(0, tokens.shape[0], CHUNK_ROWS):
            _, emb = self.model.encoder(tokens[s : s + CHUNK_ROWS])
            preds.append(self.model.predictor(emb))
        p = torch.cat(preds).cpu().numpy().astype(np.float64) if preds else np.zeros(0)
        if raw:
            if self.normalization is None:
                raise RuntimeError("predict(raw=True) needs a fitted controller (no score range yet)")
            lo, hi = self.normalization
            p = lo + p * (hi - lo)
        return p

    @with_threads
    def reconstruct(self, archs: np.ndarray) -> np.ndarray:
        """Encodes and greedily decodes archs (no embedding move): ``[n, 8B]`` archs."""
        tokens = self._tokens(archs)
        self.model.eval()
        _, decoded = self._encode_chunks(tokens)
        return self.space.decode(decoded.cpu().numpy())

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


def _to_cpu(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu().clone()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_to_cpu(v) for v in obj]
    return obj
