"""NAO encoder: arch tokens -> per-step embeddings and one arch embedding (SPEC section 5)."""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ._util import dropout, normal_, reset_lstm


def arch_embedding(outputs: torch.Tensor) -> torch.Tensor:
    """The arch embedding of encoder outputs: the L2-normalised mean over steps.

    Args:
        outputs: ``[n, steps, hidden]`` (L2-normalised per step).

    Returns:
        ``[n, hidden]``.
    """
    return F.normalize(outputs.mean(dim=1), p=2, dim=-1)


class Encoder(nn.Module):
    """Embedding (vocab -> ``embedding_size``) and a one-layer LSTM (``hidden_size``).

    As in NAO's reference (``source_length`` 40, ``encoder_length`` 20), the
    LSTM reads the ``8B`` tokens as ``4B`` steps of ``(id, op)`` pairs: the
    two token embeddings of a branch are concatenated into one step input of
    ``2 * embedding_size``. A step is then one branch, and the sequence the
    LSTM (and the decoder's attention) runs over is half as long.

    Args:
        vocab_size: Token vocabulary (``NAOSpace.vocab_size``).
        length: Tokens per arch (``8B``; even).
        embedding_size: Token embedding width (NAO: 32).
        hidden_size: LSTM width (NAO: 64).
        dropout: Dropout on the token embeddings during training.
    """

    def __init__(self, vocab_size: int, length: int, embedding_size: int = 32, hidden_size: int = 64, dropout: float = 0.0):
        super().__init__()
        if length % 2:
            raise ValueError(f"the encoder reads (id, op) pairs; length must be even, got {length}")
        self.length = length
        self.steps = length // 2
        self.embedding_size = embedding_size
        self.hidden_size = hidden_size
        self.dropout = dropout
        self.embedding = nn.Embedding(vocab_size, embedding_size)
        self.rnn = nn.LSTM(2 * embedding_size, hidden_size, num_layers=1, batch_first=True)

    def reset_parameters(self, generator: torch.Generator) -> None:
        """PyTorch's default init, drawn from ``generator``."""
        normal_(self.embedding.weight, 1.0, generator)
        reset_lstm(self.rnn, generator)

    def forward(self, tokens: torch.Tensor, generator: Optional[torch.Generator] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """Encodes token sequences.

        Args:
            tokens: ``[n, 8B]`` int64 NAO tokens.
            generator: Source of dropout masks (needed only when training with dropout).

        Returns:
            ``(outputs, embedding)``: ``[n, 4B, hidden]`` L2-normalised per step,
            and ``[n, hidden]`` the arch embedding (:func:`arch_embedding`).
        """
        n = tokens.shape[0]
        x = self.embedding(tokens)
        x = dropout(x, self.dropout, self.training, generator)
        x = x.reshape(n, self.steps, 2 * self.embedding_size)
        out, _ = self.rnn(x)
        out = F.normalize(out, p=2, dim=-1)
        return out, arch_embedding(out)
