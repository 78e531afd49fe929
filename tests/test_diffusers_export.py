"""Diffusers exports are exact for every adapter target set: stock load_lora_weights draws mmadapt's own picture."""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from mmadapt.core.card import save_card
from mmadapt.core.validate import load_recipe
from mmadapt.errors import RecipeError
from test_diffusion import as_array, build_from, randomize_trainables, recipe_for, sd_folder, stock_images, stock_pipeline  # noqa: F401

# One row per kind of module a LoRA may sit on; alpha != r in most, the trap where alpha gets lost.
MATRIX: dict[str, list[dict[str, Any]]] = {
    "attention": [{"type": "lora", "r": 4, "alpha": 8}],
    "proj_in_out": [{"type": "lora", "r": 3, "alpha": 7, "target_modules": ["proj_in", "proj_out"]}],
    "feed_forward": [{"type": "lora", "r": 4, "alpha": 4, "target_modules": ["ff.net.0.proj", "ff.net.2"]}],
    "conv": [{"type": "lora", "r": 4, "alpha": 2, "target_modules": ["conv1", "conv2", "conv_in", "conv_out"]}],
    "mixed": [{"type": "lora", "r": 3, "alpha": 7, "target_modules": ["to_q", "proj_in", "linear_1"]}],
    "text_attention": [{"type": "lora", "r": 4, "alpha": 8, "target": "text_encoder"}],
    "text_mlp": [{"type": "lora", "r": 4, "alpha": 8, "target": "text_encoder", "target_modules": ["fc1", "fc2"]}],
    "unet_and_text": [{"type": "lora", "r": 4, "alpha": 8},
                      {"type": "lora", "r": 2, "alpha": 5, "target": "text_encoder", "target_modules": ["fc1", "q_proj"]}],
}


def with_adapters(tmp_path: Path, folder: Path, adapters: list[dict[str, Any]]) -> Path:
    path = recipe_for(tmp_path, folder, token=False)
    raw = yaml.safe_load(path.read_text())
    raw["graph"]["sd"]["adapters"] = adapters
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.parametrize("case", list(MATRIX))
def test_stock_load_lora_weights_draws_the_same_picture(sd_folder: Path, tmp_path: Path, case: str) -> None:
    model = build_from(with_adapters(tmp_path, sd_folder, MATRIX[case]))
    randomize_trainables(model)
    card = save_card(model, tmp_path / "card")
    ours = as_array(model.generator.generate(["a handwritten seven"], num_inference_steps=4, output_type="np", seed=3))
    stock = stock_pipeline(sd_folder)
    plain = stock_images(stock, ["a handwritten seven"], seed=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # peft's only sign of keys it dropped
        stock.load_lora_weights(str(card / "diffusers"))
    exported = stock_images(stock, ["a handwritten seven"], seed=3)
    assert np.abs(ours - exported).max() < 1e-4
    assert np.abs(plain - exported).max() > 5e-3  # the LoRA changes the picture, so the match is not vacuous


def test_lokr_off_the_attention_exports_exactly(sd_folder: Path, tmp_path: Path) -> None:
    adapters = [{"type": "lokr", "r": 4, "alpha": 2, "target_modules": ["conv1", "conv2", "proj_in"]}]
    model = build_from(with_adapters(tmp_path, sd_folder, adapters))
    randomize_trainables(model)
    card = save_card(model, tmp_path / "card")
    ours = as_array(model.generator.generate(["a handwritten two"], num_inference_steps=4, output_type="np", seed=1))
    stock = stock_pipeline(sd_folder)
    stock.unet.load_lora_adapter(str(card / "diffusers" / "lokr"), prefix=None, use_safetensors=True)
    assert np.abs(ours - stock_images(stock, ["a handwritten two"], seed=1)).max() < 1e-4


def test_what_diffusers_cannot_load_is_refused_before_training(sd_folder: Path, tmp_path: Path) -> None:
    path = with_adapters(tmp_path, sd_folder, [{"type": "lokr", "r": 4, "alpha": 8, "target": "text_encoder"}])
    with pytest.raises(RecipeError, match=r"graph\.sd\.adapters\[0\]\.type: LoKr on the text_encoder could not be exported"):
        load_recipe(path, [], for_training=True)


def test_mmadapt_export_writes_the_tested_diffusers_files(sd_folder: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from mmadapt.cli import main

    path = recipe_for(tmp_path, sd_folder, token=True)
    raw = yaml.safe_load(path.read_text())
    raw["graph"]["sd"]["adapters"] = MATRIX["mixed"]
    path.write_text(yaml.safe_dump(raw))
    model = build_from(path)
    randomize_trainables(model)
    card = save_card(model, tmp_path / "card")
    assert main(["export", str(card), str(tmp_path / "out")]) == 0
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == ["learned_embeds.safetensors", "pytorch_lora_weights.safetensors"]
    for name in names:  # the same tensors the matrix above loads into the stock pipeline
        ours, exported = load_file(card / "diffusers" / name), load_file(tmp_path / "out" / name)
        assert ours.keys() == exported.keys() and all((ours[k] == exported[k]).all() for k in ours)
