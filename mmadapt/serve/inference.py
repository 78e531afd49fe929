"""Loading a card back into a model, and generating from raw inputs."""
from __future__ import annotations

import os
import re
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from mmadapt.core.assemble import assemble
from mmadapt.core.card import load_card_weights, read_card, refuse_card_code
from mmadapt.core.checkpoint_io import remove_stale_temp_dirs
from mmadapt.core.registry import sub_sections
from mmadapt.data.collate import batch_to_device, build_dataset, collator_for
from mmadapt.data.captions import prompt_for  # noqa: F401 - demos and tests import it from here
from mmadapt.errors import MMAdaptError
from mmadapt.core.model import AssembledModel
from mmadapt.core.validate import check_recipe


def load_card(directory: str | Path, trust_code: bool = False) -> AssembledModel:
    """Rebuild the card's graph from its resolved recipe and load its trainable tensors.

    A recipe whose `type:` names a module outside mmadapt's tables is refused before any import unless `trust_code`
    (the CLI's --trust-card-code). Temporary folders that a killed save of this card left beside it are removed first.
    """
    directory = Path(directory)
    beside = Path(os.path.abspath(directory))  # the folder atomic_dir saved it into, symlinks not followed
    remove_stale_temp_dirs(beside.parent, re.escape(beside.name))
    raw, meta = read_card(directory)
    refuse_card_code(raw, directory, trust_code)
    held = {key.split(".")[0] for key in meta.get("trainable_tensors") or {}}
    for name, node in (raw.get("graph") or {}).items():
        if isinstance(node, dict) and name in held:
            node.pop("from_card", None)  # the card holds this node's trained tensors; where training started is history
    recipe, plan = check_recipe(raw, source=f"{directory}/recipe.yaml", for_training=False)  # its training data may be elsewhere
    model = assemble(recipe, plan)
    load_card_weights(model, directory)
    model.eval()
    return model


def encoder_fields(model: AssembledModel) -> set[str]:
    """The data fields the graph's encoders read (image, audio, points)."""
    return {r.key for name in model.encoders() for refs in model.plan.inputs[name].values() for r in refs if r.is_data}


def generate_for_samples(model: AssembledModel, samples: list[dict[str, Any]], prompt: str, **settings: Any) -> list[str]:
    """Generate after each sample's encoded inputs, with the same (already formatted) prompt for all."""
    return generate_after(model, [dict(s, prompt=prompt, target="") for s in samples], [prompt] * len(samples), **settings)


def generate_after(model: AssembledModel, samples: list[dict[str, Any]], prompts: list[str] | list[list[dict[str, str]]],
                   **settings: Any) -> list[str]:
    """Generate after each sample's encoded inputs, continuing its prompt (a text, or a conversation).

    In a graph with several encoders a sample may carry only some modalities; the others are skipped for it. A sample
    that carries none of them is an error, not an answer from the prompt alone.
    """
    wanted = encoder_fields(model)
    for sample in samples:
        if wanted and not wanted & set(sample):
            raise MMAdaptError(f"sample {sample.get('id', '?')} carries none of the fields the card's encoders read ({', '.join(sorted(wanted))})")
    samples = [dict(s, fields_absent=sorted(wanted - set(s))) for s in samples]
    batch = collator_for(model, max_tokens=model.recipe.train.max_text_tokens, skip_bad_samples=False)(samples)
    batch = batch_to_device(batch, next(model.parameters()).device)
    with torch.no_grad():
        return model.generate(batch, prompts, **settings)


def section_for(model: AssembledModel, fields: set[str]) -> dict[str, Any]:
    """The data section that trained the given input fields: the card's own, or the part of its mixture whose samples
    carry exactly those fields (else the part that carries them all, for one field of a part with several)."""
    data = model.recipe.data
    parts = sub_sections(data)
    if parts is None:
        return data
    carried = getattr(model, "_part_fields", None)
    if carried is None:  # which fields each part's samples carry, read once per model
        carried = model._part_fields = [set(build_dataset(part)[0]) & encoder_fields(model) for part in parts]
    for part, own in zip(parts, carried):
        if own == fields:
            return part
    for part, own in zip(parts, carried):
        if fields <= own:
            return part
    return {"template": "instruction", "prompt": ""}  # a combination no part trained: asked as eval asks questions


def generate_from_files(model: AssembledModel, field: str, files: list[Any], prompt: str = "", **settings: Any) -> list[str]:
    """Caption or answer about each input (an image, a recording, a point cloud) read by the encoder of `field`.

    `prompt` (a question; empty: the card's caption prompt) goes into the template of the data that trained `field`.
    """
    if field not in encoder_fields(model):
        raise MMAdaptError(f"the card's encoders read {', '.join(sorted(encoder_fields(model))) or 'nothing'}, not {field}")
    formatted = prompt_for(section_for(model, {field}), prompt)
    samples = [{field: item, "text": "", "key": str(i), "id": i} for i, item in enumerate(files)]
    return generate_for_samples(model, samples, formatted, **settings)


def generate_from_images(model: AssembledModel, images: list[Any], prompt: str = "", **settings: Any) -> list[str]:
    """Caption or answer about each image; `prompt` is filled into the card's data template."""
    return generate_from_files(model, "image", images, prompt, **settings)


def generate_reply(model: AssembledModel, conversation: list[dict[str, str]], inputs: dict[str, list[Any]],
                   **settings: Any) -> str:
    """The next assistant turn of a LLaVA-format conversation (it ends with the user's turn), through the card's chat
    template. `inputs` holds each field's inputs in the order of their markers in the conversation, e.g. {'image': [a, b]};
    settings go to generation (max_new_tokens, do_sample, temperature, streamer)."""
    if not model.generator.chats():
        raise MMAdaptError("this card's language model has no chat template: ask each question on its own")
    if not conversation or conversation[-1].get("from") != "human":
        raise MMAdaptError("a conversation to answer ends with the user's turn")
    sample: dict[str, Any] = {"conversations": conversation, "prompt": "", "target": "", "text": "", "key": "chat", "id": 0}
    sample.update({field: items if len(items) > 1 else items[0] for field, items in inputs.items() if items})
    return generate_after(model, [sample], [conversation], **settings)[0]


def stream_reply(model: AssembledModel, conversation: list[dict[str, str]], inputs: dict[str, list[Any]],
                 **settings: Any) -> Iterator[str]:
    """generate_reply, yielding the reply so far as its tokens arrive; the last value yielded is the whole reply.

    Generation runs in a thread feeding transformers' TextIteratorStreamer; its failure is raised here, after the stream."""
    from transformers import TextIteratorStreamer

    streamer = TextIteratorStreamer(model.generator.tokenizer, skip_prompt=True, skip_special_tokens=True)
    result: list[str] = []
    failure: list[BaseException] = []

    def run() -> None:
        try:
            result.append(generate_reply(model, conversation, inputs, streamer=streamer, **settings))
        except BaseException as exc:  # noqa: BLE001 - raised again in the caller's thread
            failure.append(exc)
        finally:
            streamer.end()  # a failure before generation would leave the stream waiting

    thread = threading.Thread(target=run, name="mmadapt-stream-reply", daemon=True)
    thread.start()
    text = ""
    for piece in streamer:
        text += piece
        if text.strip():
            yield text.strip()
    thread.join()
    if failure:
        raise failure[0]
    yield result[0]
