"""NAO performance predictor: arch embedding -> score in (0, 1) (SPEC section 5)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ._util import dropout, reset_linear


class Predictor(nn.Module):
    """An MLP with ``mlp_layers`` ReLU hidden layers (0 = linear) and a sigmoid output.

    Args:
        input_size: Width of the arch embedding (the encoder's hidden size).
        mlp_layers: Hidden layers (NAO's default: 0).
        mlp_hidden: Width of the hidden layers.
        dropout: Dropout after every hidden layer during training.
    """

    def __init__(self, input_size: int = 64, mlp_layers: int = 0, mlp_hidden: int = 64, dropout: float = 0.0):
        super().__init__()
        if mlp_layers < 0:
            raise ValueError(f"mlp_layers must be >= 0, got {mlp_layers}")
        self.dropout = dropout
        widths = [input_size] + [mlp_hidden] * mlp_layers
        self.hidden = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:]))
        self.regressor = nn.Linear(widths[-1], 1)

    def reset_parameters(self, generator: torch.Generator) -> None:
        """PyTorch's default Linear init, drawn from ``generator``."""
        for layer in self.hidden:
            reset_linear(layer, generator)
        reset_linear(self.regressor, generator)

    def forward(self, embedding: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Predicted scores ``[n]`` in (0, 1) from arch embeddings ``[n, input_size]``."""
        x = embedding
        for layer in self.hidden:
            x = dropout(torch.relu(layer(x)), self.dropout, self.training, generator)
        return torch.sigmoid(self.regressor(x)).squeeze(-1)
