"""What every stock export needs: the graph's one path into the generator (and `merged`, from core.nodes)."""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from mmadapt.core.nodes import Bridge, Encoder, merged
from mmadapt.errors import ExportError

if TYPE_CHECKING:
    from mmadapt.core.model import AssembledModel

__all__ = ["Chain", "merged", "single_chain", "processor_text", "write_notes", "make_room", "load_part", "generation_config"]  # merged: the exporters import it from here


@dataclass(frozen=True)
class Chain:
    """encoder -> bridge -> generator: the only graph shape a stock vision-language class holds."""

    encoder_name: str
    encoder: Encoder
    bridge_name: str
    bridge: Bridge
    port: str  # the generator's port the bridge feeds, e.g. "prefix_embeds"


def single_chain(model: AssembledModel) -> Chain:
    """The graph's encoder -> bridge -> generator path, or ExportError saying why the graph is not one such path."""
    inputs = model.plan.inputs
    fed = {port: [r.source for r in refs if not r.is_data] for port, refs in inputs[model.generator_name].items()}
    fed = {port: sources for port, sources in fed.items() if sources}
    bridges = [(port, s) for port, sources in fed.items() for s in sources]
    if len(bridges) != 1:
        raise ExportError(f"'{model.generator_name}' takes {len(bridges)} bridge inputs ({', '.join(s for _, s in bridges) or 'none'}); "
                          "a stock vision-language class holds exactly one encoder -> bridge path")
    port, bridge_name = bridges[0]
    bridge = model.nodes[bridge_name]
    sources = [r.source for refs in inputs[bridge_name].values() for r in refs if not r.is_data]
    if not isinstance(bridge, Bridge) or len(sources) != 1 or not isinstance(model.nodes[sources[0]], Encoder):
        raise ExportError(f"'{bridge_name}' is not a bridge fed by one encoder; a stock vision-language class holds exactly one "
                          "encoder -> bridge path")
    encoder = model.nodes[sources[0]]
    extra = [n for n in model.nodes if n not in (sources[0], bridge_name, model.generator_name)]
    if extra:
        raise ExportError(f"the graph has nodes beyond encoder -> bridge -> generator ({', '.join(extra)}); no stock class holds them")
    return Chain(sources[0], encoder, bridge_name, bridge, port)


EXPORT_NOTES = "mmadapt_export.json"  # beside the stock files: the card's trained prompt, as the processor's text


def trained_prompt(model: AssembledModel) -> str:
    """The prompt the card was trained with, as `mmadapt generate` asks with no question."""
    from mmadapt.core.registry import sub_sections
    from mmadapt.data.captions import prompt_for

    return prompt_for((sub_sections(model.recipe.data) or [model.recipe.data])[0])


def processor_text(model: AssembledModel, tokenizer: Any, image_token: str = "") -> str:
    """[bos] [image_token] prompt, spelled so the stock tokenizer gives mmadapt's ids: bos written out when the tokenizer
    does not add it itself."""
    bos = model.generator.bos_id
    adds_bos = bos is not None and tokenizer("a")["input_ids"][:1] == [bos]
    lead = tokenizer.bos_token if bos is not None and not adds_bos else ""
    return f"{lead}{image_token}{trained_prompt(model)}"


def write_notes(folder: Path, notes: dict[str, Any]) -> None:
    (folder / EXPORT_NOTES).write_text(json.dumps({**notes, "from": "mmadapt export"}, indent=2) + "\n")


def make_room(lm: nn.Module, image_id: int) -> None:
    """An embedding row for the image token (zeros, in the LM head too): the stock class looks the placeholder up
    before putting the image's embeddings in its place."""
    vocab = lm.get_input_embeddings().num_embeddings
    if image_id < vocab:
        return
    lm.resize_token_embeddings(image_id + 1, mean_resizing=False)
    with torch.no_grad():
        lm.get_input_embeddings().weight[vocab:] = 0
        if lm.get_output_embeddings() is not lm.get_input_embeddings():
            lm.get_output_embeddings().weight[vocab:] = 0


def load_part(module: nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """Every tensor of the part, or ExportError: an export never leaves a stock weight at its random init."""
    result = module.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("position_ids")]
    if missing or result.unexpected_keys:
        raise ExportError(f"the {what} does not fit the stock class's (missing {missing[:3]}, unexpected {result.unexpected_keys[:3]})")


def generation_config(lm: Any, generator: Any) -> Any:
    """The LM's generation settings, with the ids mmadapt generates with (eos stops, pad fills)."""
    config = copy.deepcopy(lm.generation_config)
    config.bos_token_id, config.eos_token_id, config.pad_token_id = generator.bos_id, generator.eos_id, generator.pad_id
    return config
