"""SDXL as a generator: both encoders and the pooled/size conditioning as the stock pipeline computes them; LoRA (U-Net
and both text encoders), textual inversion over both, LoKr and IP-Adapter export to what StableDiffusionXLPipeline loads."""
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
from test_diffusion import as_array, build_from, randomize_trainables, sd_folder, stock_images, stock_pipeline, write_instances  # noqa: F401

PROMPT = "a handwritten <sks> seven"


@pytest.fixture(scope="module")
def sdxl_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-weight SDXL pipeline from tiny configs (diffusers' own SDXL test sizes), saved like any SDXL folder."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from mmadapt.zoo.build.digits_sd import VAE, build_tokenizer

    torch.manual_seed(0)
    tokenizer = build_tokenizer()
    text = dict(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                max_position_embeddings=tokenizer.model_max_length)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
                                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
                                attention_head_dim=(2, 4), transformer_layers_per_block=(1, 2), cross_attention_dim=64,
                                use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
                                projection_class_embeddings_input_dim=6 * 8 + 32, norm_num_groups=16)
    pipeline = StableDiffusionXLPipeline(
        vae=AutoencoderKL(**VAE), unet=unet, tokenizer=tokenizer, tokenizer_2=build_tokenizer(),
        text_encoder=CLIPTextModel(CLIPTextConfig(hidden_size=32, **text)),
        text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=32, projection_dim=32, **text)),
        scheduler=EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
                                         timestep_spacing="leading"))
    folder = tmp_path_factory.mktemp("tiny-sdxl")
    pipeline.save_pretrained(folder)
    return folder


def stock_sdxl(folder: Path) -> Any:
    return stock_pipeline(folder, "StableDiffusionXLPipeline", add_watermarker=False)


def draw(pipeline: Any, prompt: str, seed: int = 3, **kwargs: Any) -> np.ndarray:
    return stock_images(pipeline, [prompt], seed, height=16, width=16, **kwargs)[0]


def sdxl_recipe(tmp_path: Path, folder: Path, adapters: list[dict[str, Any]], token: bool = True) -> Path:
    graph: dict[str, Any] = {"sd": {"type": "sdxl", "checkpoint": str(folder), "placeholder": "<sks>", "placeholder_init": "digit",
                                    "adapters": adapters, "inputs": {"token_embeds": "token"} if token else {}}}
    if token:
        graph["token"] = {"type": "soft_prompt", "num_tokens": 1}
    recipe = {"name": "tiny-sdxl", "graph": graph,
              "data": {"type": "dreambooth", "instance_dir": str(write_instances(tmp_path / "instances")),
                       "instance_prompt": "a <sks> digit"},
              "train": {"steps": 2, "batch_size": 2, "lr": 1e-2, "output_dir": str(tmp_path / "run"), "log_every": 1}}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_the_conditioning_is_the_pipelines_own(sdxl_folder: Path, tmp_path: Path) -> None:
    """States, pooled embedding and size ids equal StableDiffusionXLPipeline.encode_prompt's for a written prompt."""
    model = build_from(sdxl_recipe(tmp_path, sdxl_folder, [], token=False))
    generator = model.generator
    states, added = generator.encode_prompt(generator.tokenize(["a handwritten seven", "a digit"]))
    stock = stock_sdxl(sdxl_folder)
    theirs, _, pooled, _ = stock.encode_prompt(["a handwritten seven", "a digit"], do_classifier_free_guidance=False)
    assert states.shape == (2, 20, 64) and torch.allclose(states, theirs, atol=1e-6)
    assert torch.allclose(added["text_embeds"], pooled, atol=1e-6)
    ids = stock._get_add_time_ids((16, 16), (0, 0), (16, 16), dtype=torch.float32, text_encoder_projection_dim=32)
    assert torch.equal(added["time_ids"], ids.repeat(2, 1))


def test_a_placeholder_filled_with_both_words_rows_equals_the_word(sdxl_folder: Path, tmp_path: Path) -> None:
    model = build_from(sdxl_recipe(tmp_path, sdxl_folder, [], token=False))
    generator = model.generator
    rows = [enc.get_input_embeddings().weight[tok("seven", add_special_tokens=False).input_ids[0]]
            for tok, enc in ((generator.tokenizer, generator.text_encoder), (generator.tokenizer_2, generator.text_encoder_2))]
    with torch.no_grad():
        written = generator.encode_text(generator.tokenize(["a handwritten seven"]))
        filled = generator.encode_text(generator.tokenize(["a handwritten <sks>"]), token_embeds=torch.cat(rows)[None, None])
        half = generator.encode_text(generator.tokenize(["a handwritten <sks>"]),
                                     token_embeds=torch.cat([rows[0], torch.zeros_like(rows[1])])[None, None])
    assert torch.allclose(filled, written, atol=1e-5)
    assert not torch.allclose(half, written, atol=1e-3)  # the second half reaches text_encoder_2


def test_training_moves_only_the_adapters_and_the_token(sdxl_folder: Path, tmp_path: Path) -> None:
    adapters = [{"type": "lora", "r": 4, "alpha": 8}, {"type": "lora", "r": 2, "alpha": 4, "target": "text_encoder_2"}]
    model = build_from(sdxl_recipe(tmp_path, sdxl_folder, adapters))
    trainable = model.trainable_parameters()
    assert any(".unet." in k for k in trainable) and any(".text_encoder_2." in k for k in trainable)
    assert not any(".text_encoder." in k for k in trainable) and "token.tokens" in trainable
    frozen = {k: v.clone() for k, v in model.generator.state_dict().items() if "lora_" not in k}
    from mmadapt.data.collate import build_dataset, collator_for

    data = build_dataset({"type": "dreambooth", "instance_dir": str(tmp_path / "instances"), "instance_prompt": "a <sks> digit"})
    batch = collator_for(model, 64)([data[0], data[1]])
    assert batch["node_inputs"]["sd"]["input_ids"].shape == (2, 2, 20)  # each prompt in both tokenizers
    optimizer = torch.optim.AdamW(trainable.values(), lr=1e-2)
    before = {k: p.detach().clone() for k, p in trainable.items()}
    loss = model(batch)["loss"]
    loss.backward()
    optimizer.step()
    assert all(not torch.equal(before[k], p) for k, p in trainable.items() if "lora_A" in k or k == "token.tokens")
    after = {k: v for k, v in model.generator.state_dict().items() if "lora_" not in k}
    assert all(torch.equal(frozen[k], after[k]) for k in frozen if "token_embedding" not in k)


def test_lora_on_all_three_and_the_token_load_in_the_stock_pipeline(sdxl_folder: Path, tmp_path: Path) -> None:
    """U-Net, text_encoder and text_encoder_2 LoRA through load_lora_weights, the token through load_textual_inversion
    (clip_l into the first pair, clip_g into the second): the stock pipeline draws mmadapt's picture."""
    from safetensors.torch import load_file

    adapters = [{"type": "lora", "r": 4, "alpha": 8}, {"type": "lora", "r": 2, "alpha": 5, "target": "text_encoder"},
                {"type": "lora", "r": 3, "alpha": 3, "target": "text_encoder_2", "target_modules": ["fc1", "q_proj"]}]
    model = build_from(sdxl_recipe(tmp_path, sdxl_folder, adapters))
    randomize_trainables(model)
    card = save_card(model, tmp_path / "card")
    ours = as_array(model.generate({"size": 1, "node_inputs": {}}, [PROMPT], num_inference_steps=4, output_type="np", seed=3))[0]
    stock = stock_sdxl(sdxl_folder)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # peft's only sign of keys it dropped
        stock.load_lora_weights(str(card / "diffusers"))
    embeds = load_file(card / "diffusers" / "learned_embeds.safetensors")
    assert sorted(embeds) == ["clip_g", "clip_l"] and embeds["clip_l"].shape == (1, 32)
    stock.load_textual_inversion(embeds["clip_l"], token="<sks>", text_encoder=stock.text_encoder, tokenizer=stock.tokenizer)
    stock.load_textual_inversion(embeds["clip_g"], token="<sks>", text_encoder=stock.text_encoder_2, tokenizer=stock.tokenizer_2)
    theirs = draw(stock, PROMPT)
    assert np.abs(ours - theirs).max() < 1e-4
    stock.unload_lora_weights()
    assert np.abs(draw(stock, PROMPT) - theirs).max() > 5e-3  # the LoRA changes the picture, so the match is not vacuous


def test_lokr_in_the_unet_exports_exactly(sdxl_folder: Path, tmp_path: Path) -> None:
    model = build_from(sdxl_recipe(tmp_path, sdxl_folder, [{"type": "lokr", "r": 4, "alpha": 2}], token=False))
    randomize_trainables(model)
    card = save_card(model, tmp_path / "card")
    ours = as_array(model.generate({"size": 1, "node_inputs": {}}, ["a handwritten two"], num_inference_steps=4, output_type="np", seed=1))[0]
    stock = stock_sdxl(sdxl_folder)
    stock.unet.load_lora_adapter(str(card / "diffusers" / "lokr"), prefix=None, use_safetensors=True)
    assert np.abs(ours - draw(stock, "a handwritten two", seed=1)).max() < 1e-4


def test_the_ip_adapter_export_loads_in_the_stock_sdxl_pipeline(sdxl_folder: Path, tmp_path: Path) -> None:
    from test_ip_adapter import PROMPT as IP_PROMPT, batch_of, built, ip_recipe

    raw = ip_recipe(sdxl_folder)
    raw["graph"]["sd"]["type"] = "sdxl"
    model = built(raw)
    randomize_trainables(model, scale=0.2)
    model.eval()
    card = save_card(model, tmp_path / "card")
    stock = stock_sdxl(sdxl_folder)
    plain = draw(stock, IP_PROMPT)
    stock.load_ip_adapter(str(card / "diffusers"), subfolder="", weight_name="ip_adapter.safetensors", image_encoder_folder=None)
    batch = batch_of(model, indices=[0])
    ours = as_array(model.generate(batch, [IP_PROMPT], num_inference_steps=4, output_type="np", seed=3))[0]
    embeds = model.nodes["ipa"].embedding(model.run_nodes(batch, until_generator=True)["vision"])  # (1, D)
    theirs = draw(stock, IP_PROMPT, ip_adapter_image_embeds=[torch.cat([torch.zeros_like(embeds), embeds])[:, None]])
    assert np.abs(ours - theirs).max() < 1e-4
    assert np.abs(plain - theirs).max() > 5e-3


def test_a_folder_of_the_other_layout_is_refused_with_the_right_type(sdxl_folder: Path, sd_folder: Path, tmp_path: Path) -> None:
    raw = yaml.safe_load(sdxl_recipe(tmp_path, sdxl_folder, []).read_text())
    raw["graph"]["sd"]["type"] = "diffusion"
    with pytest.raises(RecipeError, match=r"graph\.sd\.checkpoint: is a StableDiffusionXLPipeline folder.*use type: sdxl"):
        check_recipe(raw, "x.yaml")
    raw["graph"]["sd"].update(type="sdxl", checkpoint=str(sd_folder))
    with pytest.raises(RecipeError, match=r"graph\.sd\.checkpoint: is a StableDiffusionPipeline folder.*use type: diffusion"):
        check_recipe(raw, "x.yaml")


def test_the_widths_are_read_off_the_folder_without_weights(sdxl_folder: Path, tmp_path: Path) -> None:
    """A token bridge is as wide as both encoders' rows together; context and image tokens as the cross-attention."""
    from mmadapt.generators.diffusion.sdxl import SDXLGenerator

    assert SDXLGenerator.config_widths({"checkpoint": str(sdxl_folder)}) == {"token_embeds": 64, "context": 64, "ip_tokens": 64}
    model = build_from(sdxl_recipe(tmp_path, sdxl_folder, []))
    assert model.nodes["token"](batch_size=1).shape == (1, 1, 64)
