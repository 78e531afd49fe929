"""Loading a card back into a model, and generating from raw inputs."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from mmadapt.assemble import assemble
from mmadapt.card import load_card_weights, read_card
from mmadapt.data import Collator, format_sample
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


def generate_from_images(
    model: AssembledModel, images: list[Any], prompt: str = "", **settings: Any
) -> list[str]:
    """Caption or answer about each image; `prompt` is filled into the card's data template."""
    template = model.recipe.data.get("template", "caption")
    formatted = format_sample(template, "", prompt)[0]
    samples = [{"image": image, "prompt": formatted, "target": "", "text": "", "key": str(i), "id": i} for i, image in enumerate(images)]
    batch = Collator(model, max_tokens=model.recipe.train.max_text_tokens, skip_bad_samples=False)(samples)
    assert batch is not None
    device = next(model.parameters()).device
    batch["node_inputs"] = {n: {p: t.to(device) for p, t in ports.items()} for n, ports in batch["node_inputs"].items()}
    with torch.no_grad():
        return model.generate(batch, batch["prompts"], **settings)
