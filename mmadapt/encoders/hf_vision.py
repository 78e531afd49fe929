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
from mmadapt.errors import MMAdaptError
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


def tower_class(full_config: Any, projection: bool = False) -> Any:
    """The class that builds the tower: the vision half of a dual-tower family, else AutoModel (any vision backbone);
    with `projection`, CLIP's vision half with its image projection (the image encoder IP-Adapter and diffusers load)."""
    from transformers import AutoModel, CLIPVisionModelWithProjection

    if projection:
        return CLIPVisionModelWithProjection
    return _tower_classes().get(full_config.model_type) or AutoModel


def projection_dim(full_config: Any) -> int | None:
    """The width of a CLIP config's image projection, or None for a config without one (not CLIP)."""
    if full_config.model_type not in ("clip", "clip_vision_model"):
        return None
    return int(getattr(full_config, "projection_dim", None) or vision_part(full_config).projection_dim)


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
        # CLIP only: load the tower with its image projection (CLIPVisionModelWithProjection); feature: pooled then gives
        # the projected image embedding (B, 1, projection_dim), the one IP-Adapter's plain variant and diffusers read
        projection: bool = False,
    ) -> None:
        super().__init__()
        self._init_features(layer, feature)
        self.keep_cls, self.projection = keep_cls, projection
        self.source = checkpoint or "inline-config"
        full_config = read_config(checkpoint, config)
        self.config = vision_part(full_config)
        if projection and projection_dim(full_config) is None:
            raise MMAdaptError(f"projection: a {full_config.model_type!r} tower has no CLIP image projection")
        tower_cls = tower_class(full_config, projection)
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
        if projection and feature == "pooled":
            self.out_dim = projection_dim(full_config) or self.out_dim

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
        full = readable_config(lambda: read_config(params.get("checkpoint"), params.get("config")))
        config = None if full is None else vision_part(full)
        if full is not None and argument(cls, params, "projection") and projection_dim(full) is None:
            findings.append(Finding("projection", f"a {full.model_type!r} tower has no CLIP image projection; only CLIP "
                                                  "checkpoints carry one"))
        if config is not None and argument(cls, params, "feature") == "patch":
            finding = hidden_states_finding(argument(cls, params, "layer"), config)
            findings += [finding] if finding else []
        return findings

    @classmethod
    def adapter_bases(cls, params: dict[str, Any]) -> dict[str, torch.nn.Module] | None:
        full = readable_config(lambda: read_config(params.get("checkpoint"), params.get("config")))
        if full is None:
            return None
        projection = bool(params.get("projection")) and projection_dim(full) is not None
        tower_cls = tower_class(full, projection)
        build = getattr(tower_cls, "from_config", None) or tower_cls._from_config
        return {"model": meta_built(lambda: build(vision_part(full)))}

    @classmethod
    def config_widths(cls, params: dict[str, Any]) -> dict[str, int]:
        full = read_config(params.get("checkpoint"), params.get("config"))
        if params.get("projection") and params.get("feature", "patch") == "pooled" and projection_dim(full) is not None:
            return {"output": int(projection_dim(full) or 0)}
        return {"output": int(vision_part(full).hidden_size)}

    def widths(self) -> dict[str, int]:
        return {"output": self.out_dim}

    def describe(self) -> dict[str, Any]:
        return {"source": self.source, "config_hash": config_hash(self.config.to_dict())}

    def transformers_tower(self) -> TransformersTower | None:
        if self.feature != "patch":
            return None
        has_cls = self.config.model_type != "siglip_vision_model"  # CLIP leads with a class token; SigLIP has none
        model = merged(self.model)
        if self.projection:  # the image projection reads no patch token: the tokens' tower is its vision_model alone
            from transformers import CLIPVisionModel

            tokens_only = CLIPVisionModel(self.config)
            tokens_only.vision_model = model.vision_model
            model = tokens_only
        return TransformersTower(model, self.processor, self.layer, has_cls, self.keep_cls)

    def diffusers_image_encoder(self) -> torch.nn.Module | None:
        """This tower (adapters merged) when its output is the projected embedding, read through the CLIPImageProcessor
        that `load_ip_adapter` makes at the tower's image size: then stock diffusers computes it from the picture."""
        from transformers import CLIPImageProcessor

        size = int(self.config.image_size)
        default = CLIPImageProcessor(size=size, crop_size=size).to_dict()
        same_pixels = {k: v for k, v in self.processor.to_dict().items() if k in default} == default
        return merged(self.model) if self.projection and self.feature == "pooled" and same_pixels else None

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        outputs = self.model(pixel_values=pixel_values, output_hidden_states=self.feature == "patch")
        if self.feature == "pooled" and self.projection:
            return outputs.image_embeds.unsqueeze(1)  # (B, 1, projection_dim)
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
