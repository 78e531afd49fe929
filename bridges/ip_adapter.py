"""IP-Adapter's image projection (Ye et al. 2023) on diffusers' own modules: an encoder's embedding (plain) or its
tokens (plus) become image-prompt tokens that the diffusion generator's decoupled cross-attention reads (its key/value
projections train there)."""
from __future__ import annotations

import re
from typing import Any, Literal

import torch

from mmadapt.core.nodes import Bridge
from mmadapt.core.params import Dropout, PositiveInt
from mmadapt.core.semantics import Finding, NodeContext, argument
from mmadapt.errors import MMAdaptError

Variant = Literal["plain", "plus"]
Pool = Literal["first", "mean", "flatten"]
PLAIN_TOKENS = 4  # diffusers' loader rebuilds a plain IP-Adapter's projection with 4 tokens, whatever the file holds
PLUS_DEPTH, PLUS_HEAD_DIM = 4, 64  # and a plus one with 4 resampler layers of 64-wide heads: the file cannot say otherwise


class IPAdapter(Bridge):
    """plain: one embedding (B, D_in) -> diffusers' `ImageProjection` (Linear, LayerNorm) -> (B, 4, D_cross).
    plus: the encoder's tokens (B, N, D_in) -> diffusers' `IPAdapterPlusImageProjection` (a perceiver resampler whose
    `num_queries` learned latents attend to them) -> (B, num_queries, D_cross).

    The tensors export as IP-Adapter's `image_proj` (`image_proj_state`) for `pipe.load_ip_adapter`.
    """

    width_input = "context"

    @classmethod
    def param_problems(cls, params: dict[str, Any], context: NodeContext) -> list[Finding]:
        """pool: flatten comes with input_tokens (plain only); a plus resampler's width splits into 64-wide heads."""
        variant, pool, tokens, hidden = (argument(cls, params, k) for k in ("variant", "pool", "input_tokens", "hidden_size"))
        findings = []
        if (pool == "flatten") != (tokens is not None) or (pool == "flatten" and variant != "plain"):
            findings.append(Finding("input_tokens" if tokens is not None else "pool",
                                    "pool: flatten (variant: plain) joins input_tokens encoder tokens into one embedding; give "
                                    "input_tokens with it, and only with it"))
        if variant == "plus" and isinstance(hidden, int) and hidden % PLUS_HEAD_DIM:
            findings.append(Finding("hidden_size", f"{hidden} is not a multiple of {PLUS_HEAD_DIM}: diffusers' loader reads the "
                                                   f"resampler's heads as {PLUS_HEAD_DIM} wide (e.g. hidden_size: "
                                                   f"{PLUS_HEAD_DIM * max(1, round(hidden / PLUS_HEAD_DIM))})"))
        return findings

    def __init__(
        self,
        in_dim: PositiveInt,
        out_dim: PositiveInt,
        variant: Variant = "plain",  # plain reads one embedding per input; plus reads all its tokens (IP-Adapter Plus)
        # plain: the embedding of N encoder tokens: the first (a class or pooled token), their mean, or all of them joined
        # (flatten, N = input_tokens: an encoder whose tokens each hold a part of the input, as AudioMAE's patch grid)
        pool: Pool = "first",
        input_tokens: PositiveInt | None = None,  # plain with pool: flatten: N, the encoder's token count
        num_queries: PositiveInt = 16,  # plus: image-prompt tokens (IP-Adapter Plus uses 16)
        hidden_size: PositiveInt = 128,  # plus: the resampler's width, a multiple of 64 (its heads are 64 wide)
        # IP-Adapter's training zeroes a sample's embedding with this probability, so the adapter learns the no-image
        # prompt that guidance contrasts with (the pipeline's negative is the projection of zeros)
        drop_rate: Dropout = 0.05,
    ) -> None:
        super().__init__()
        from diffusers.models.embeddings import ImageProjection, IPAdapterPlusImageProjection

        self.in_dim, self.out_dim, self.variant, self.pool, self.input_tokens = in_dim, out_dim, variant, pool, input_tokens
        self.drop_rate = drop_rate
        if variant == "plain":
            self.projection = ImageProjection(image_embed_dim=in_dim * (input_tokens or 1), cross_attention_dim=out_dim,
                                              num_image_text_embeds=PLAIN_TOKENS)
            return
        self.projection = IPAdapterPlusImageProjection(embed_dims=in_dim, output_dims=out_dim, hidden_dims=hidden_size,
                                                       depth=PLUS_DEPTH, dim_head=PLUS_HEAD_DIM, heads=hidden_size // PLUS_HEAD_DIM,
                                                       num_queries=num_queries)

    def embedding(self, context: torch.Tensor) -> torch.Tensor:
        """What `pipe(ip_adapter_image_embeds=...)` takes for one input: plain (B, D_in) from the tokens (B, N, D_in);
        plus the tokens themselves."""
        if self.variant == "plus":
            return context
        if self.pool == "flatten":
            if context.shape[1] != self.input_tokens:
                raise MMAdaptError(f"ip_adapter: input_tokens is {self.input_tokens}, but the encoder gave {context.shape[1]} tokens")
            return context.flatten(1)  # (B, N * D_in)
        return context[:, 0] if self.pool == "first" else context.mean(dim=1)

    def forward(self, context: torch.Tensor) -> torch.Tensor:
        embedding = self.embedding(context)  # plain (B, D_in); plus (B, N, D_in)
        if self.training and self.drop_rate > 0:
            kept = torch.rand(embedding.shape[0], device=embedding.device) >= self.drop_rate  # (B,)
            embedding = embedding * kept.view(-1, *[1] * (embedding.dim() - 1)).to(embedding.dtype)
        return self.projection(embedding)  # (B, T, D_cross)

    def unconditional(self, context: torch.Tensor) -> torch.Tensor:
        """The tokens of no input, for classifier-free guidance: the projection of a zero embedding, as diffusers'
        pipeline makes its negative image prompt from given embeddings (`zeros_like`), in the shape `embedding` gives."""
        return self.projection(torch.zeros_like(self.embedding(context)))  # (B, T, D_cross)

    def image_proj_state(self) -> dict[str, torch.Tensor]:
        """The projection's tensors under the names of IP-Adapter's own files (`image_proj.*`), which diffusers'
        loader converts to its modules: plain `proj`/`norm`; plus the original Resampler's layers (to_k and to_v as one
        to_kv; the feed-forward as a Sequential)."""
        state = self.projection.state_dict()
        if self.variant == "plain":
            return {("proj." if k.startswith("image_embeds.") else "") + k.removeprefix("image_embeds."): v for k, v in state.items()}
        renamed: dict[str, torch.Tensor] = {}
        for key, value in state.items():
            layer = re.match(r"layers\.(\d+)\.(.+)", key)
            if layer is None:
                renamed[key] = value  # latents, proj_in, proj_out, norm_out
                continue
            i, rest = layer.groups()
            if rest.startswith("attn.to_v."):
                continue  # joined with to_k below
            if rest.startswith("attn.to_k."):
                renamed[f"layers.{i}.0.to_kv.weight"] = torch.cat([value, state[f"layers.{i}.attn.to_v.weight"]])
                continue
            renamed[f"layers.{i}." + {"ln0": "0.norm1", "ln1": "0.norm2", "attn.to_q": "0.to_q", "attn.to_out.0": "0.to_out",
                                      "ff.0": "1.0", "ff.1.net.0.proj": "1.1", "ff.1.net.2": "1.3"}[rest.rsplit(".", 1)[0]]
                     + "." + rest.rsplit(".", 1)[1]] = value
        return renamed
