"""AudioToken-style embedder: attentive pooling (or the flattened grid) of an encoder's tokens, then an MLP to K pseudo-words or prefix tokens."""
from __future__ import annotations

import torch
from torch import nn

from mmadapt.errors import MMAdaptError
from mmadapt.core.nodes import Bridge
from mmadapt.core.params import PositiveInt


class TokenEmbedder(Bridge):
    """(B, N, in_dim) encoder tokens -> (B, K, out_dim) embeddings that stand in for a prompt's placeholder word.

    Wire it to a diffusion decoder's `token_embeds`, or, with `input_tokens`, to a causal LM's `prefix_embeds` as an MLP
    prefix over the whole grid (recipes/mini/audio-grid.yaml). For textual inversion (a free vector, no input) use `soft_prompt`.
    """

    def __init__(self, in_dim: PositiveInt, out_dim: PositiveInt, num_tokens: PositiveInt = 1, hidden_dim: PositiveInt | None = None,
                 init_scale: float = 0.014,  # about the per-element std of CLIP's word embeddings
                 pool_queries: PositiveInt = 1,  # attention queries per output token, concatenated: one query is a weighted mean
                 # N: read the whole (N, in_dim) grid, flattened, instead of pooling it. Pooling forgets where in the
                 # clip a sound was; for fixed-length inputs (AudioMAE pads every clip to one length) the grid keeps it.
                 input_tokens: PositiveInt | None = None,
                 ) -> None:
        super().__init__()
        if input_tokens is not None and pool_queries != 1:
            raise MMAdaptError("token: give input_tokens (read the flattened grid) or pool_queries (attention pooling), not both")
        self.in_dim, self.out_dim, self.num_tokens = in_dim, out_dim, num_tokens
        self.pool_queries, self.input_tokens = pool_queries, input_tokens
        hidden = hidden_dim or max(in_dim, out_dim)
        self.norm = nn.LayerNorm(in_dim)
        if input_tokens is None:
            self.pool_query = nn.Parameter(torch.randn(num_tokens * pool_queries, in_dim) * in_dim ** -0.5)  # (K * Q, in_dim)
            read_width = pool_queries * in_dim
        else:
            read_width = input_tokens * in_dim
        self.mlp = nn.Sequential(nn.Linear(read_width, hidden), nn.GELU(), nn.Linear(hidden, num_tokens * out_dim if input_tokens else out_dim))
        nn.init.normal_(self.mlp[-1].weight, std=init_scale / hidden ** 0.5)
        nn.init.zeros_(self.mlp[-1].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x if x.dim() == 3 else x[:, None])  # (B, N, in_dim)
        if self.input_tokens is not None:
            if x.shape[1] != self.input_tokens:
                raise MMAdaptError(f"token: input_tokens is {self.input_tokens}, but the encoder gave {x.shape[1]} tokens")
            return self.mlp(x.flatten(1)).view(len(x), self.num_tokens, self.out_dim)  # (B, N*in_dim) -> (B, K, out_dim)
        weights = torch.softmax(torch.einsum("qd,bnd->bqn", self.pool_query, x) * self.in_dim ** -0.5, dim=-1)  # (B, K*Q, N)
        pooled = torch.einsum("bqn,bnd->bqd", weights, x)  # (B, K*Q, in_dim)
        return self.mlp(pooled.reshape(len(x), self.num_tokens, -1))  # (B, K, Q*in_dim) -> (B, K, out_dim)
