"""Stable Diffusion XL as the graph's generator: two CLIP text encoders, the pooled text embedding and size ids."""
from __future__ import annotations

from typing import Any

import torch

from mmadapt.core.identity import config_hash
from mmadapt.core.semantics import meta_built
from mmadapt.errors import MMAdaptError
from mmadapt.generators.diffusion.generator import DiffusionGenerator, read_pipeline_config


class SDXLGenerator(DiffusionGenerator):
    """The SD 1.x generator's contract on the SDXL layout.

    The U-Net cross-attends to both encoders' penultimate states side by side (B, L, D_l + D_g) and takes
    `added_cond_kwargs`: text_encoder_2's pooled projection and the six size ids, as StableDiffusionXLPipeline
    computes them. A token bridge gives (B, K, D_l + D_g) rows, split between the two encoders' placeholder rows
    (diffusers' clip_l / clip_g textual-inversion layout). LoRA may target unet, text_encoder or text_encoder_2.
    """

    pipeline_class = "StableDiffusionXLPipeline"
    lora_parts = ("unet", "text_encoder", "text_encoder_2")
    adapter_modules = {**DiffusionGenerator.adapter_modules, "text_encoder_2": DiffusionGenerator.adapter_modules["text_encoder"]}

    def _add_placeholders(self, init_word: str | None) -> None:
        if self.text_alignment:
            raise MMAdaptError("text_alignment is not available on the SDXL layout yet: leave it out (or 0)")
        if self.tokenizer.model_max_length != self.tokenizer_2.model_max_length:
            raise MMAdaptError(f"{self.source}: the two tokenizers pad to different lengths "
                               f"({self.tokenizer.model_max_length} and {self.tokenizer_2.model_max_length})")
        super()._add_placeholders(init_word)
        self.placeholder_ids_2 = self._add_placeholder(self.tokenizer_2, self.text_encoder_2, init_word)

    def _load(self, folder: str, dtype: torch.dtype) -> None:
        from transformers import CLIPTextModelWithProjection, CLIPTokenizer

        super()._load(folder, dtype)
        self.tokenizer_2 = CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer_2")
        self.text_encoder_2 = CLIPTextModelWithProjection.from_pretrained(folder, subfolder="text_encoder_2", dtype=dtype)

    # --- widths and identity ---
    @classmethod
    def config_widths(cls, params: dict[str, Any]) -> dict[str, int]:
        from mmadapt.core.nodes import WidthUnknown

        checkpoint = str(params.get("checkpoint", ""))
        first, second, unet = (read_pipeline_config(checkpoint, part) for part in ("text_encoder", "text_encoder_2", "unet"))
        if first is None or second is None or unet is None:
            raise WidthUnknown(f"{params.get('checkpoint')} is not a local pipeline folder")
        cross = int(unet["cross_attention_dim"])
        return {"token_embeds": int(first["hidden_size"]) + int(second["hidden_size"]), "context": cross, "ip_tokens": cross}

    @classmethod
    def adapter_bases(cls, params: dict[str, Any]) -> dict[str, torch.nn.Module] | None:
        from transformers import CLIPTextConfig, CLIPTextModelWithProjection

        bases = super().adapter_bases(params)
        second = read_pipeline_config(str(params.get("checkpoint", "")), "text_encoder_2")
        if bases is None or second is None:
            return None
        return {**bases, "text_encoder_2": meta_built(lambda: CLIPTextModelWithProjection(CLIPTextConfig.from_dict(second)))}

    def widths(self) -> dict[str, int]:
        cross = self.unet.config.cross_attention_dim
        return {"token_embeds": self.text_encoder.config.hidden_size + self.text_encoder_2.config.hidden_size,
                "context": cross, "ip_tokens": cross}

    def describe(self) -> dict[str, Any]:
        return {"source": self.source, "config_hash": config_hash({
            "unet": dict(self.unet.config), "vae": dict(self.vae.config), "text": self.text_encoder.config.to_dict(),
            "text_2": self.text_encoder_2.config.to_dict()})}

    # --- conditioning ---
    def tokenize(self, prompts: list[str]) -> torch.Tensor:
        """(B, 2, L): each prompt in both tokenizers (their pad tokens differ), as the pipeline tokenizes it."""
        expanded = [self.expand_placeholder(p) for p in prompts]
        return torch.stack([tokenizer(expanded, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                                      return_tensors="pt").input_ids for tokenizer in (self.tokenizer, self.tokenizer_2)], dim=1)

    def encode_text(self, input_ids: torch.Tensor, token_embeds: torch.Tensor | None = None,
                    context: torch.Tensor | None = None, prior_rows: torch.Tensor | None = None) -> torch.Tensor:
        return self.encode_prompt(input_ids, token_embeds, context, prior_rows)[0]

    def encode_prompt(self, input_ids: torch.Tensor, token_embeds: torch.Tensor | None = None, context: torch.Tensor | None = None,
                      prior_rows: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Both encoders' penultimate states (B, L, D_l + D_g), then context (B, L + M, D); added: pooled (B, P), ids (B, 6)."""
        from mmadapt.core.nodes import RowTokens

        if isinstance(token_embeds, RowTokens) or isinstance(context, RowTokens):
            return super().encode_text(input_ids, token_embeds, context), {}  # the base refuses a mixed batch, in its words
        width = self.text_encoder.config.hidden_size
        halves = (None, None) if token_embeds is None else (token_embeds[..., :width], token_embeds[..., width:])  # clip_l, clip_g
        first = self.run_text_encoder(self.text_encoder, input_ids[:, 0], self.placeholder_ids, halves[0], prior_rows,
                                      output_hidden_states=True)
        second = self.run_text_encoder(self.text_encoder_2, input_ids[:, 1], self.placeholder_ids_2, halves[1], prior_rows,
                                       output_hidden_states=True)
        states = torch.cat([first.hidden_states[-2], second.hidden_states[-2].to(first.hidden_states[-2].device)], dim=-1)
        if context is not None:
            states = torch.cat([states, context.to(states.dtype)], dim=1)  # (B, L + M, D)
        pooled = second.text_embeds.to(states.device, states.dtype)  # (B, P)
        return states, {"text_embeds": pooled, "time_ids": self.time_ids(states.shape[0]).to(states.device, states.dtype)}

    def time_ids(self, count: int) -> torch.Tensor:
        """(B, 6): original size, crop corner, target size, as the pipeline passes them for a square picture at the
        training resolution. (diffusers' SDXL scripts record each photo's own size and crop; the data here is resized and
        centre-cropped to the resolution, so those are the same numbers.)"""
        side = self.resolution
        return torch.tensor([[side, side, 0, 0, side, side]], dtype=torch.float32).repeat(count, 1)

    # --- sampling and export ---
    def pipeline_parts(self) -> dict[str, Any]:
        return dict(vae=self.vae, text_encoder=self.text_encoder, text_encoder_2=self.text_encoder_2, tokenizer=self.tokenizer,
                    tokenizer_2=self.tokenizer_2, unet=self.unet, add_watermarker=False)

    def negative_prompt(self, text: str, count: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """As the pipeline's own: an empty negative prompt is zeros (its force_zeros_for_empty_prompt), else encoded."""
        states, added = self.encode_prompt(self.tokenize([text] * count))
        if text == "" and self.sampling_pipeline().config.force_zeros_for_empty_prompt:
            states, added = torch.zeros_like(states), {**added, "text_embeds": torch.zeros_like(added["text_embeds"])}
        return states, added

    def textual_inversion_state(self, token: torch.Tensor) -> dict[str, torch.Tensor]:
        """diffusers' SDXL layout: `clip_l` rows for text_encoder, `clip_g` for text_encoder_2 (load each with its pair)."""
        width = self.text_encoder.config.hidden_size
        return {"clip_l": token[:, :width].contiguous(), "clip_g": token[:, width:].contiguous()}
