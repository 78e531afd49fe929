"""The literal name -> class tables for graph nodes, adapters and datasets, plus dotted-path import."""
from __future__ import annotations

import difflib
import importlib
from typing import Any

# Values are dotted paths rather than classes so that `mmadapt validate` does not import every
# heavy backend (diffusers, open_clip) just to read the table. Nothing registers itself on import.
NODE_TYPES: dict[str, str] = {
    "open_clip_vision": "mmadapt.encoders.open_clip_vision.OpenCLIPVision",
    "hf_vision": "mmadapt.encoders.hf_vision.HFVisionTower",
    "point_bert": "mmadapt.encoders.point_cloud.PointBERT",
    "audiomae": "mmadapt.encoders.audiomae.AudioMAE",
    "hf_audio": "mmadapt.encoders.hf_audio.HFAudioEncoder",
    "causal_lm": "mmadapt.decoders.causal_lm.CausalLM",
    "diffusion": "mmadapt.decoders.diffusion.DiffusionDecoder",
    "token": "bridges.token.TokenEmbedder",
    "linear_projector": "bridges.projector.LinearProjector",
    "mlp_projector": "bridges.projector.MLPProjector",
    "qformer": "bridges.qformer.QFormer",
    "prefix": "bridges.prefix.PrefixMapper",
    "soft_prompt": "bridges.soft_prompt.SoftPrompt",
}

ADAPTER_TYPES: dict[str, str] = {
    "lora": "bridges.lora.LoRA",
    "lokr": "bridges.lokr.LoKr",
}

DATA_TYPES: dict[str, str] = {
    "image_captions": "mmadapt.data.ImageCaptionDataset",
    "audio_captions": "mmadapt.data.AudioCaptionDataset",
    "digits_captions": "mmadapt.digits.DigitsCaptions",
    "digits_points": "mmadapt.points.DigitsPoints",
    "point_captions": "mmadapt.points.PointCaptionDataset",
    "fsdd_captions": "mmadapt.fsdd.FSDDCaptions",
    "dreambooth": "mmadapt.personalize.DreamBoothImages",
    "mixture": "mmadapt.mixture.MixtureDataset",
}


class UnknownType(LookupError):
    """A `type:` is neither a name in the table nor an importable dotted path."""


def resolve(type_name: str, table: dict[str, str]) -> type:
    """Return the class named by a table entry or by a dotted path such as `my_pkg.module.Class`."""
    if not isinstance(type_name, str) or not type_name:
        raise UnknownType(f"must be a non-empty string; known types: {', '.join(sorted(table))}")
    dotted = table.get(type_name)
    if dotted is None and "." not in type_name:
        close = difflib.get_close_matches(type_name, list(table), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise UnknownType(
            f"unknown type '{type_name}'{hint}; known types: {', '.join(sorted(table))}, "
            "or a dotted path such as my_pkg.module.Class"
        )
    return import_dotted(dotted or type_name)


def import_dotted(path: str) -> Any:
    """Import `package.module.Attr`; errors say which part failed."""
    module_name, _, attr = path.rpartition(".")
    if not module_name:
        raise UnknownType(f"'{path}' is not a dotted path (expected package.module.Class)")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise UnknownType(f"cannot import module '{module_name}' for type '{path}': {exc}") from exc
    try:
        return getattr(module, attr)
    except AttributeError as exc:
        raise UnknownType(f"module '{module_name}' has no attribute '{attr}'") from exc
