"""Card exports that stock diffusers pipelines load: LoRA, LoKr, textual-inversion embeddings and IP-Adapter; and the
reverse import."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from mmadapt.core.nodes import Encoder, peft_config_of
from mmadapt.errors import CardError
from mmadapt.core.model import AssembledModel

LORA_WEIGHTS = "pytorch_lora_weights.safetensors"  # the file name load_lora_weights looks for first
TEXTUAL_INVERSION = "learned_embeds.safetensors"  # the file name load_textual_inversion looks for first
IP_ADAPTER_WEIGHTS = "ip_adapter.safetensors"  # pipe.load_ip_adapter(folder, subfolder="", weight_name=this)
IMAGE_ENCODER = "image_encoder"  # the folder load_ip_adapter reads a CLIPVisionModelWithProjection from by default


def export_diffusers(model: AssembledModel, folder: Path) -> list[str]:
    """Write what the layout's stock pipeline loads: LoRA via its save_lora_weights (alpha kept in the metadata), LoKr via
    the U-Net's save_lora_adapter into `lokr/`, a static token via the textual-inversion layout. Returns what was written."""
    from peft import LoKrConfig, LoraConfig

    generator = model.generator
    written: list[str] = []
    folder.mkdir(parents=True, exist_ok=True)
    lora: dict[str, Any] = {}
    for inner in generator.lora_parts:
        module = getattr(generator, inner)
        config = peft_config_of(module)
        if isinstance(config, LoraConfig):
            from peft.utils import get_peft_model_state_dict

            # peft's own key names, unconverted: diffusers reads a whole file as peft when its keys are, while its
            # converter renames attention keys only, so a mixed target set came out half renamed and half dropped
            state = get_peft_model_state_dict(module)
            lora[f"{inner}_lora_layers"] = text_encoder_keys(state) if inner.startswith("text_encoder") else state
            lora[f"{inner}_lora_adapter_metadata"] = config.to_dict()  # without it, alpha != r reloads as alpha = r
        elif isinstance(config, LoKrConfig):
            if inner != generator.adapter_target:
                raise CardError(f"LoKr export covers the {generator.adapter_target} only; diffusers has no LoKr loader for the {inner}")
            module.save_lora_adapter(str(folder / "lokr"), safe_serialization=True)
            written.append("lokr/")
    if lora:
        import diffusers

        getattr(diffusers, generator.pipeline_class).save_lora_weights(str(folder), weight_name=LORA_WEIGHTS,
                                                                         safe_serialization=True, **lora)
        written.append(LORA_WEIGHTS)
    token = static_token(model)
    if token is not None:
        save_file(generator.textual_inversion_state(token), str(folder / TEXTUAL_INVERSION))
        written.append(TEXTUAL_INVERSION)
    ip_adapter = ip_adapter_tensors(model)
    if ip_adapter is not None:
        save_file(ip_adapter, str(folder / IP_ADAPTER_WEIGHTS))
        written.append(IP_ADAPTER_WEIGHTS)
        encoder = ip_image_encoder(model)
        if encoder is not None:  # load_ip_adapter's default image_encoder_folder: the pipeline then takes ip_adapter_image
            encoder.save_pretrained(str(folder / IMAGE_ENCODER), safe_serialization=True)
            written.append(f"{IMAGE_ENCODER}/")
    if not written:  # e.g. an AudioToken card: a per-sample token has nothing stock diffusers could load
        folder.rmdir()
    return written


def text_encoder_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """peft keys in the one layout diffusers' text-encoder loader reads for every module (`lora_linear_layer.up/down`):
    it renames peft keys of attention only, then needs a renamed key to tell the format, so an MLP-only LoRA failed."""
    return {k.replace(".lora_A.", ".lora_linear_layer.down.").replace(".lora_B.", ".lora_linear_layer.up."): v
            for k, v in state.items()}


def static_token(model: AssembledModel) -> torch.Tensor | None:
    """(K, D) embeddings of an input-free bridge wired to the placeholder (textual inversion), else None."""
    refs = model.plan.inputs[model.generator_name].get("token_embeds", [])
    sources = [r.source for r in refs if not r.is_data]
    if len(sources) != 1 or model.plan.inputs[sources[0]]:
        return None  # a per-sample token (AudioToken) has no single embedding to export
    with torch.no_grad():
        return model.nodes[sources[0]](batch_size=1)[0].detach().float().cpu().contiguous()


def ip_adapter_tensors(model: AssembledModel) -> dict[str, torch.Tensor] | None:
    """IP-Adapter's file layout, as `load_ip_adapter` reads it: `image_proj.*` from the bridge's projection,
    and `ip_adapter.{n}.to_{k,v}_ip.weight` from the U-Net's processors, n = 1, 3, 5, ... in `attn_processors` order (the
    loader counts every cross-attention by two). None when no IP-Adapter bridge feeds the generator."""
    refs = model.plan.inputs[model.generator_name].get("ip_tokens", [])
    if not refs:
        return None
    tensors = {f"image_proj.{k}": v for k, v in model.nodes[refs[0].source].image_proj_state().items()}
    for index, processor in enumerate(model.generator.ip_processors()):
        tensors[f"ip_adapter.{1 + 2 * index}.to_k_ip.weight"] = processor.to_k_ip[0].weight
        tensors[f"ip_adapter.{1 + 2 * index}.to_v_ip.weight"] = processor.to_v_ip[0].weight
    return {k: v.detach().float().cpu().contiguous() for k, v in tensors.items()}


def ip_image_encoder(model: AssembledModel) -> torch.nn.Module | None:
    """A plain IP-Adapter's encoder as the CLIPVisionModelWithProjection that stock diffusers runs on a picture, when
    `encode_image` computes what the bridge reads (an hf_vision tower with `projection`, feature pooled). Else None:
    the pipeline takes the embeddings the bridge's `embedding` gives (`ip_adapter_image_embeds`). A plus adapter is
    never given one: diffusers' negative for it is the encoder's tokens of a zero picture, not the zeros guidance used."""
    ip_source = model.plan.inputs[model.generator_name]["ip_tokens"][0].source
    refs = model.plan.inputs[ip_source].get("context", [])
    if model.nodes[ip_source].variant != "plain" or len(refs) != 1 or refs[0].is_data:
        return None
    encoder = model.nodes[refs[0].source]
    return encoder.diffusers_image_encoder() if isinstance(encoder, Encoder) else None


def load_diffusers_lora(model: AssembledModel, path: str | Path) -> None:
    """Put a LoRA trained elsewhere in diffusers' format onto the graph's U-Net (and text encoder) for generation."""

    path = Path(path)
    if not path.exists():  # diffusers' own message for a missing folder offline talks about weight_name
        raise CardError(f"{path}: no such LoRA file or folder")
    from mmadapt.core.checkpoint_io import read_safetensors

    for weights in [path] if path.is_file() else sorted(path.glob("*.safetensors")):
        read_safetensors(weights)  # a pickle, a cut-short file or a lying header: CardError naming the file
    pipeline = model.generator.sampling_pipeline()
    kwargs = {"weight_name": path.name} if path.is_file() else {}
    try:
        pipeline.load_lora_weights(str(path.parent if path.is_file() else path), **kwargs)
    except (ValueError, OSError, KeyError) as exc:
        raise CardError(f"{path}: not a diffusers LoRA this pipeline accepts ({str(exc).splitlines()[0]})") from None
