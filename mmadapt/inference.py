"""Loading a card back into a model, and generating from raw inputs."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from mmadapt.assemble import assemble
from mmadapt.card import load_card_weights, read_card
from mmadapt.data import Collator, batch_to_device, format_sample
from mmadapt.errors import MMAdaptError
from mmadapt.model import AssembledModel
from mmadapt.validate import check_recipe


def load_card(directory: str | Path) -> AssembledModel:
    """Rebuild the card's graph from its resolved recipe and load its trainable tensors."""
    raw, _ = read_card(directory)
    recipe, plan = check_recipe(raw, source=f"{directory}/recipe.yaml")
    model = assemble(recipe, plan)
    load_card_weights(model, directory)
    model.eval()
    return model


def encoder_fields(model: AssembledModel) -> set[str]:
    """The data fields the graph's encoders read (image, audio, points)."""
    return {r.key for name in model.encoders() for refs in model.plan.inputs[name].values() for r in refs if r.is_data}


def generate_for_samples(model: AssembledModel, samples: list[dict[str, Any]], prompt: str, **settings: Any) -> list[str]:
    """Generate after each sample's encoded inputs, with the same (already formatted) prompt for all.

    In a graph with several encoders a sample may carry only some modalities; the others are skipped for it. A sample
    that carries none of them is an error, not an answer from the prompt alone.
    """
    wanted = encoder_fields(model)
    for sample in samples:
        if wanted and not wanted & set(sample):
            raise MMAdaptError(f"sample {sample.get('id', '?')} carries none of the fields the card's encoders read ({', '.join(sorted(wanted))})")
    samples = [dict(s, prompt=prompt, target="", fields_absent=sorted(wanted - set(s))) for s in samples]
    batch = Collator(model, max_tokens=model.recipe.train.max_text_tokens, skip_bad_samples=False)(samples)
    assert batch is not None  # skip_bad_samples=False raises on a bad sample instead of dropping it
    batch = batch_to_device(batch, next(model.parameters()).device)
    with torch.no_grad():
        return model.generate(batch, [prompt] * len(samples), **settings)


def generate_from_files(model: AssembledModel, field: str, files: list[Any], prompt: str = "", **settings: Any) -> list[str]:
    """Caption or answer about each input (an image, a recording, a point cloud) read by the encoder of `field`.

    `prompt` is filled into the card's data template (for a mixture, into the template of the part that trained `field`).
    """
    if field not in encoder_fields(model):
        raise MMAdaptError(f"the card's encoders read {', '.join(sorted(encoder_fields(model))) or 'nothing'}, not {field}")
    data = model.recipe.data
    if data.get("type") == "mixture":  # the part that trained this modality, so its marker places the tokens
        from mmadapt.mixture import MixtureDataset

        data = next(p for p, carried in zip(data["parts"], MixtureDataset(data["parts"]).fields) if field in carried)
    template = data.get("template", "caption")
    if template == "raw":  # a raw prompt is the training prompt as written: a question goes in eval's instruction form
        formatted = format_sample("instruction", "", prompt)[0] if prompt else data.get("prompt", "")
    else:
        formatted = format_sample(template, "", prompt)[0]
    samples = [{field: item, "text": "", "key": str(i), "id": i} for i, item in enumerate(files)]
    return generate_for_samples(model, samples, formatted, **settings)


def generate_from_images(model: AssembledModel, images: list[Any], prompt: str = "", **settings: Any) -> list[str]:
    """Caption or answer about each image; `prompt` is filled into the card's data template."""
    return generate_from_files(model, "image", images, prompt, **settings)
