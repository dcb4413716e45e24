"""NAO decoder: arch embedding + encoder outputs -> token sequence (SPEC section 5).

Training uses teacher forcing (input = SOS followed by the target shifted right)
and a log-softmax over the whole vocabulary, as NAO does. Inference is greedy
and constrained: at position ``t`` only the tokens in ``token_bounds()[t]``
may be emitted (an earlier state for an id position, an op for an op
position), so every decoded sequence is a valid arch.
"""

from __future__ import annotations

from typing import Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ._util import dropout, normal_, reset_linear, reset_lstm

SOS_ID = 0

class Decoder(nn.Module):
    """LSTM decoder with dot-product attention over the encoder outputs.

    Per step: token embedding (vocab -> hidden) -> LSTM (initial ``h`` and ``c``
    both the arch embedding, as NAO) -> attention context over the encoder
    outputs (scores ``(W_in output) . encoder_output``) -> ``tanh(W_out [context; output])`` -> linear to
    the vocabulary. The two attention projections have no bias, as the reference's ``Attention``.

    Args:
        vocab_size: Token vocabulary.
        length: Tokens per arch (``8B``).
        hidden_size: LSTM width; equal to the encoder's (the arch embedding is the initial state).
        token_low: ``[length]`` lowest valid token per position.
        token_high: ``[length]`` one past the highest valid token per position.
        dropout: Dropout on the input token embeddings during training.
    """

    def __init__(
        self,
        vocab_size: int,
        length: int,
        hidden_size: int,
        token_low: np.ndarray,
        token_high: np.ndarray,
        dropout: float = 0.0,
    ):
        super().__init__()
        self.vocab_size = vocab_size
        self.length = length
        self.hidden_size = hidden_size
        self.dropout = dropout
        self.embedding = nn.Embedding(vocab_size, hidden_size)
        self.rnn = nn.LSTM(hidden_size, hidden_size, num_layers=1, batch_first=True)
        self.attention_in = nn.Linear(hidden_size, hidden_size, bias=False)
        self.attention_out = nn.Linear(2 * hidden_size, hidden_size, bias=False)
        self.out = nn.Linear(hidden_size, vocab_size)
        vocab = np.arange(vocab_size)[None, :]
        allowed = (vocab >= np.asarray(token_low)[:, None]) & (vocab < np.asarray(token_high)[:, None])
        if allowed.shape != (length, vocab_size) or not allowed.any(axis=1).all():
            raise ValueError("token bounds must give every position at least one valid token")
        # Additive mask: 0 where allowed, -inf elsewhere. Derived from the space, so not saved.
        mask = torch.zeros(length, vocab_size)
        mask[torch.from_numpy(~allowed)] = float("-inf")
        self.register_buffer("mask", mask, persistent=False)

    def reset_parameters(self, generator: torch.Generator) -> None:
        """PyTorch's default init of every layer, as the reference (NAO_V2 sets no init of its own), from ``generator``."""
        normal_(self.embedding.weight, 1.0, generator)
        reset_lstm(self.rnn, generator)
        reset_linear(self.attention_in, generator)
        reset_linear(self.attention_out, generator)
        reset_linear(self.out, generator)

    @staticmethod
    def initial_state(embedding: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(h0, c0)``, both the arch embedding, shaped ``[1, n, hidden]`` for the LSTM."""
        h = embedding.unsqueeze(0).contiguous()
        return h, h

    def _attend(self, output: torch.Tensor, encoder_outputs: torch.Tensor) -> torch.Tensor:
        # output [n, T, H], encoder_outputs [n, S, H] -> [n, T, H]
        scores = torch.bmm(self.attention_in(output), encoder_outputs.transpose(1, 2))
        context = torch.bmm(torch.softmax(scores, dim=-1), encoder_outputs)
        return torch.tanh(self.attention_out(torch.cat((context, output), dim=-1)))

    def forward(
        self,
        targets: torch.Tensor,
        embedding: torch.Tensor,
        encoder_outputs: torch.Tensor,
        generator: Optional[torch.Generator] = None,
    ) -> torch.Tensor:
        """Teacher-forced log-probabilities of ``targets``.

        Args:
            targets: ``[n, length]`` int64 tokens to reconstruct.
            embedding: ``[n, hidden]`` arch embeddings (initial LSTM state).
            encoder_outputs: ``[n, steps, hidden]`` attention memory.
            generator: Source of dropout masks (needed only when training with dropout).

        Returns:
            ``[n, length, vocab]`` log-probabilities over the full vocabulary.
        """
        n = targets.shape[0]
        sos = targets.new_full((n, 1), SOS_ID)
        inputs = torch.cat((sos, targets[:, :-1]), dim=1)
        x = dropout(self.embedding(inputs), self.dropout, self.training, generator)
        out, _ = self.rnn(x, self.initial_state(embedding))
        out = self._attend(out, encoder_outputs)
        return F.log_softmax(self.out(out), dim=-1)

    @torch.no_grad()
    def greedy(self, embedding: torch.Tensor, encoder_outputs: torch.Tensor) -> torch.Tensor:
        """Constrained greedy decoding: the most likely valid token at every position.

        Args:
            embedding: ``[n, hidden]`` arch embeddings.
            encoder_outputs: ``[n, steps, hidden]`` attention memory.

        Returns:
            ``[n, length]`` int64 tokens, every row a valid arch of the space.
        """
        n = embedding.shape[0]
        state = self.initial_state(embedding)
        token = torch.full((n, 1), SOS_ID, dtype=torch.long, device=embedding.device)
        result = torch.empty((n, self.length), dtype=torch.long, device=embedding.device)
        for t in range(self.length):
            out, state = self.rnn(self.embedding(token), state)
            out = self._attend(out, encoder_outputs)
            logits = self.out(out[:, 0]) + self.mask[t]
            token = logits.argmax(dim=-1, keepdim=True)
            result[:, t] = token[:, 0]
        return result
