"""open_clip image towers: named model + pretrained tag, a local folder, or an inline config."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from mmadapt.encoders.image import ImageEncoder, TransformersTower
from mmadapt.errors import MMAdaptError
from mmadapt.core.identity import config_hash
from mmadapt.core.nodes import WidthUnknown
from mmadapt.core.params import Feature
from mmadapt.core.semantics import Finding, NodeContext, argument, config_key_findings, layer_finding, meta_built, readable_config
from mmadapt.zoo import resolve_checkpoint


def _model_config(checkpoint: str | None, model: str | None, config: dict[str, Any] | None) -> dict[str, Any]:
    """The open_clip model config, read without building anything."""
    import open_clip

    sources = [s for s in (checkpoint, model, config) if s is not None]
    if len(sources) != 1:
        raise MMAdaptError("give exactly one of checkpoint (a folder or zoo:NAME), model (+ pretrained) or config")
    if config is not None:
        return config
    if checkpoint is not None:
        path = Path(resolve_checkpoint(checkpoint)) / "open_clip_config.json"
        if not path.is_file():
            raise MMAdaptError(f"checkpoint '{checkpoint}': no open_clip_config.json in {path.parent}")
        return json.loads(path.read_text())["model_cfg"]
    found = open_clip.get_model_config(model)
    if found is None:
        raise MMAdaptError(f"open_clip has no model '{model}'; see open_clip.list_models()")
    return found


class OpenCLIPVision(ImageEncoder):
    """The image tower of an open_clip CLIP model."""

    adapter_target = "visual"

    def __init__(
        self,
        checkpoint: str | None = None,  # local folder with open_clip_config.json, or zoo:NAME
        model: str | None = None,  # an open_clip model name, e.g. ViT-L-14-336
        pretrained: str | None = None,  # its pretrained tag (downloads), e.g. openai
        config: dict[str, Any] | None = None,  # inline model config: random weights, for tests
        layer: int = -2,  # which block's patch tokens; -2 is the penultimate, as LLaVA uses
        feature: Feature = "patch",  # patch tokens (B, N, width) or the pooled embedding (B, 1, embed_dim)
        keep_cls: bool = False,  # keep the class token in front of the patch tokens
        seed: int = 0,  # init seed for config-built random weights, so a card can rebuild them
        load_weights: bool = True,  # false: the checkpoint's architecture with random weights (a control run)
    ) -> None:
        super().__init__()
        import open_clip

        self._init_features(layer, feature)
        self.keep_cls = keep_cls
        self.model_config = _model_config(checkpoint, model, config)
        self.source = (checkpoint or model or "inline-config") + ("" if load_weights else " (random weights)")
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            if checkpoint is not None:
                name = "local-dir:" + resolve_checkpoint(checkpoint)
                clip, _, self.transform = open_clip.create_model_and_transforms(name, load_weights=load_weights)
            elif model is not None:
                clip, _, self.transform = open_clip.create_model_and_transforms(model, pretrained=pretrained, load_weights=load_weights)
            else:
                clip = open_clip.model.CLIP(**config)  # type: ignore[arg-type]
                self.transform = open_clip.image_transform(clip.visual.image_size, is_train=False)
        self.visual = clip.visual  # the text tower is not needed: drop it to save memory
        if feature == "patch" and not hasattr(self.visual, "transformer"):
            raise MMAdaptError(f"patch features need open_clip's own VisionTransformer, not {type(self.visual).__name__}; use feature: pooled")
        self.num_layers = len(self.visual.transformer.resblocks) if hasattr(self.visual, "transformer") else 0
        self.out_dim = self.visual.transformer.width if feature == "patch" else self.visual.output_dim

    @classmethod
    def config_widths(cls, params: dict[str, Any]) -> dict[str, int]:
        cfg = _model_config(params.get("checkpoint"), params.get("model"), params.get("config"))
        vision = cfg.get("vision_cfg", {})
        if params.get("feature", "patch") == "pooled":
            return {"output": int(cfg["embed_dim"])}
        if "width" not in vision:
            raise WidthUnknown("a timm-based tower states no width in its config")
        return {"output": int(vision["width"])}

    source_params = {"checkpoint": None}  # a local folder (open_clip_config.json) or zoo:NAME; hub weights come by `model`

    @classmethod
    def param_problems(cls, params: dict[str, Any], context: NodeContext) -> list[Finding]:
        """Inline config keys against open_clip's CLIP and its vision/text config classes; `layer` within the blocks."""
        import open_clip

        findings = config_key_findings(params.get("config"), open_clip.model.CLIP,
                                       sub_configs={"vision_cfg": open_clip.model.CLIPVisionCfg, "text_cfg": open_clip.model.CLIPTextCfg})
        cfg = readable_config(lambda: _model_config(params.get("checkpoint"), params.get("model"), params.get("config")))
        layers = (cfg.get("vision_cfg") or {}).get("layers") if isinstance(cfg, dict) else None
        if isinstance(layers, int) and argument(cls, params, "feature") == "patch":
            finding = layer_finding(argument(cls, params, "layer"), -layers, layers - 1, f"the {layers} blocks of the tower")
            findings += [finding] if finding else []
        return findings

    @classmethod
    def adapter_bases(cls, params: dict[str, Any]) -> dict[str, torch.nn.Module] | None:
        import open_clip

        cfg = readable_config(lambda: _model_config(params.get("checkpoint"), params.get("model"), params.get("config")))
        try:
            return None if cfg is None else {"visual": meta_built(lambda: open_clip.model.CLIP(**cfg).visual)}
        except (TypeError, ValueError, RuntimeError):
            return None  # a model family CLIP(**cfg) does not build (custom text towers): left to load time

    def widths(self) -> dict[str, int]:
        return {"output": self.out_dim}

    def describe(self) -> dict[str, Any]:
        return {"source": self.source, "config_hash": config_hash(self.model_config)}

    def transformers_tower(self) -> TransformersTower | None:
        """The tower as transformers' CLIPVisionModel (the same architecture as OpenAI's CLIP ViT), checked to give the
        same tokens; None for what CLIPVisionModel cannot hold (layer scale, attention pooling, no class token)."""
        from mmadapt.encoders.open_clip_to_hf import as_clip_vision_model

        return None if self.feature != "patch" else as_clip_vision_model(self)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if self.feature == "pooled":
            return self.visual(pixel_values).unsqueeze(1)  # (B, 1, embed_dim)
        block = self.layer if self.layer >= 0 else self.num_layers + self.layer
        out = self.visual.forward_intermediates(
            pixel_values, indices=[block], output_fmt="NLC", output_extra_tokens=self.keep_cls, intermediates_only=True
        )
        tokens = out["image_intermediates"][0]  # (B, N, width)
        if self.keep_cls:
            tokens = torch.cat([out["image_intermediates_prefix"][0], tokens], dim=1)  # (B, 1 + N, width)
        return tokens
