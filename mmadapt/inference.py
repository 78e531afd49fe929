"""Loading a card back into a model, and generating from raw inputs."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from mmadapt.assemble import assemble
from mmadapt.card import load_card_weights, read_card
from mmadapt.data import Collator, batch_to_device, format_sample
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


def generate_for_samples(model: AssembledModel, samples: list[dict[str, Any]], prompt: str, **settings: Any) -> list[str]:
    """Generate after each sample's encoded inputs, with the same (already formatted) prompt for all."""
    samples = [dict(s, prompt=prompt, target="") for s in samples]
    batch = Collator(model, max_tokens=model.recipe.train.max_text_tokens, skip_bad_samples=False)(samples)
    assert batch is not None  # skip_bad_samples=False raises on a bad sample instead of dropping it
    batch = batch_to_device(batch, next(model.parameters()).device)
    with torch.no_grad():
        return model.generate(batch, [prompt] * len(samples), **settings)


def generate_from_images(model: AssembledModel, images: list[Any], prompt: str = "", **settings: Any) -> list[str]:
    """Caption or answer about each image; `prompt` is filled into the card's data template."""
    template = model.recipe.data.get("template", "caption")
    formatted = format_sample(template, "", prompt)[0]
    samples = [{"image": image, "text": "", "key": str(i), "id": i} for i, image in enumerate(images)]
    return generate_for_samples(model, samples, formatted, **settings)
