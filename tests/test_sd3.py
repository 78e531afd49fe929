"""The diffusion-transformer layout (SD3): the prompt as the stock pipeline encodes it, flow matching from its scheduler,
and LoRA/LoKr exports that StableDiffusion3Pipeline loads and draws the same picture from."""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

from mmadapt.core.card import save_card
from mmadapt.core.validate import check_recipe
from mmadapt.errors import RecipeError
from test_diffusion import as_array, build_from, randomize_trainables, stock_images, stock_pipeline, write_instances

PROMPT = "a handwritten seven"
T5_LENGTH = 32  # digits-dit's tokenizer_3 length, which the generator takes by default


@pytest.fixture(scope="module")
def sd3_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """digits-dit's architecture with random weights (a T5 encoder and its tokenizer included), saved like any SD3 folder."""
    from mmadapt.zoo.build.digits_dit import random_pipeline

    folder = tmp_path_factory.mktemp("tiny-sd3")
    random_pipeline(seed=0).save_pretrained(folder)
    return folder


def stock_sd3(folder: Path) -> Any:
    return stock_pipeline(folder, "StableDiffusion3Pipeline")


def draw(pipeline: Any, prompt: str, seed: int = 3) -> np.ndarray:
    return stock_images(pipeline, [prompt], seed, height=16, width=16, max_sequence_length=T5_LENGTH)[0]


def sd3_recipe(tmp_path: Path, folder: Path, adapters: list[dict[str, Any]], **settings: Any) -> Path:
    recipe = {"name": "tiny-sd3", "graph": {"sd": {"type": "sd3", "checkpoint": str(folder), "adapters": adapters, **settings}},
              "data": {"type": "dreambooth", "instance_dir": str(write_instances(tmp_path / "instances")),
                       "instance_prompt": "a slanted digit"},
              "train": {"steps": 2, "batch_size": 2, "lr": 1e-2, "output_dir": str(tmp_path / "run")}}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_the_prompt_is_read_as_the_pipeline_reads_it(sd3_folder: Path, tmp_path: Path) -> None:
    model = build_from(sd3_recipe(tmp_path, sd3_folder, []))
    generator = model.generator
    states, added = generator.encode_prompt(generator.tokenize([PROMPT, "a digit"]))
    theirs, _, pooled, _ = stock_sd3(sd3_folder).encode_prompt([PROMPT, "a digit"], None, None, do_classifier_free_guidance=False,
                                                               max_sequence_length=T5_LENGTH)
    assert states.shape == (2, 20 + T5_LENGTH, 64) and torch.allclose(states, theirs, atol=1e-6)
    assert torch.allclose(added["text_embeds"], pooled, atol=1e-6)


def test_flow_matching_noises_and_targets_as_the_scheduler_integrates(sd3_folder: Path, tmp_path: Path) -> None:
    """x_t = (1 - sigma) x0 + sigma noise with sigma = t / 1000, and the target is noise - x0: so x_t - sigma * target is x0."""
    generator = build_from(sd3_recipe(tmp_path, sd3_folder, [])).generator
    latents = torch.randn(16, 4, 8, 8)
    noisy, timesteps, target = generator.noised(latents)
    sigma = (timesteps / generator.scheduler.config.num_train_timesteps)[:, None, None, None]
    assert torch.allclose(noisy - sigma * target, latents, atol=1e-5)
    assert timesteps.unique().numel() > 8  # logit-normal draws, not one timestep
    assert not torch.allclose(target, -latents, atol=1e-2)


def test_training_moves_only_the_lora_and_the_loss_falls_on_one_picture(sd3_folder: Path, tmp_path: Path) -> None:
    from mmadapt.data.collate import build_dataset, collator_for

    model = build_from(sd3_recipe(tmp_path, sd3_folder, [{"type": "lora", "r": 4, "alpha": 8}]))
    trainable = model.trainable_parameters()
    assert trainable and all(".transformer." in k and "lora_" in k for k in trainable)
    assert any("add_k_proj" in k for k in trainable)  # both streams of the joint attention
    frozen = {k: v.clone() for k, v in model.generator.state_dict().items() if "lora_" not in k}
    data = build_dataset({"type": "dreambooth", "instance_dir": str(tmp_path / "instances"), "instance_prompt": "a slanted digit"})
    batch = collator_for(model, 64)([data[0]] * 8)
    optimizer = torch.optim.AdamW(trainable.values(), lr=1e-2)

    def fixed_loss() -> float:  # the same noise and timesteps each time
        torch.manual_seed(123)
        with torch.no_grad():
            return float(np.mean([model(batch)["loss"].item() for _ in range(4)]))

    before = fixed_loss()
    for _ in range(30):
        loss = model(batch)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert fixed_loss() < 0.8 * before  # a random transformer memorises one picture only partly in 30 LoRA steps
    after = {k: v for k, v in model.generator.state_dict().items() if "lora_" not in k}
    assert all(torch.equal(frozen[k], after[k]) for k in frozen)


def test_lora_on_the_transformer_and_both_clip_encoders_loads_in_the_stock_pipeline(sd3_folder: Path, tmp_path: Path) -> None:
    adapters = [{"type": "lora", "r": 4, "alpha": 8}, {"type": "lora", "r": 2, "alpha": 5, "target": "text_encoder"},
                {"type": "lora", "r": 3, "alpha": 3, "target": "text_encoder_2", "target_modules": ["fc1", "q_proj"]}]
    model = build_from(sd3_recipe(tmp_path, sd3_folder, adapters))
    randomize_trainables(model)
    card = save_card(model, tmp_path / "card")
    ours = as_array(model.generate({"size": 1, "node_inputs": {}}, [PROMPT], num_inference_steps=4, output_type="np", seed=3))[0]
    stock = stock_sd3(sd3_folder)
    plain = draw(stock, PROMPT)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # peft's only sign of keys it dropped
        stock.load_lora_weights(str(card / "diffusers"))
    theirs = draw(stock, PROMPT)
    assert np.abs(ours - theirs).max() < 1e-4
    assert np.abs(plain - theirs).max() > 5e-3  # the LoRA changes the picture, so the match is not vacuous


def test_lokr_on_the_transformer_exports_exactly(sd3_folder: Path, tmp_path: Path) -> None:
    model = build_from(sd3_recipe(tmp_path, sd3_folder, [{"type": "lokr", "r": 4, "alpha": 2}]))
    randomize_trainables(model)
    card = save_card(model, tmp_path / "card")
    ours = as_array(model.generate({"size": 1, "node_inputs": {}}, [PROMPT], num_inference_steps=4, output_type="np", seed=1))[0]
    stock = stock_sd3(sd3_folder)
    stock.transformer.load_lora_adapter(str(card / "diffusers" / "lokr"), prefix=None, use_safetensors=True)
    assert np.abs(ours - draw(stock, PROMPT, seed=1)).max() < 1e-4


def test_what_the_layout_does_not_take_is_refused_by_name(sd3_folder: Path, tmp_path: Path) -> None:
    raw = yaml.safe_load(sd3_recipe(tmp_path, sd3_folder, [], placeholder="<sks>").read_text())
    with pytest.raises(RecipeError, match=r"graph\.sd\.placeholder"):
        check_recipe(raw, "x.yaml")
    raw = yaml.safe_load(sd3_recipe(tmp_path, sd3_folder, []).read_text())
    raw["graph"]["tok"] = {"type": "soft_prompt", "num_tokens": 1}
    raw["graph"]["sd"]["inputs"] = {"token_embeds": "tok"}
    with pytest.raises(RecipeError, match=r"graph\.sd\.inputs.*token_embeds"):
        check_recipe(raw, "x.yaml")
    raw = yaml.safe_load(sd3_recipe(tmp_path, sd3_folder, []).read_text())
    raw["graph"]["sd"]["type"] = "diffusion"
    with pytest.raises(RecipeError, match=r"graph\.sd\.checkpoint: is a StableDiffusion3Pipeline folder.*use type: sd3"):
        check_recipe(raw, "x.yaml")
