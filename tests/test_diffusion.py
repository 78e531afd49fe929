"""The diffusion half: placeholder tokens, context tokens, LoRA/LoKr through peft, and exports the stock pipeline loads."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from mmadapt.core.assemble import assemble
from mmadapt.core.card import save_card
from mmadapt.errors import DataError, MMAdaptError
from mmadapt.serve.inference import load_card
from mmadapt.core.validate import load_recipe


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-weight pipeline in digits-sd's architecture, saved with save_pretrained like any SD folder."""
    from mmadapt.zoo.build.digits_sd import random_pipeline

    folder = tmp_path_factory.mktemp("tiny-sd")
    random_pipeline(seed=0).save_pretrained(folder)
    return folder


def stock_pipeline(folder: Path, pipeline_class: str = "StableDiffusionPipeline", **kwargs: Any) -> Any:
    """The layout's stock pipeline from the folder, as a user of diffusers loads it."""
    import diffusers

    pipeline = getattr(diffusers, pipeline_class).from_pretrained(folder, **kwargs)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def stock_images(pipeline: Any, prompts: list[str], seed: int = 0, **call: Any) -> np.ndarray:
    """4 guided steps of the stock pipeline; `call` adds a layout's own arguments."""
    generator = torch.Generator().manual_seed(seed)
    return pipeline(prompts, num_inference_steps=4, guidance_scale=4.0, generator=generator, output_type="np", **call).images


def as_array(images: list[Any]) -> np.ndarray:
    return np.stack(list(images)).astype(np.float32)


def recipe_for(tmp_path: Path, folder: Path, token: bool = True, adapter: str | None = "lora", data_dir: Path | None = None,
               context: bool = False) -> Path:
    graph: dict[str, Any] = {"sd": {"type": "diffusion", "checkpoint": str(folder), "placeholder": "<sks>", "placeholder_init": "digit"}}
    inputs = {}
    if token:
        graph["token"] = {"type": "soft_prompt", "num_tokens": 1}
        inputs["token_embeds"] = "token"
    if context:
        graph["ctx"] = {"type": "soft_prompt", "num_tokens": 2}
        inputs["context"] = "ctx"
    graph["sd"]["inputs"] = inputs
    if adapter:
        graph["sd"]["adapters"] = [{"type": adapter, "r": 4, "alpha": 8}]  # alpha != r: the trap where alpha gets lost
    data_dir = data_dir or write_instances(tmp_path / "instances")
    recipe = {"name": "tiny-db", "graph": graph,
              "data": {"type": "dreambooth", "instance_dir": str(data_dir), "instance_prompt": "a <sks> digit"},
              "train": {"steps": 3, "batch_size": 2, "lr": 1e-2, "output_dir": str(tmp_path / "run"), "log_every": 1}}
    import yaml

    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def write_instances(folder: Path, count: int = 3) -> Path:
    from mmadapt.data.dreambooth import write_style_examples

    paths = write_style_examples(folder)
    for extra in paths[count:]:
        extra.unlink()
    return folder


def build_from(path: Path, *overrides: str) -> Any:
    """The graph of a recipe, built as for generation: a graph with nothing to train (a stock LoRA loaded) is fine here."""
    recipe, plan = load_recipe(path, list(overrides), for_training=False)
    return assemble(recipe, plan)


def randomize_trainables(model: Any, seed: int = 1, scale: float = 0.05) -> None:
    """Give adapters and tokens non-trivial values (LoRA starts as the identity), as after training."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.trainable_parameters().values():
            param.add_(torch.randn(param.shape, generator=generator) * scale)


def test_a_placeholder_filled_with_a_words_embedding_equals_writing_the_word(sd_folder: Path, tmp_path: Path) -> None:
    model = build_from(recipe_for(tmp_path, sd_folder, adapter=None))
    decoder = model.generator
    seven = decoder.tokenizer("seven", add_special_tokens=False).input_ids
    assert len(seven) == 1
    row = decoder.text_encoder.get_input_embeddings().weight[seven[0]].detach()
    with torch.no_grad():
        substituted = decoder.encode_text(decoder.tokenize(["a handwritten <sks>"]), token_embeds=row[None, None])
        written = decoder.encode_text(decoder.tokenize(["a handwritten seven"]))
        different = decoder.encode_text(decoder.tokenize(["a handwritten <sks>"]), token_embeds=torch.zeros_like(row)[None, None])
    torch.testing.assert_close(substituted, written, rtol=0, atol=1e-6)
    assert (different - written).abs().max() > 1e-2


def test_text_alignment_is_zero_exactly_when_the_token_is_the_spelled_word(sd_folder: Path, tmp_path: Path) -> None:
    """text_alignment pulls the prompt's text states toward the spelled prompt's; its minimum is the word itself."""
    decoder = build_from(recipe_for(tmp_path, sd_folder, adapter=None)).generator
    decoder.text_alignment = 0.5  # set here: this recipe's dreambooth data spells no text, so validation refuses it in the recipe
    rows = [("a handwritten <sks>", torch.zeros(3, 16, 16), 1.0, False, f"a handwritten {word}") for word in ("seven", "two")]
    batch = decoder.collate(rows)
    table = decoder.text_encoder.get_input_embeddings().weight
    seven, two = (table[decoder.tokenizer(w, add_special_tokens=False).input_ids[0]].detach() for w in ("seven", "two"))
    losses = {}
    for name, words in {"word": (seven, two), "other": (two, seven)}.items():
        token_embeds = torch.stack(words)[:, None].clone().requires_grad_(True)  # (B, 1, D), as a bridge's output
        out = decoder(batch["input_ids"], pixel_values=batch["pixel_values"], spelled_ids=batch["spelled_ids"], token_embeds=token_embeds)
        out["loss"].backward()
        losses[name] = (out["alignment_loss"].item(), token_embeds.grad.abs().max().item())
        torch.testing.assert_close(out["loss"], out["per_sample_loss"].mean() + 0.5 * out["alignment_loss"])
    assert losses["word"][0] < 1e-10 and losses["other"][0] > 1e-3 and losses["other"][1] > 0, losses  # and it reaches the token
    with torch.no_grad():  # evaluation: the diffusion loss alone, comparable with runs without alignment
        assert "alignment_loss" not in decoder(batch["input_ids"], pixel_values=batch["pixel_values"],
                                               spelled_ids=batch["spelled_ids"], token_embeds=torch.stack([seven, two])[:, None])
    with pytest.raises(MMAdaptError, match=r"spelled_text 'a handwritten seven digit' has \d+ tokens and its prompt 'a handwritten <sks>' has \d+"):
        decoder.collate([("a handwritten <sks>", torch.zeros(3, 16, 16), 1.0, False, "a handwritten seven digit")])
    unspelled = decoder.collate([("a handwritten <sks>", torch.zeros(3, 16, 16), 1.0, False, None)])
    assert unspelled["spelled_ids"] is None  # generating from a card trained this way needs no spelled text...
    with pytest.raises(MMAdaptError, match="the data gives no spelled_text"):  # ...training does
        decoder(unspelled["input_ids"], pixel_values=unspelled["pixel_values"], token_embeds=token_embeds[:1])


def test_context_tokens_are_appended_to_the_cross_attention_states(sd_folder: Path, tmp_path: Path) -> None:
    model = build_from(recipe_for(tmp_path, sd_folder, token=False, adapter=None, context=True))
    decoder = model.generator
    ids = decoder.tokenize(["a handwritten two", "a handwritten three"])
    context = torch.randn(2, 2, decoder.widths()["context"])
    states = decoder.encode_text(ids, context=context)
    assert states.shape == (2, ids.shape[1] + 2, decoder.widths()["context"])
    torch.testing.assert_close(states[:, -2:], context)


def test_prompts_without_the_placeholder_get_a_message(sd_folder: Path, tmp_path: Path) -> None:
    model = build_from(recipe_for(tmp_path, sd_folder, adapter=None))
    with pytest.raises(MMAdaptError, match="placeholder '<sks>'"):
        model.generator.encode_text(model.generator.tokenize(["a digit"]), token_embeds=torch.zeros(1, 1, 64))


@pytest.mark.parametrize("adapter", ["lora", "lokr"])
def test_training_moves_only_the_adapter_and_token(sd_folder: Path, tmp_path: Path, adapter: str) -> None:
    from mmadapt.training.trainer import Trainer

    recipe, plan = load_recipe(recipe_for(tmp_path, sd_folder, adapter=adapter), [])
    trainer = Trainer(recipe, plan)
    frozen_before = {k: v.clone() for k, v in trainer.model.state_dict().items() if k not in
                     {f"nodes.{n}" for n in trainer.model.trainable_parameters()}}
    trainable_before = {k: p.detach().clone() for k, p in trainer.model.trainable_parameters().items()}
    trainer.train()
    trained = trainer.model.trainable_parameters()
    assert set(trained) >= {"token.tokens"} and any(("lora_" if adapter == "lora" else "lokr_") in k for k in trained)
    assert all(k.startswith(("token.", "sd.unet.")) for k in trained)
    assert all(not torch.equal(trainable_before[k], p) for k, p in trained.items() if k == "token.tokens")
    assert any(not torch.equal(trainable_before[k], p) for k, p in trained.items() if k.startswith("sd.unet."))
    trainable_keys = {f"nodes.{k}" for k in trained}
    for key, value in trainer.model.state_dict().items():
        if key not in trainable_keys and key in frozen_before:
            assert torch.equal(value, frozen_before[key]), key


def test_v_prediction_and_min_snr_follow_diffusers(sd_folder: Path, tmp_path: Path) -> None:
    from diffusers.training_utils import compute_snr

    model = build_from(recipe_for(tmp_path, sd_folder, adapter=None), "graph.sd.snr_gamma=5.0")
    decoder = model.generator
    timesteps = torch.tensor([1, 50, 500, 999])
    snr = compute_snr(decoder.scheduler, timesteps)
    expected = torch.stack([snr, 5.0 * torch.ones_like(snr)], dim=1).min(dim=1)[0] / snr  # diffusers' train_text_to_image
    torch.testing.assert_close(decoder.min_snr_weights(timesteps, "epsilon"), expected)
    torch.testing.assert_close(decoder.min_snr_weights(timesteps, "v_prediction"), expected * snr / (snr + 1))


def test_a_lora_card_exports_to_load_lora_weights_with_the_same_image(sd_folder: Path, tmp_path: Path) -> None:
    model = build_from(recipe_for(tmp_path, sd_folder, token=False))
    randomize_trainables(model)
    card = save_card(model, tmp_path / "card")
    ours = as_array(model.generator.generate(["a handwritten seven"], num_inference_steps=4, output_type="np", seed=3))
    stock = stock_pipeline(sd_folder)
    plain = stock_images(stock, ["a handwritten seven"], seed=3)
    stock.load_lora_weights(str(card / "diffusers"))
    exported = stock_images(stock, ["a handwritten seven"], seed=3)
    assert np.abs(ours - exported).max() < 1e-4
    assert np.abs(plain - exported).max() > 1e-2  # the LoRA changes the picture, so the match is not vacuous


def test_a_lokr_card_exports_to_load_lora_adapter_with_the_same_image(sd_folder: Path, tmp_path: Path) -> None:
    model = build_from(recipe_for(tmp_path, sd_folder, token=False, adapter="lokr"))
    randomize_trainables(model)
    card = save_card(model, tmp_path / "card")
    ours = as_array(model.generator.generate(["a handwritten two"], num_inference_steps=4, output_type="np", seed=1))
    stock = stock_pipeline(sd_folder)
    plain = stock_images(stock, ["a handwritten two"], seed=1)
    stock.unet.load_lora_adapter(str(card / "diffusers" / "lokr"), prefix=None, use_safetensors=True)
    exported = stock_images(stock, ["a handwritten two"], seed=1)
    assert np.abs(ours - exported).max() < 1e-4
    assert np.abs(plain - exported).max() > 1e-2


def test_a_learned_token_exports_to_load_textual_inversion_with_the_same_image(sd_folder: Path, tmp_path: Path) -> None:
    model = build_from(recipe_for(tmp_path, sd_folder, adapter=None))
    randomize_trainables(model, scale=0.5)
    card = save_card(model, tmp_path / "card")
    ours = as_array(model.generate({"size": 1, "node_inputs": {}}, ["a <sks> seven"], num_inference_steps=4, output_type="np", seed=2))
    stock = stock_pipeline(sd_folder)
    stock.load_textual_inversion(str(card / "diffusers" / "learned_embeds.safetensors"))
    exported = stock_images(stock, ["a <sks> seven"], seed=2)
    assert np.abs(ours - exported).max() < 1e-4
    reloaded = load_card(card)  # and the card itself rebuilds the same picture
    again = as_array(reloaded.generate({"size": 1, "node_inputs": {}}, ["a <sks> seven"], num_inference_steps=4, output_type="np", seed=2))
    assert np.abs(ours - again).max() < 1e-5


def test_a_lora_trained_in_diffusers_loads_onto_the_graph(sd_folder: Path, tmp_path: Path) -> None:
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from mmadapt.generators.diffusion.export import load_diffusers_lora

    elsewhere = stock_pipeline(sd_folder)
    elsewhere.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_v"]))
    with torch.no_grad():
        for name, param in elsewhere.unet.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.1)
    StableDiffusionPipeline.save_lora_weights(str(tmp_path / "lora"), unet_lora_layers=convert_state_dict_to_diffusers(
        get_peft_model_state_dict(elsewhere.unet)), safe_serialization=True)
    expected = stock_images(elsewhere, ["a handwritten four"], seed=5)
    model = build_from(recipe_for(tmp_path, sd_folder, token=False, adapter=None))
    load_diffusers_lora(model, tmp_path / "lora")
    ours = as_array(model.generator.generate(["a handwritten four"], num_inference_steps=4, output_type="np", seed=5))
    assert np.abs(ours - expected).max() < 1e-4
    with pytest.raises(MMAdaptError, match="no such LoRA"):
        load_diffusers_lora(model, tmp_path / "missing")


def test_dreambooth_data_needs_three_images_and_makes_class_images_once(sd_folder: Path, tmp_path: Path) -> None:
    from mmadapt.data.dreambooth import DreamBoothImages

    two = write_instances(tmp_path / "two", count=2)
    with pytest.raises(DataError, match="has 2 image\\(s\\); personalization needs at least 3"):
        DreamBoothImages(str(two), "a <sks> digit")
    model = build_from(recipe_for(tmp_path, sd_folder, adapter=None))
    data = DreamBoothImages(str(write_instances(tmp_path / "three")), "a <sks> digit", class_prompt="a digit",
                            num_class_images=4, prior_loss_weight=0.5)
    data.prepare(model, tmp_path / "run")
    made = sorted((tmp_path / "run" / "class_images").glob("*.png"))  # each has a .txt caption beside it
    assert len(made) == 4 and len(data) == 8
    stamps = [p.stat().st_mtime_ns for p in made]
    data.prepare(model, tmp_path / "run")
    assert [p.stat().st_mtime_ns for p in made] == stamps  # reused, not regenerated
    weights = sorted(data[i]["loss_weight"] for i in range(len(data)))
    assert weights == [0.5] * 4 + [1.0] * 4
    assert {data[i]["prompt"] for i in range(4)} == {"a <sks> zero", "a <sks> three", "a <sks> five"}  # their caption files
    assert {data[i]["prompt"] for i in range(4, 8)} == {"a digit"}
    (tmp_path / "three" / "slanted-zero.txt").unlink()
    assert "a <sks> digit" in {data[i]["prompt"] for i in range(4)}  # no caption file: the folder's prompt


def test_picture_examples_count_alike_on_every_process_and_only_rank_zero_writes(sd_folder: Path, tmp_path: Path) -> None:
    """A sharded model's validation runs on every process; each must count examples alike (or the others would keep
    generating while rank 0 stops, and the gathers would hang), and only rank 0 writes the pictures."""
    from mmadapt.training.trainer import Trainer

    recipe, plan = load_recipe(recipe_for(tmp_path, sd_folder, adapter=None), [])
    trainer = Trainer(recipe, plan)
    batch = trainer.collator([trainer.dataset[i] for i in range(2)])
    main = trainer._examples(1, batch, 2)
    assert len(main) == 2 and all(Path(e["generated"]).is_file() for e in main)
    trainer.__class__ = type("OtherRank", (Trainer,), {"is_main": property(lambda self: False)})
    other = trainer._examples(2, batch, 2)
    assert len(other) == len(main) and not list((trainer.out_dir / "samples").glob("step-0000002-*"))
