"""An outside bridge that joins a graph through its dotted path, with no registration."""
from __future__ import annotations

import torch
from torch import nn

from mmadapt.core.nodes import Bridge


class DoubleLinear(Bridge):
    """Two linear maps in a row: something the built-in table does not have."""

    def __init__(self, in_dim: int, out_dim: int, scale: float = 1.0) -> None:
        super().__init__()
        self.in_dim, self.out_dim, self.scale = in_dim, out_dim, scale
        self.first, self.second = nn.Linear(in_dim, in_dim), nn.Linear(in_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(self.first(x)) * self.scale  # (B, N, out_dim)
