"""IP-Adapter's image projection (Ye et al. 2023) on diffusers' own ImageProjection: an encoder's embedding becomes
image-prompt tokens that the diffusion generator's decoupled cross-attention reads (its key/value projections train there)."""
from __future__ import annotations

from typing import Literal

import torch

from mmadapt.core.nodes import Bridge
from mmadapt.core.params import PositiveInt

Pool = Literal["first", "mean"]
NUM_TOKENS = 4  # diffusers' loader rebuilds a plain IP-Adapter's projection with 4 tokens, whatever the file holds


class IPAdapter(Bridge):
    """Embedding (B, D_in) -> LayerNorm(Linear) -> (B, 4, D_cross), diffusers' `ImageProjection`, whose
    tensors export as IP-Adapter's `image_proj` (`proj.*`, `norm.*`) for `pipe.load_ip_adapter`.

    The encoder gives tokens (B, N, D_in); one embedding is read from them (`pool`): an encoder set to `feature: pooled`
    gives N = 1, the CLIP image embedding IP-Adapter was made for.
    """

    width_input = "context"

    def __init__(
        self,
        in_dim: PositiveInt,
        out_dim: PositiveInt,
        pool: Pool = "first",  # the embedding of N encoder tokens: the first (a class or pooled token) or their mean
    ) -> None:
        super().__init__()
        from diffusers.models.embeddings import ImageProjection

        self.in_dim, self.out_dim, self.pool = in_dim, out_dim, pool
        self.projection = ImageProjection(image_embed_dim=in_dim, cross_attention_dim=out_dim, num_image_text_embeds=NUM_TOKENS)

    def embedding(self, context: torch.Tensor) -> torch.Tensor:
        """(B, N, D_in) tokens -> (B, D_in): what `pipe(ip_adapter_image_embeds=...)` takes as one image's embedding."""
        return context[:, 0] if self.pool == "first" else context.mean(dim=1)

    def forward(self, context: torch.Tensor) -> torch.Tensor:
        return self.projection(self.embedding(context))  # (B, 4, D_cross)

    def unconditional(self, tokens: torch.Tensor) -> torch.Tensor:
        """The tokens of no image, for classifier-free guidance: the projection of a zero embedding, as diffusers'
        pipeline makes its negative image prompt (`zeros_like(image_embeds)`)."""
        zeros = torch.zeros(tokens.shape[0], self.in_dim, dtype=tokens.dtype, device=tokens.device)
        return self.projection(zeros)  # (B, 4, D_cross)
