"""BLIP-2's vision model (EVA ViT-g in the released checkpoints), giving exactly the tokens BLIP-2 feeds its Q-Former."""
from __future__ import annotations

from typing import Any

import torch

from mmadapt.core.identity import config_hash
from mmadapt.core.semantics import (Finding, NodeContext, inline_config_findings, meta_built, quiet_transformers, read_config,
                                    readable_config)
from mmadapt.encoders.hf_vision import TransformersImageEncoder, vision_part
from mmadapt.errors import MMAdaptError
from mmadapt.zoo import resolve_checkpoint

FULL = "blip-2"  # Blip2ForConditionalGeneration (and Blip2Model): its tower's tensors are vision_model.*
TOWER = "blip_2_vision_model"  # a saved Blip2VisionModel: its own folder
PREFIX = "vision_model."


def kind_problem(config: Any, where: str) -> str | None:
    """Why a config is not one this node builds its tower from (None when it is)."""
    model_type = getattr(config, "model_type", None)
    if model_type in (FULL, TOWER):
        return None
    return (f"{where} is a '{model_type}' model; blip2_vision takes a BLIP-2 folder (Blip2ForConditionalGeneration, "
            f"model_type {FULL}) or a saved Blip2VisionModel ({TOWER}); for CLIP or SigLIP towers use hf_vision")


def load_tower(checkpoint: str, full_config: Any, attn_implementation: str) -> Any:
    """The Blip2VisionModel of a saved tower, or of a full BLIP-2 folder's `vision_model.*` tensors."""
    from transformers import Blip2VisionModel

    path = resolve_checkpoint(checkpoint)
    if full_config.model_type == TOWER:
        return Blip2VisionModel.from_pretrained(path, attn_implementation=attn_implementation)
    with quiet_transformers():  # the other parts' tensors (qformer.*, language_model.*) are expected, not news
        tower, info = Blip2VisionModel.from_pretrained(path, config=full_config.vision_config, key_mapping={rf"^{PREFIX}": ""},
                                                       attn_implementation=attn_implementation, output_loading_info=True)
    missing = sorted(info["missing_keys"]) + sorted(info["mismatched_keys"])
    if missing:
        raise MMAdaptError(f"'{checkpoint}': its BLIP-2 vision tensors ({PREFIX}*) are missing or of other shapes than its "
                           f"vision_config says ({', '.join(map(str, missing[:3]))}{', ...' if len(missing) > 3 else ''})")
    return tower


class Blip2Vision(TransformersImageEncoder):
    """BLIP-2's vision tower; its output is `last_hidden_state` after post_layernorm, class token included, as
    Blip2ForConditionalGeneration gives its Q-Former (not a `hidden_states` entry, which has no final layer norm)."""

    def __init__(
        self,
        checkpoint: str | None = None,  # folder or hub id of a Blip2ForConditionalGeneration or Blip2VisionModel, or zoo:NAME
        config: dict[str, Any] | None = None,  # inline config (model_type blip_2_vision_model): random weights, for tests
        seed: int = 0,  # init seed for config-built random weights, so a card can rebuild them
        attn_implementation: str = "sdpa",  # transformers attention backend
    ) -> None:
        super().__init__()
        self._init_features(-1, "patch")  # the last layer's tokens, after post_layernorm: fixed by what BLIP-2 reads
        self.source = checkpoint or "inline-config"
        full_config = read_config(checkpoint, config)
        problem = kind_problem(full_config, f"'{checkpoint}'" if checkpoint else "the inline config")
        if problem:
            raise MMAdaptError(problem)
        self.config = vision_part(full_config)
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            if checkpoint is not None:
                self.model = load_tower(checkpoint, full_config, attn_implementation)
            else:
                from transformers import Blip2VisionModel

                self.model = Blip2VisionModel._from_config(self.config, attn_implementation=attn_implementation)
        self.processor = self._processor(checkpoint)
        self.transform = lambda image: self.processor(images=image, return_tensors="pt")["pixel_values"][0]  # (3, H, W)
        self.out_dim = int(self.config.hidden_size)

    def _processor(self, checkpoint: str | None) -> Any:
        """The folder's own image processor (BlipImageProcessor in BLIP-2 folders); without one, BLIP's defaults at
        the tower's image size (a square resize, bicubic, OpenAI CLIP mean and std)."""
        from transformers import AutoImageProcessor, BlipImageProcessor

        if checkpoint is not None:
            try:
                return AutoImageProcessor.from_pretrained(resolve_checkpoint(checkpoint))
            except (OSError, ValueError):
                pass
        size = int(self.config.image_size)
        return BlipImageProcessor(size={"height": size, "width": size})

    @classmethod
    def param_problems(cls, params: dict[str, Any], context: NodeContext) -> list[Finding]:
        """Inline config keys are known; the checkpoint or inline config is a BLIP-2 one."""
        findings = inline_config_findings(params.get("config"))
        config = readable_config(lambda: read_config(params.get("checkpoint"), params.get("config")))
        if config is None:
            return findings
        checkpoint = params.get("checkpoint")
        problem = kind_problem(config, f"'{checkpoint}'" if checkpoint is not None else "the inline config")
        return findings + ([Finding("checkpoint" if checkpoint is not None else "config", problem)] if problem else [])

    @classmethod
    def adapter_bases(cls, params: dict[str, Any]) -> dict[str, torch.nn.Module] | None:
        from transformers import Blip2VisionModel

        full = readable_config(lambda: read_config(params.get("checkpoint"), params.get("config")))
        if full is None or kind_problem(full, "") is not None:
            return None
        return {"model": meta_built(lambda: Blip2VisionModel._from_config(vision_part(full)))}

    def widths(self) -> dict[str, int]:
        return {"output": self.out_dim}

    def describe(self) -> dict[str, Any]:
        return {"source": self.source, "config_hash": config_hash(self.config.to_dict())}

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixel_values).last_hidden_state  # (B, 1 + N, D): class token, then patches
