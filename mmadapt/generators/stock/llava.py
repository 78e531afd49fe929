"""LLaVA export: a CLIP/SigLIP tower -> linear or GELU-MLP projector -> causal LM card as LlavaForConditionalGeneration."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from mmadapt.errors import ExportError
from mmadapt.generators.stock.common import (Chain, generation_config, load_part, make_room, merged, processor_text,
                                            single_chain, write_notes)

if TYPE_CHECKING:
    from mmadapt.core.model import AssembledModel

logger = logging.getLogger(__name__)
IMAGE_TOKEN = "<image>"  # LlavaProcessor's placeholder, expanded to one token per image feature
TOWERS = ("CLIPVisionModel", "SiglipVisionModel")  # the vision models LLaVA's config builds


def problem(model: AssembledModel) -> str | None:
    """Why the card is not a LLaVA (None when it is one)."""
    try:
        chain = single_chain(model)
    except ExportError as exc:
        return str(exc)
    generator = model.generator
    if chain.port != "prefix_embeds" or generator.prefix_as != "embeddings" or generator.markers:
        return (f"'{model.generator_name}' takes the bridge as {chain.port} ({generator.prefix_as}, markers {generator.markers}); "
                "LLaVA puts embeddings at one <image> place")
    if not generator.prefix_after_bos and generator.bos_id is not None:
        return (f"'{model.generator_name}' puts the image before bos; LLaVA's prompt is [bos][image][text] "
                "(train with prefix_after_bos: true)")
    reason = projector_problem(chain, int(generator.embed_dim))
    if reason is not None:
        return reason
    hook = getattr(chain.encoder, "transformers_tower", None)
    tower = hook() if hook is not None else None  # last: it copies (and may convert) the whole tower
    if tower is None or type(tower.model).__name__ not in TOWERS:
        return (f"'{chain.encoder_name}' ({type(chain.encoder).__name__}) has no CLIP or SigLIP vision model giving its "
                "tokens; LLaVA's tower is one (hf_vision, or an open_clip ViT, with feature: patch)")
    return None


def projector_problem(chain: Chain, text_width: int) -> str | None:
    """LLaVA's projector is linear_1 -> activation -> linear_2 (text width to text width)."""
    layers = projector_layers(chain.bridge)
    if layers is None:
        return (f"'{chain.bridge_name}' is {type(chain.bridge).__name__}; LLaVA's projector is a linear map or a "
                "2-layer GELU MLP (type: linear_projector, or mlp_projector with num_layers: 2)")
    if layers[-1].out_features != text_width or (len(layers) == 2 and layers[0].out_features != text_width):
        return f"'{chain.bridge_name}' has a hidden width other than the LM's {text_width}; LLaVA's MLP keeps the LM's width"
    return None


def projector_layers(bridge: nn.Module) -> list[nn.Linear] | None:
    """The projector's linear layers when it is one Linear, or Linear -> exact GELU -> Linear; else None. Only the
    per-token projectors qualify: another bridge with an `mlp` (the token bridge reads the whole grid) is not LLaVA's."""
    from bridges.projector import LinearProjector, MLPProjector

    if isinstance(bridge, LinearProjector):
        return [bridge.proj]
    if not isinstance(bridge, MLPProjector):
        return None
    parts = list(bridge.mlp)
    if (len(parts) == 3 and isinstance(parts[0], nn.Linear) and isinstance(parts[2], nn.Linear)
            and isinstance(parts[1], nn.GELU) and parts[1].approximate == "none"):
        return [parts[0], parts[2]]
    return None


def write(model: AssembledModel, folder: Path) -> list[str]:
    """LlavaForConditionalGeneration (LoRA merged) and LlavaProcessor, in the LM's dtype; returns the files written."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    chain = single_chain(model)
    generator = model.generator
    tower = chain.encoder.transformers_tower()
    lm = merged(generator.model)
    has_cls = tower.has_cls
    strategy = "default" if has_cls and not tower.keep_cls else "full"  # "default" drops the class token
    tokenizer = _tokenizer_with_image_token(generator.tokenizer)
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    make_room(lm, image_id)
    vision = tower.model.config
    patches = (int(vision.image_size) // int(vision.patch_size)) ** 2
    dtype = next(lm.parameters()).dtype
    layers = projector_layers(chain.bridge)
    config = LlavaConfig(vision_config=vision.to_dict(), text_config=lm.config.to_dict(), image_token_index=image_id,
                         image_seq_length=patches + (1 if strategy == "full" and has_cls else 0),
                         projector_hidden_act="gelu" if len(layers) == 2 else "linear",
                         vision_feature_layer=tower.layer, vision_feature_select_strategy=strategy,
                         multimodal_projector_bias=layers[0].bias is not None,
                         tie_word_embeddings=bool(getattr(lm.config, "tie_word_embeddings", False)))
    config.dtype = dtype
    llava = LlavaForConditionalGeneration(config).to(dtype).eval()
    load_part(llava.model.vision_tower, tower.model.state_dict(), "vision tower")
    load_part(llava.model.multi_modal_projector, projector_state(layers, llava.model.multi_modal_projector), "projector")
    load_part(llava.model.language_model, lm.get_decoder().state_dict(), "language model")
    load_part(llava.lm_head, lm.get_output_embeddings().state_dict(), "LM head")
    llava.generation_config = generation_config(lm, generator)
    llava.save_pretrained(folder)
    processor = LlavaProcessor(image_processor=tower.processor, tokenizer=tokenizer, patch_size=int(vision.patch_size),
                               vision_feature_select_strategy=strategy, image_token=IMAGE_TOKEN,
                               num_additional_image_tokens=1 if has_cls else 0,
                               chat_template=getattr(tokenizer, "chat_template", None))
    processor.save_pretrained(folder)
    notes: dict[str, Any] = {"prompt": processor_text(model, tokenizer, IMAGE_TOKEN), "image_token": IMAGE_TOKEN,
                             "image_tokens": patches}
    if tower.pixel_gap:  # a processor that only approximates the encoder's own preprocessing is said, with by how much
        notes["pixel_gap"] = tower.pixel_gap
        logger.warning("%s: the exported image processor's pixels differ from mmadapt's by up to %s (max |pixel|, "
                       "per test picture); the model itself is exact", chain.encoder_name, tower.pixel_gap)
    write_notes(folder, notes)
    return sorted(p.name for p in folder.iterdir())


def projector_state(layers: list[nn.Linear], target: nn.Module) -> dict[str, torch.Tensor]:
    """The graph's projector as linear_1 / linear_2; a single Linear becomes linear_1, with an identity linear_2."""
    state = {f"linear_1.{k}": v for k, v in layers[0].state_dict().items()}
    if len(layers) == 2:
        return state | {f"linear_2.{k}": v for k, v in layers[1].state_dict().items()}
    width = target.linear_2.weight.shape[0]
    state["linear_2.weight"] = torch.eye(width, dtype=layers[0].weight.dtype)
    if target.linear_2.bias is not None:
        state["linear_2.bias"] = torch.zeros(width, dtype=layers[0].weight.dtype)
    return state


def _tokenizer_with_image_token(tokenizer: Any) -> Any:
    """A copy of the LM's tokenizer with <image> as a special token, as LLaVA's hf checkpoints carry it."""
    import copy

    tokenizer = copy.deepcopy(tokenizer)
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    return tokenizer
