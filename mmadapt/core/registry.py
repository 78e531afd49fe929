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
    "blip2_vision": "mmadapt.encoders.blip2_vision.Blip2Vision",
    "point_bert": "mmadapt.encoders.point_cloud.PointBERT",
    "audiomae": "mmadapt.encoders.audiomae.AudioMAE",
    "hf_audio": "mmadapt.encoders.hf_audio.HFAudioEncoder",
    "causal_lm": "mmadapt.generators.causal_lm.CausalLM",
    "diffusion": "mmadapt.generators.diffusion.generator.DiffusionGenerator",
    "sdxl": "mmadapt.generators.diffusion.sdxl.SDXLGenerator",
    "sd3": "mmadapt.generators.diffusion.sd3.SD3Generator",
    "token": "bridges.token.TokenEmbedder",
    "linear_projector": "bridges.projector.LinearProjector",
    "mlp_projector": "bridges.projector.MLPProjector",
    "qformer": "bridges.qformer.QFormer",
    "prefix": "bridges.prefix.PrefixMapper",
    "soft_prompt": "bridges.soft_prompt.SoftPrompt",
    "ip_adapter": "bridges.ip_adapter.IPAdapter",
}

ADAPTER_TYPES: dict[str, str] = {
    "lora": "bridges.lora.LoRA",
    "lokr": "bridges.lokr.LoKr",
}

DATA_TYPES: dict[str, str] = {
    "image_captions": "mmadapt.data.captions.ImageCaptionDataset",
    "hf_dataset": "mmadapt.data.hf_dataset.HFCaptionDataset",
    "audio_captions": "mmadapt.data.captions.AudioCaptionDataset",
    "digits_captions": "mmadapt.data.digits.DigitsCaptions",
    "digits_points": "mmadapt.data.points.DigitsPoints",
    "point_captions": "mmadapt.data.points.PointCaptionDataset",
    "fsdd_captions": "mmadapt.data.fsdd.FSDDCaptions",
    "dreambooth": "mmadapt.data.dreambooth.DreamBoothImages",
    "mixture": "mmadapt.data.mixture.MixtureDataset",
    "conversations": "mmadapt.data.conversations.Conversations",
    "digits_conversations": "mmadapt.data.conversations.DigitsConversations",
    "hf_conversations": "mmadapt.data.hf_dataset.HFConversations",
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
    except Exception as exc:  # noqa: BLE001 - a plugin failing as it imports (SyntaxError, its own errors) names itself
        raise UnknownType(f"cannot import module '{module_name}' for type '{path}': {type(exc).__name__}: {exc}") from exc
    try:
        return getattr(module, attr)
    except AttributeError as exc:
        raise UnknownType(f"module '{module_name}' has no attribute '{attr}'") from exc


def sub_sections(section: dict[str, Any]) -> list[dict[str, Any]] | None:
    """The data sections a composite section (a mixture) is made of, read from its type's `section_lists`; None for a
    plain section, or one whose type does not resolve."""
    try:
        names = getattr(resolve(str(section.get("type", "")), DATA_TYPES), "section_lists", ())
    except UnknownType:
        return None
    if not names:
        return None
    return [part for name in names for part in (section.get(name) or []) if isinstance(part, dict)]


def would_import(type_name: object, table: dict[str, str]) -> bool:
    """Whether `resolve` would import a module named by the recipe itself (a dotted path, not a table name)."""
    name = str(type_name)
    return name not in table and "." in name


def foreign_types(raw: dict[str, Any]) -> list[tuple[str, str]]:
    """(where, type) for every `type:` of a recipe that names code outside mmadapt's tables: a graph node, an adapter,
    a data section (mixture parts included). Nothing is imported to find them."""
    found: list[tuple[str, str]] = []

    def walk(value: Any, where: str, table: dict[str, str]) -> None:
        if isinstance(value, dict):
            if "type" in value and would_import(value["type"], table):
                found.append((f"{where}.type", str(value["type"])))
            for key, item in value.items():
                if key != "type":
                    walk(item, f"{where}.{key}", table)
        elif isinstance(value, list):
            for index, item in enumerate(value):
                walk(item, f"{where}[{index}]", table)

    graph = raw.get("graph")
    for name, spec in (graph.items() if isinstance(graph, dict) else ()):
        if isinstance(spec, dict):
            if would_import(spec.get("type", ""), NODE_TYPES):
                found.append((f"graph.{name}.type", str(spec["type"])))
            walk(spec.get("adapters"), f"graph.{name}.adapters", ADAPTER_TYPES)
    for key in ("data", "val_data"):
        walk(raw.get(key), key, DATA_TYPES)
    return found
