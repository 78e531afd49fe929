"""Linear and MLP projectors (LLaVA, MAPL): map each encoder token into the generator's embedding space."""
from __future__ import annotations

import torch
from torch import nn

from mmadapt.core.nodes import Bridge
from mmadapt.core.params import PositiveInt


class LinearProjector(Bridge):
    """One linear map per token, as LLaVA-1.0."""

    def __init__(self, in_dim: PositiveInt, out_dim: PositiveInt) -> None:
        super().__init__()
        self.in_dim, self.out_dim = in_dim, out_dim
        self.proj = nn.Linear(in_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)  # (B, N, in_dim) -> (B, N, out_dim)


class MLPProjector(Bridge):
    """LLaVA-1.5's GELU MLP; `num_layers: 2` is its mlp2x_gelu."""

    def __init__(self, in_dim: PositiveInt, out_dim: PositiveInt, hidden_dim: PositiveInt | None = None,
                 num_layers: PositiveInt = 2) -> None:
        super().__init__()
        self.in_dim, self.out_dim = in_dim, out_dim
        hidden = hidden_dim or out_dim
        dims = [in_dim] + [hidden] * (num_layers - 1) + [out_dim]
        layers: list[nn.Module] = []
        for index, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
            if index:
                layers.append(nn.GELU())
            layers.append(nn.Linear(a, b))
        self.mlp = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x)  # (B, N, in_dim) -> (B, N, out_dim)
