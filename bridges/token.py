"""AudioToken-style embedder: attentive pooling over an encoder's tokens, then an MLP to K pseudo-word embeddings."""
from __future__ import annotations

import torch
from torch import nn

from mmadapt.nodes import Bridge


class TokenEmbedder(Bridge):
    """(B, N, in_dim) encoder tokens -> (B, K, out_dim) embeddings that stand in for a prompt's placeholder word.

    Wire it to a diffusion decoder's `token_embeds`. For textual inversion (a free vector, no input) use `soft_prompt`.
    """

    def __init__(self, in_dim: int, out_dim: int, num_tokens: int = 1, hidden_dim: int | None = None,
                 init_scale: float = 0.014,  # about the per-element std of CLIP's word embeddings
                 pool_queries: int = 1,  # attention queries per output token, concatenated: one query is a weighted mean
                 ) -> None:
        super().__init__()
        self.in_dim, self.out_dim, self.num_tokens, self.pool_queries = in_dim, out_dim, num_tokens, pool_queries
        hidden = hidden_dim or max(in_dim, out_dim)
        self.pool_query = nn.Parameter(torch.randn(num_tokens * pool_queries, in_dim) * in_dim ** -0.5)  # (K * Q, in_dim)
        self.norm = nn.LayerNorm(in_dim)
        self.mlp = nn.Sequential(nn.Linear(pool_queries * in_dim, hidden), nn.GELU(), nn.Linear(hidden, out_dim))
        nn.init.normal_(self.mlp[-1].weight, std=init_scale / hidden ** 0.5)
        nn.init.zeros_(self.mlp[-1].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x if x.dim() == 3 else x[:, None])  # (B, N, in_dim)
        weights = torch.softmax(torch.einsum("qd,bnd->bqn", self.pool_query, x) * self.in_dim ** -0.5, dim=-1)  # (B, K*Q, N)
        pooled = torch.einsum("bqn,bnd->bqd", weights, x)  # (B, K*Q, in_dim)
        return self.mlp(pooled.reshape(len(x), self.num_tokens, -1))  # (B, K, Q*in_dim) -> (B, K, out_dim)
