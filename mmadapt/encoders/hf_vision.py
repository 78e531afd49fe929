"""transformers vision towers: CLIPVisionModel, SiglipVisionModel or any AutoModel vision backbone."""
from __future__ import annotations

from typing import Any

import torch

from mmadapt.encoders.image import ImageEncoder, TransformersTower
from mmadapt.core.identity import config_hash
from mmadapt.core.nodes import merged
from mmadapt.core.params import Feature
from mmadapt.core.semantics import (Finding, read_config, NodeContext, argument, inline_config_findings, layer_finding, meta_built,
                               readable_config)
from mmadapt.zoo import resolve_checkpoint


def _tower_classes() -> dict[str, type]:
    """model_type -> the class that loads just the vision half of a dual-tower checkpoint."""
    from transformers import CLIPVisionModel, SiglipVisionModel

    return {
        "clip": CLIPVisionModel,
        "clip_vision_model": CLIPVisionModel,
        "siglip": SiglipVisionModel,
        "siglip_vision_model": SiglipVisionModel,
    }


def vision_part(config: Any) -> Any:
    return getattr(config, "vision_config", None) or config


def tower_class(full_config: Any) -> Any:
    """The class that builds the tower: the vision half of a dual-tower family, else AutoModel (any vision backbone)."""
    from transformers import AutoModel

    return _tower_classes().get(full_config.model_type) or AutoModel


def hidden_states_finding(layer: Any, config: Any) -> Finding | None:
    """`layer` indexes hidden_states: the embeddings, then one entry per transformer layer."""
    layers = getattr(config, "num_hidden_layers", None)
    if not isinstance(layers, int):
        return None
    what = f"the {layers + 1} hidden_states of a {layers}-layer tower (the embeddings, then each layer)"
    return layer_finding(layer, -(layers + 1), layers, what)


class TransformersImageEncoder(ImageEncoder):
    """A transformers vision model read through its own image processor (`self.processor`); its width from its config."""

    processor: Any
    source_params = {"checkpoint": "config.json"}

    def transform_images(self, images: list[Any]) -> list[torch.Tensor]:
        # One processor call per batch: each call pays ~0.6 ms of argument validation, as much as a 32 px image's work.
        return list(self.processor(images=images, return_tensors="pt")["pixel_values"].unbind(0))

    def transform_description(self) -> str:
        return repr(sorted(self.processor.to_dict().items()))

    source_params = {"checkpoint": "config.json"}

    @classmethod
    def config_widths(cls, params: dict[str, Any]) -> dict[str, int]:
        config = vision_part(read_config(params.get("checkpoint"), params.get("config")))
        return {"output": int(config.hidden_size)}


class HFVisionTower(TransformersImageEncoder):
    """A transformers vision model; tokens come from `hidden_states[layer]`, as LLaVA selects them."""

    def __init__(
        self,
        checkpoint: str | None = None,  # folder or hub id of a vision or dual-tower model, or zoo:NAME
        config: dict[str, Any] | None = None,  # inline config with model_type: random weights, for tests
        layer: int = -2,  # index into hidden_states; -2 is LLaVA's vision_feature_layer
        feature: Feature = "patch",  # patch tokens (B, N, D) or pooler_output as (B, 1, D)
        keep_cls: bool = False,  # keep the class token (LLaVA's "full" strategy) instead of dropping it
        seed: int = 0,  # init seed for config-built random weights, so a card can rebuild them
        attn_implementation: str = "sdpa",  # transformers attention backend
    ) -> None:
        super().__init__()
        self._init_features(layer, feature)
        self.keep_cls = keep_cls
        self.source = checkpoint or "inline-config"
        full_config = read_config(checkpoint, config)
        self.config = vision_part(full_config)
        tower_cls = tower_class(full_config)
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            if checkpoint is not None:
                path = resolve_checkpoint(checkpoint)
                self.model = tower_cls.from_pretrained(path, attn_implementation=attn_implementation)
            else:
                # Auto classes build through from_config; concrete model classes through _from_config.
                build = getattr(tower_cls, "from_config", None) or tower_cls._from_config
                self.model = build(self.config, attn_implementation=attn_implementation)
        self.transform = self._processor(checkpoint)
        self.out_dim = int(self.config.hidden_size)

    def _processor(self, checkpoint: str | None) -> Any:
        """The checkpoint's own image processor; a config-built tower gets CLIP's defaults at its image size."""
        from transformers import AutoImageProcessor, CLIPImageProcessor

        processor = None
        if checkpoint is not None:
            try:
                processor = AutoImageProcessor.from_pretrained(resolve_checkpoint(checkpoint))
            except (OSError, ValueError):
                processor = None
        if processor is None:
            size = int(self.config.image_size)
            processor = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
        self.processor = processor
        return lambda image: processor(images=image, return_tensors="pt")["pixel_values"][0]

    @classmethod
    def param_problems(cls, params: dict[str, Any], context: NodeContext) -> list[Finding]:
        findings = inline_config_findings(params.get("config"))
        config = readable_config(lambda: vision_part(read_config(params.get("checkpoint"), params.get("config"))))
        if config is not None and argument(cls, params, "feature") == "patch":
            finding = hidden_states_finding(argument(cls, params, "layer"), config)
            findings += [finding] if finding else []
        return findings

    @classmethod
    def adapter_bases(cls, params: dict[str, Any]) -> dict[str, torch.nn.Module] | None:
        full = readable_config(lambda: read_config(params.get("checkpoint"), params.get("config")))
        if full is None:
            return None
        tower_cls = tower_class(full)
        build = getattr(tower_cls, "from_config", None) or tower_cls._from_config
        return {"model": meta_built(lambda: build(vision_part(full)))}

    def widths(self) -> dict[str, int]:
        return {"output": self.out_dim}

    def describe(self) -> dict[str, Any]:
        return {"source": self.source, "config_hash": config_hash(self.config.to_dict())}

    def transformers_tower(self) -> TransformersTower | None:
        if self.feature != "patch":
            return None
        has_cls = self.config.model_type != "siglip_vision_model"  # CLIP leads with a class token; SigLIP has none
        return TransformersTower(merged(self.model), self.processor, self.layer, has_cls, self.keep_cls)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        outputs = self.model(pixel_values=pixel_values, output_hidden_states=self.feature == "patch")
        if self.feature == "pooled":
            return outputs.pooler_output.unsqueeze(1)  # (B, 1, D)
        tokens = outputs.hidden_states[self.layer]  # (B, T, D)
        patch_size = getattr(self.config, "patch_size", None)
        image_size = getattr(self.config, "image_size", None)
        if patch_size and image_size and not self.keep_cls:
            num_patches = (int(image_size) // int(patch_size)) ** 2
            if tokens.shape[1] == num_patches + 1:  # a class token leads (CLIP); SigLIP has none
                tokens = tokens[:, 1:]
        return tokens  # (B, N, D)
