"""Stable Diffusion 3 (an MMDiT diffusion transformer trained by flow matching) as the graph's generator."""
from __future__ import annotations

import os
from typing import Any

import torch
import torch.nn.functional as F

from mmadapt.core.identity import config_hash
from mmadapt.core.params import Dtype, PositiveInt
from mmadapt.core.semantics import meta_built
from mmadapt.errors import MMAdaptError
from mmadapt.generators.diffusion.generator import DiffusionGenerator, read_pipeline_config

class SD3Generator(DiffusionGenerator):
    """Flow matching on a frozen StableDiffusion3Pipeline folder; bridges give `context` tokens beside the prompt's.

    The transformer reads the prompt as StableDiffusion3Pipeline encodes it: two CLIP encoders' penultimate states side
    by side, zero-padded to T5's width, then T5's states (B, L + L3, D), plus both CLIP pooled projections (B, P). A
    folder without text_encoder_3 gets zeros in T5's place, as the pipeline does. Training noises latents with the
    scheduler's own `scale_noise` at logit-normal timesteps and regresses the velocity noise - x0 that its Euler step
    integrates (diffusers' train_dreambooth_lora_sd3.py without output preconditioning). LoRA targets the joint
    attention of the transformer (both streams' projections), or text_encoder / text_encoder_2.
    """

    pipeline_class = "StableDiffusion3Pipeline"
    adapter_target = "transformer"
    lora_parts = ("transformer", "text_encoder", "text_encoder_2")
    adapter_modules = {"transformer": ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj",
                                       "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out"],  # the SD3 script's targets
                       "text_encoder": DiffusionGenerator.adapter_modules["text_encoder"],
                       "text_encoder_2": DiffusionGenerator.adapter_modules["text_encoder"]}

    def __init__(
        self,
        checkpoint: str,  # a diffusers StableDiffusion3Pipeline folder or hub id, or zoo:NAME
        resolution: PositiveInt | None = None,  # training image size; defaults to the transformer's sample size times the VAE factor
        dtype: Dtype = "float32",  # weights dtype of the frozen parts
        # T5 tokens per prompt. None: the pipeline's default 256, or fewer where tokenizer_3's model_max_length is lower
        # (digits-dit: 32); a stock call must pass the same max_sequence_length to read prompts as training did.
        max_sequence_length: PositiveInt | None = None,
        cache_latents: bool = False,  # as on the SD 1.x node: each picture's VAE posterior kept in memory
        cache_text_states: bool = False,  # and each prompt's frozen text-encoder states
    ) -> None:
        self.requested_length = max_sequence_length
        super().__init__(checkpoint, resolution=resolution, dtype=dtype, cache_latents=cache_latents,
                         cache_text_states=cache_text_states)

    def _load(self, folder: str, dtype: torch.dtype) -> None:
        from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
        from transformers import CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

        self.tokenizer = CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer")
        self.tokenizer_2 = CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer_2")
        self.text_encoder = CLIPTextModelWithProjection.from_pretrained(folder, subfolder="text_encoder", dtype=dtype)
        self.text_encoder_2 = CLIPTextModelWithProjection.from_pretrained(folder, subfolder="text_encoder_2", dtype=dtype)
        has_t5 = os.path.isdir(os.path.join(folder, "text_encoder_3")) or not os.path.isdir(folder)  # a hub id has one
        self.tokenizer_3 = T5TokenizerFast.from_pretrained(folder, subfolder="tokenizer_3") if has_t5 else None
        self.text_encoder_3 = T5EncoderModel.from_pretrained(folder, subfolder="text_encoder_3", dtype=dtype) if has_t5 else None
        self.vae = AutoencoderKL.from_pretrained(folder, subfolder="vae", torch_dtype=dtype)
        self.transformer = SD3Transformer2DModel.from_pretrained(folder, subfolder="transformer", torch_dtype=dtype)
        self.scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(folder, subfolder="scheduler")  # its own shift
        cap = self.tokenizer_3.model_max_length if self.tokenizer_3 is not None else 256
        self.max_sequence_length = self.requested_length or min(256, cap)

    def denoiser(self) -> torch.nn.Module:
        return self.transformer

    def _add_placeholders(self, init_word: str | None) -> None:
        self.placeholder_ids = []  # no token bridges on this layout yet (refused at validation)

    def trained_parts(self) -> list[torch.nn.Module]:
        return []

    # --- validation, widths and identity ---
    @classmethod
    def config_widths(cls, params: dict[str, Any]) -> dict[str, int]:
        from mmadapt.core.nodes import WidthUnknown

        transformer = read_pipeline_config(str(params.get("checkpoint", "")), "transformer")
        if transformer is None:
            raise WidthUnknown(f"{params.get('checkpoint')} is not a local pipeline folder")
        return {"context": int(transformer["joint_attention_dim"])}

    @classmethod
    def adapter_bases(cls, params: dict[str, Any]) -> dict[str, torch.nn.Module] | None:
        from diffusers import SD3Transformer2DModel
        from transformers import CLIPTextConfig, CLIPTextModelWithProjection

        checkpoint = str(params.get("checkpoint", ""))
        transformer, first, second = (read_pipeline_config(checkpoint, p) for p in ("transformer", "text_encoder", "text_encoder_2"))
        if transformer is None or first is None or second is None:
            return None
        return {"transformer": meta_built(lambda: SD3Transformer2DModel.from_config(transformer)),
                "text_encoder": meta_built(lambda: CLIPTextModelWithProjection(CLIPTextConfig.from_dict(first))),
                "text_encoder_2": meta_built(lambda: CLIPTextModelWithProjection(CLIPTextConfig.from_dict(second)))}

    def widths(self) -> dict[str, int]:
        return {"context": self.transformer.config.joint_attention_dim}

    def describe(self) -> dict[str, Any]:
        texts = {f"text_{i}": e.config.to_dict() for i, e in enumerate((self.text_encoder, self.text_encoder_2, self.text_encoder_3)) if e}
        return {"source": self.source, "config_hash": config_hash({"transformer": dict(self.transformer.config),
                                                                   "vae": dict(self.vae.config), **texts})}

    # --- conditioning ---
    def tokenize(self, prompts: list[str]) -> torch.Tensor:
        """(B, 2L + L3): the prompt in both CLIP tokenizers (at the first one's length, as the pipeline pads them) and in
        T5's, end to end in one tensor."""
        length = self.tokenizer.model_max_length
        parts = [tokenizer(prompts, padding="max_length", max_length=length, truncation=True, return_tensors="pt").input_ids
                 for tokenizer in (self.tokenizer, self.tokenizer_2)]
        if self.tokenizer_3 is not None:
            parts.append(self.tokenizer_3(prompts, padding="max_length", max_length=self.max_sequence_length, truncation=True,
                                          add_special_tokens=True, return_tensors="pt").input_ids)
        return torch.cat(parts, dim=1)

    def encode_text(self, input_ids: torch.Tensor, token_embeds: torch.Tensor | None = None,
                    context: torch.Tensor | None = None, prior_rows: torch.Tensor | None = None) -> torch.Tensor:
        return self.encode_prompt(input_ids, token_embeds, context, prior_rows)[0]

    def encode_prompt(self, input_ids: torch.Tensor, token_embeds: torch.Tensor | None = None, context: torch.Tensor | None = None,
                      prior_rows: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """As the pipeline: states (B, L + L3 + M, D), [CLIP-L | CLIP-G | zeros] over L tokens, T5 over L3, then the
        context; and both pooled projections side by side {"text_embeds": (B, P_l + P_g)}."""
        from mmadapt.core.nodes import RowTokens

        if isinstance(context, RowTokens):
            raise MMAdaptError("diffusion: a batch mixes modalities (a mixture dataset); the sd3 generator takes one modality "
                               "per batch, so train each modality's bridge on its own data")
        length, device = self.tokenizer.model_max_length, self.text_encoder.device
        first = self.text_encoder(input_ids[:, :length].to(device), output_hidden_states=True)
        second = self.text_encoder_2(input_ids[:, length:2 * length].to(device), output_hidden_states=True)
        clip = torch.cat([first.hidden_states[-2], second.hidden_states[-2]], dim=-1)  # (B, L, D_l + D_g)
        if self.text_encoder_3 is None:
            t5 = clip.new_zeros(clip.shape[0], self.max_sequence_length, self.transformer.config.joint_attention_dim)
        else:
            t5 = self.text_encoder_3(input_ids[:, 2 * length:].to(device)).last_hidden_state.to(clip.dtype)  # (B, L3, D)
        states = torch.cat([F.pad(clip, (0, t5.shape[-1] - clip.shape[-1])), t5], dim=-2)  # (B, L + L3, D)
        if context is not None:
            states = torch.cat([states, context.to(states.dtype)], dim=1)  # (B, L + L3 + M, D)
        return states, {"text_embeds": torch.cat([first.text_embeds, second.text_embeds], dim=-1)}  # (B, P_l + P_g)

    # --- training: flow matching, as the scheduler defines it ---
    default_inputs = {k: v for k, v in DiffusionGenerator.default_inputs.items() if k != "spelled_ids"}

    def forward(
        self,
        input_ids: torch.Tensor,  # (B, 2L + L3) the prompt in the three tokenizers
        pixel_values: torch.Tensor | None = None,  # (B, 3, H, W) target images in [-1, 1]
        latents: torch.Tensor | None = None,  # (B, C, h, w) scaled VAE latents
        loss_weight: torch.Tensor | None = None,  # (B,) e.g. prior_loss_weight on class images
        prior: torch.Tensor | None = None,  # (B,) True for prior-preservation (class) images
        context: torch.Tensor | None = None,  # (B, M, D) from a context bridge
    ) -> dict[str, torch.Tensor]:
        """The ports this layout takes (no token or image-prompt bridges yet); the loss is the SD 1.x generator's."""
        return super().forward(input_ids, pixel_values, latents, loss_weight, prior, context=context)

    def noised(self, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x_t = (1 - sigma) x0 + sigma noise at logit-normal timesteps (the SD3 paper's and script's default); target
        noise - x0."""
        from diffusers.training_utils import compute_density_for_timestep_sampling

        u = compute_density_for_timestep_sampling("logit_normal", batch_size=latents.shape[0], logit_mean=0.0, logit_std=1.0)
        indices = (u * self.scheduler.config.num_train_timesteps).long().clamp(max=len(self.scheduler.timesteps) - 1)
        timesteps = self.scheduler.timesteps[indices].to(latents.device)
        noise = torch.randn_like(latents)
        return self.scheduler.scale_noise(latents, timesteps, noise), timesteps, noise - latents

    def predict(self, noisy: torch.Tensor, timesteps: torch.Tensor, states: torch.Tensor, added: dict[str, torch.Tensor] | None,
                ip_tokens: torch.Tensor | None) -> torch.Tensor:
        self._conditioning(states, ip_tokens)  # no image prompt on this layout: tokens reaching it are refused
        assert added is not None  # encode_prompt always gives the pooled projections here
        return self.transformer(hidden_states=noisy, timestep=timesteps, encoder_hidden_states=states,
                                pooled_projections=added["text_embeds"].to(states.dtype)).sample

    # --- sampling ---
    def pipeline_parts(self) -> dict[str, Any]:
        return dict(vae=self.vae, transformer=self.transformer, text_encoder=self.text_encoder, text_encoder_2=self.text_encoder_2,
                    text_encoder_3=self.text_encoder_3, tokenizer=self.tokenizer, tokenizer_2=self.tokenizer_2,
                    tokenizer_3=self.tokenizer_3)
