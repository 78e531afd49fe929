"""BLIP-2's Q-Former on transformers' Blip2QFormerModel, with its weight names so BLIP-2 checkpoints load."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mmadapt.core.checkpoint_io import load_prefixed_tensors
from mmadapt.errors import MMAdaptError
from mmadapt.core.nodes import Bridge
from mmadapt.core.params import Dropout, PositiveInt
from mmadapt.core.semantics import Finding, NodeContext, argument

BLIP2_PREFIXES = ("query_tokens", "qformer.", "language_projection.")


class QFormer(Bridge):
    """Learned queries self-attend and cross-attend to encoder tokens; a linear map feeds the generator.

    Parameter names match `Blip2ForConditionalGeneration` (`query_tokens`, `qformer.*`,
    `language_projection.*`), so `init_from` can copy a BLIP-2 checkpoint's bridge as it is.
    """

    width_input = "context"
    source_params = {"init_from": "config.json"}

    @classmethod
    def param_problems(cls, params: dict[str, Any], context: NodeContext) -> list[Finding]:
        """The attention splits hidden_size into num_heads equal parts."""
        hidden, heads = argument(cls, params, "hidden_size"), argument(cls, params, "num_heads")
        if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (hidden, heads)) or hidden % heads == 0:
            return []  # a value of the wrong type or sign is reported from the annotations
        return [Finding("num_heads", f"{heads} does not divide hidden_size {hidden}: each head takes hidden_size / num_heads "
                                     f"channels (e.g. num_heads: {max(h for h in range(1, heads + 1) if hidden % h == 0)})")]

    def __init__(
        self,
        in_dim: PositiveInt,
        out_dim: PositiveInt,
        num_queries: PositiveInt = 32,  # BLIP-2 uses 32
        hidden_size: PositiveInt = 768,  # BERT-base width in BLIP-2
        num_layers: PositiveInt = 12,
        num_heads: PositiveInt = 12,
        intermediate_size: PositiveInt | None = None,  # defaults to 4 * hidden_size
        cross_attention_every: PositiveInt = 2,  # BLIP-2 cross-attends in every 2nd layer
        dropout: Dropout = 0.1,  # BLIP-2's attention and hidden dropout; tiny bridges learn faster without
        init_from: str | None = None,  # folder or hub id of a BLIP-2 checkpoint to start from
        # N: learned position embeddings added to the N encoder tokens before cross-attention (as Video-LLaMA adds frame
        # positions), for encoders whose tokens carry little of their order. Not a BLIP-2 tensor: init_from leaves it new.
        context_positions: PositiveInt | None = None,
    ) -> None:
        super().__init__()
        from transformers import Blip2QFormerConfig, Blip2QFormerModel

        self.in_dim, self.out_dim = in_dim, out_dim
        config = Blip2QFormerConfig(
            hidden_size=hidden_size,
            num_hidden_layers=num_layers,
            num_attention_heads=num_heads,
            intermediate_size=intermediate_size or 4 * hidden_size,
            cross_attention_frequency=cross_attention_every,
            encoder_hidden_size=in_dim,
            hidden_dropout_prob=dropout,
            attention_probs_dropout_prob=dropout,
        )
        self.query_tokens = nn.Parameter(torch.randn(1, num_queries, hidden_size) * 0.02)  # zeros would stall layer 1
        self.qformer = Blip2QFormerModel(config)
        self.language_projection = nn.Linear(hidden_size, out_dim)
        self.context_positions = context_positions
        if context_positions is not None:
            self.context_position_embeds = nn.Parameter(torch.zeros(1, context_positions, in_dim))  # zeros: starts as BLIP-2
        if init_from is not None:
            self.load_blip2(init_from)

    def load_blip2(self, source: str) -> None:
        """Copy `query_tokens`, `qformer.*` and `language_projection.*` from a BLIP-2 checkpoint."""
        tensors = load_prefixed_tensors(source, BLIP2_PREFIXES)
        own = self.state_dict()
        wrong = [f"{k}: checkpoint {tuple(v.shape)} vs bridge {tuple(own[k].shape)}" for k, v in tensors.items() if k in own and own[k].shape != v.shape]
        missing = sorted(set(own) - set(tensors) - {"context_position_embeds"})
        if wrong or missing:
            detail = "; ".join(wrong[:3] + [f"missing {m}" for m in missing[:3]])
            raise MMAdaptError(f"init_from '{source}' does not fit this Q-Former ({detail}); match its sizes in the recipe")
        self.load_state_dict({k: v for k, v in tensors.items() if k in own}, strict=False)  # missing keys were checked above

    def forward(self, context: torch.Tensor) -> torch.Tensor:
        if self.context_positions is not None:
            if context.shape[1] != self.context_positions:
                raise MMAdaptError(f"qformer: context_positions is {self.context_positions}, but the encoder gave {context.shape[1]} tokens")
            context = context + self.context_position_embeds.to(context.dtype)  # (B, N, in_dim)
        queries = self.query_tokens.expand(context.shape[0], -1, -1)  # (B, Q, H)
        mask = torch.ones(context.shape[:2], dtype=torch.long, device=context.device)  # (B, N)
        hidden = self.qformer(query_embeds=queries, encoder_hidden_states=context, encoder_attention_mask=mask).last_hidden_state
        return self.language_projection(hidden)  # (B, Q, out_dim)
