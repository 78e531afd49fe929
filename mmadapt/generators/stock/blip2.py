"""BLIP-2 export: a blip2_vision tower -> Q-Former -> causal LM card as Blip2ForConditionalGeneration + Blip2Processor."""
from __future__ import annotations

import copy
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from mmadapt.errors import ExportError
from mmadapt.generators.stock.common import (generation_config, load_part, make_room, merged, processor_text, single_chain,
                                            write_notes)

if TYPE_CHECKING:
    from mmadapt.core.model import AssembledModel



def problem(model: AssembledModel) -> str | None:
    """Why the card is not a BLIP-2 (None when it is one)."""
    from bridges.qformer import QFormer
    from mmadapt.encoders.blip2_vision import Blip2Vision
    from mmadapt.generators.causal_lm import CausalLM, input_width

    try:
        chain = single_chain(model)
    except ExportError as exc:
        return str(exc)
    generator, name = model.generator, model.generator_name
    if not isinstance(chain.encoder, Blip2Vision):
        return (f"'{chain.encoder_name}' is {type(chain.encoder).__name__}; BLIP-2's tower is its own vision model, whose "
                "last_hidden_state the Q-Former reads (type: blip2_vision)")
    if not isinstance(chain.bridge, QFormer):
        return f"'{chain.bridge_name}' is {type(chain.bridge).__name__}; BLIP-2's bridge is a Q-Former (type: qformer)"
    if chain.bridge.context_positions is not None:
        return (f"'{chain.bridge_name}' adds context_positions ({chain.bridge.context_positions}) to the tower's tokens; "
                "BLIP-2's Q-Former has no such embeddings (train without context_positions)")
    if not isinstance(generator, CausalLM):
        return f"'{name}' is {type(generator).__name__}; BLIP-2's language model is a causal LM here (type: causal_lm)"
    if chain.port != "prefix_embeds" or generator.prefix_as != "embeddings":
        return (f"'{name}' takes the Q-Former as {chain.port} ({generator.prefix_as}); BLIP-2 feeds its projected queries "
                "to the LM as input embeddings (prefix_as: embeddings)")
    if generator.markers:
        return f"'{name}' places tokens at prompt markers ({generator.markers}); BLIP-2 puts its queries first (no markers)"
    if generator.prefix_after_bos and generator.bos_id is not None:
        return (f"'{name}' puts the image after bos; BLIP-2's prompt is [image queries][bos][text] "
                "(train with prefix_after_bos: false)")
    text = generator.model.config
    if input_width(text) != int(text.hidden_size):
        return (f"'{name}' has input embeddings of width {input_width(text)} beside a hidden size of {text.hidden_size}; "
                "BLIP-2's language_projection maps to the hidden size")
    if chain.bridge.out_dim != int(text.hidden_size):
        return f"'{chain.bridge_name}' gives width {chain.bridge.out_dim}; BLIP-2 projects to the LM's hidden size {text.hidden_size}"
    return None


def write(model: AssembledModel, folder: Path) -> list[str]:
    """Blip2ForConditionalGeneration (LoRA merged) and Blip2Processor, in the LM's dtype; returns the files written."""
    from transformers import Blip2Config, Blip2ForConditionalGeneration, Blip2Processor

    chain = single_chain(model)
    generator, bridge = model.generator, chain.bridge
    tower, lm = merged(chain.encoder.model), merged(generator.model)
    tokenizer = copy.deepcopy(generator.tokenizer)
    processor = Blip2Processor(image_processor=copy.deepcopy(chain.encoder.processor), tokenizer=tokenizer,
                               num_query_tokens=int(bridge.query_tokens.shape[1]))  # adds <image> when the tokenizer lacks it
    image_token = str(getattr(processor.image_token, "content", processor.image_token))  # an AddedToken when it added it
    image_id = tokenizer.convert_tokens_to_ids(image_token)
    make_room(lm, image_id)
    text_config = copy.deepcopy(lm.config)
    text_config.bos_token_id, text_config.eos_token_id, text_config.pad_token_id = generator.bos_id, generator.eos_id, generator.pad_id
    dtype = next(lm.parameters()).dtype
    config = Blip2Config(vision_config=tower.config.to_dict(), qformer_config=bridge.qformer.config.to_dict(),
                         text_config=text_config.to_dict(), num_query_tokens=int(bridge.query_tokens.shape[1]),
                         image_token_index=image_id)
    config.dtype = dtype
    blip2 = Blip2ForConditionalGeneration(config).eval()
    load_part(blip2.vision_model, tower.state_dict(), "vision model")
    load_part(blip2.qformer, bridge.qformer.state_dict(), "Q-Former")
    load_part(blip2.language_projection, bridge.language_projection.state_dict(), "language projection")
    load_part(blip2.language_model, lm.state_dict(), "language model")
    with torch.no_grad():
        blip2.query_tokens.copy_(bridge.query_tokens)
    blip2 = blip2.to(dtype)  # query_tokens and the Q-Former stay float32 on load (_keep_in_fp32_modules), as they are here
    blip2.generation_config = generation_config(lm, generator)
    blip2.save_pretrained(folder)
    processor.save_pretrained(folder)
    notes = {"prompt": processor_text(model, tokenizer), "image_token": image_token,
             "image_tokens": int(bridge.query_tokens.shape[1])}
    write_notes(folder, notes)
    return sorted(p.name for p in folder.iterdir())
