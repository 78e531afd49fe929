"""ClipCap-style prefix mapping: one pooled embedding becomes k prefix tokens for the generator."""
from __future__ import annotations

import torch
from torch import nn

from mmadapt.core.nodes import Bridge
from mmadapt.core.params import PositiveInt


class PrefixMapper(Bridge):
    """Mean-pools its input tokens (a pooled encoder output is one token) and maps it to k tokens."""

    def __init__(self, in_dim: PositiveInt, out_dim: PositiveInt, num_tokens: PositiveInt = 10,
                 hidden_dim: PositiveInt | None = None) -> None:
        super().__init__()
        self.in_dim, self.out_dim, self.num_tokens = in_dim, out_dim, num_tokens
        hidden = hidden_dim or out_dim
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden), nn.Tanh(), nn.Linear(hidden, out_dim * num_tokens))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = x.mean(dim=1) if x.dim() == 3 else x  # (B, in_dim)
        return self.mlp(pooled).view(x.shape[0], self.num_tokens, self.out_dim)  # (B, k, out_dim)
