"""Soft-prompt tokens (prompt tuning): k free embeddings placed before the generator's input."""
from __future__ import annotations

import torch
from torch import nn

from mmadapt.core.nodes import Bridge
from mmadapt.core.params import PositiveInt


class SoftPrompt(Bridge):
    """Learned tokens with no input; the graph passes the batch size so they can be expanded."""

    width_input = None

    def __init__(self, out_dim: PositiveInt, num_tokens: PositiveInt = 8, init_std: float = 0.02) -> None:
        super().__init__()
        self.out_dim, self.num_tokens = out_dim, num_tokens
        self.tokens = nn.Parameter(torch.randn(1, num_tokens, out_dim) * init_std)

    def forward(self, batch_size: int = 1) -> torch.Tensor:
        return self.tokens.expand(batch_size, -1, -1)  # (B, k, out_dim)
