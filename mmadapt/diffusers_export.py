"""Card exports that stock diffusers pipelines load: LoRA, LoKr, and textual-inversion embeddings; and the reverse import."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from mmadapt.card import peft_config_of
from mmadapt.errors import CardError
from mmadapt.model import AssembledModel

LORA_WEIGHTS = "pytorch_lora_weights.safetensors"  # the file name load_lora_weights looks for first
TEXTUAL_INVERSION = "learned_embeds.safetensors"  # the file name load_textual_inversion looks for first


def export_diffusers(model: AssembledModel, folder: Path) -> list[str]:
    """Write what `StableDiffusionPipeline` loads: LoRA via save_lora_weights (alpha kept in its metadata), LoKr via
    the U-Net's save_lora_adapter into `lokr/`, a static token via the textual-inversion layout. Returns what was written."""
    from peft import LoKrConfig, LoraConfig

    decoder = model.decoder
    written: list[str] = []
    folder.mkdir(parents=True, exist_ok=True)
    lora: dict[str, Any] = {}
    for inner in ("unet", "text_encoder"):
        module = getattr(decoder, inner)
        config = peft_config_of(module)
        if isinstance(config, LoraConfig):
            from diffusers.utils import convert_state_dict_to_diffusers
            from peft.utils import get_peft_model_state_dict

            lora[f"{inner}_lora_layers"] = convert_state_dict_to_diffusers(get_peft_model_state_dict(module))
            lora[f"{inner}_lora_adapter_metadata"] = config.to_dict()  # without it, alpha != r reloads as alpha = r
        elif isinstance(config, LoKrConfig):
            if inner != "unet":
                raise CardError("LoKr export covers the U-Net only; diffusers has no LoKr loader for the text encoder")
            module.save_lora_adapter(str(folder / "lokr"), safe_serialization=True)
            written.append("lokr/")
    if lora:
        from diffusers import StableDiffusionPipeline

        StableDiffusionPipeline.save_lora_weights(str(folder), weight_name=LORA_WEIGHTS, safe_serialization=True, **lora)
        written.append(LORA_WEIGHTS)
    token = static_token(model)
    if token is not None:
        save_file({decoder.placeholder: token}, str(folder / TEXTUAL_INVERSION))
        written.append(TEXTUAL_INVERSION)
    if not written:  # e.g. an AudioToken card: a per-sample token has nothing stock diffusers could load
        folder.rmdir()
    return written


def static_token(model: AssembledModel) -> torch.Tensor | None:
    """(K, D) embeddings of an input-free bridge wired to the placeholder (textual inversion), else None."""
    refs = model.plan.inputs[model.decoder_name].get("token_embeds", [])
    sources = [r.source for r in refs if not r.is_data]
    if len(sources) != 1 or model.plan.inputs[sources[0]]:
        return None  # a per-sample token (AudioToken) has no single embedding to export
    with torch.no_grad():
        return model.nodes[sources[0]](batch_size=1)[0].detach().float().cpu().contiguous()


def load_diffusers_lora(model: AssembledModel, path: str | Path) -> None:
    """Put a LoRA trained elsewhere in diffusers' format onto the graph's U-Net (and text encoder) for generation."""
    from diffusers import StableDiffusionPipeline

    path = Path(path)
    if not path.exists():  # diffusers' own message for a missing folder offline talks about weight_name
        raise CardError(f"{path}: no such LoRA file or folder")
    pipeline = model.decoder.sampling_pipeline()
    kwargs = {"weight_name": path.name} if path.is_file() else {}
    try:
        pipeline.load_lora_weights(str(path.parent if path.is_file() else path), **kwargs)
    except (ValueError, OSError, KeyError) as exc:
        raise CardError(f"{path}: not a diffusers LoRA this pipeline accepts ({str(exc).splitlines()[0]})") from None
