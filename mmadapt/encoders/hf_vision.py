"""transformers vision towers: CLIPVisionModel, SiglipVisionModel or any AutoModel vision backbone."""
from __future__ import annotations

from typing import Any

import torch

from mmadapt.encoders.image import ImageEncoder
from mmadapt.errors import MMAdaptError
from mmadapt.identity import config_hash
from mmadapt.nodes import WidthUnknown
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


def read_config(checkpoint: str | None, config: dict[str, Any] | None) -> Any:
    """A transformers config from a folder/hub id (no weights) or from an inline dict with `model_type`."""
    from transformers import AutoConfig

    if (checkpoint is None) == (config is None):
        raise MMAdaptError("give exactly one of checkpoint (a folder, hub id or zoo:NAME) or config (with model_type)")
    if config is not None:
        config = dict(config)
        model_type = config.pop("model_type", None)
        if model_type is None:
            raise MMAdaptError("an inline config needs a model_type, e.g. clip_vision_model or llama")
        try:
            return AutoConfig.for_model(model_type, **config)
        except (ValueError, TypeError) as exc:
            raise MMAdaptError(f"inline config: {exc}") from None
    try:
        return AutoConfig.from_pretrained(resolve_checkpoint(checkpoint))
    except OSError as exc:
        raise WidthUnknown(f"cannot read the config of '{checkpoint}': {str(exc).splitlines()[0]}") from None


def vision_part(config: Any) -> Any:
    return getattr(config, "vision_config", None) or config


class HFVisionTower(ImageEncoder):
    """A transformers vision model; tokens come from `hidden_states[layer]`, as LLaVA selects them."""

    def __init__(
        self,
        checkpoint: str | None = None,  # folder or hub id of a vision or dual-tower model, or zoo:NAME
        config: dict[str, Any] | None = None,  # inline config with model_type: random weights, for tests
        layer: int = -2,  # index into hidden_states; -2 is LLaVA's vision_feature_layer
        feature: str = "patch",  # patch tokens (B, N, D) or pooler_output as (B, 1, D)
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
        tower_cls = _tower_classes().get(full_config.model_type)
        if tower_cls is None:
            from transformers import AutoModel as tower_cls  # noqa: N813 - any vision backbone
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

    def transform_images(self, images: list[Any]) -> list[torch.Tensor]:
        # One processor call per batch: each call pays ~0.6 ms of argument validation, as much as a 32 px image's work.
        return list(self.processor(images=images, return_tensors="pt")["pixel_values"].unbind(0))

    def transform_description(self) -> str:
        return repr(sorted(self.processor.to_dict().items()))

    @classmethod
    def config_widths(cls, params: dict[str, Any]) -> dict[str, int]:
        config = vision_part(read_config(params.get("checkpoint"), params.get("config")))
        return {"output": int(config.hidden_size)}

    def widths(self) -> dict[str, int]:
        return {"output": self.out_dim}

    def describe(self) -> dict[str, Any]:
        return {"source": self.source, "config_hash": config_hash(self.config.to_dict())}

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
