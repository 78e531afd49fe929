"""The IP-Adapter bridge: diffusers' projection and decoupled cross-attention train, the U-Net stays bit-identical,
and the export loads with stock `load_ip_adapter` and draws mmadapt's own picture."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from mmadapt.core.assemble import assemble
from mmadapt.core.card import load_card_weights, save_card
from mmadapt.core.validate import check_recipe
from mmadapt.data.collate import build_dataset, collator_for
from mmadapt.errors import MMAdaptError, RecipeError
from test_diffusion import as_array, randomize_trainables, sd_folder, stock_images, stock_pipeline  # noqa: F401

PROMPT = "a handwritten digit"


def ip_recipe(folder: Path, scale: float | None = 1.0, wired: bool = True, variant: str = "plain") -> dict[str, Any]:
    sd: dict[str, Any] = {"type": "diffusion", "checkpoint": str(folder), "inputs": {"ip_tokens": "ipa"} if wired else {}}
    if scale is not None:
        sd["ip_adapter_scale"] = scale
    plus = variant == "plus"  # the resampler reads the encoder's patch tokens; plain its pooled embedding
    graph = {"vision": {"type": "open_clip_vision", "checkpoint": "zoo:digits-clip", "feature": "patch" if plus else "pooled"},
             "ipa": {"type": "ip_adapter", "inputs": {"context": "vision"}, "variant": variant, **({"num_queries": 6} if plus else {})},
             "sd": sd}
    if not wired:  # a soft prompt to train in the IP-Adapter's place
        graph = {"tok": {"type": "soft_prompt", "num_tokens": 2}, "sd": {**sd, "inputs": {"context": "tok"}}}
    return {"name": "tiny-ipa", "graph": graph, "data": {"type": "digits_captions", "split": "train", "text": PROMPT},
            "train": {"steps": 2, "batch_size": 4}}


def built(raw: dict[str, Any]) -> Any:
    recipe, plan = check_recipe(raw, "test")
    return assemble(recipe, plan)


def batch_of(model: Any, count: int = 4, indices: list[int] | None = None) -> dict[str, Any]:
    data = build_dataset({"type": "digits_captions", "split": "test", "text": PROMPT})
    return collator_for(model, 64)([data[i] for i in (indices if indices is not None else range(count))])


@pytest.mark.parametrize("variant", ["plain", "plus"])
def test_only_the_projection_and_the_ip_key_values_train(sd_folder: Path, variant: str) -> None:
    model = built(ip_recipe(sd_folder, variant=variant))
    unet = model.generator.unet
    crosses = [n for n in unet.attn_processors if n.endswith("attn2.processor")]
    trainable = model.trainable_parameters()
    assert sorted(trainable) == sorted([f"ipa.projection.{k}" for k in model.nodes["ipa"].projection.state_dict()]
                                       + [f"sd.unet.{n}.to_{kv}_ip.0.weight" for n in crosses for kv in "kv"])
    for name in crosses:  # IP-Adapter's training starts the image key/values from the text ones
        attention = unet.get_submodule(name.rsplit(".", 1)[0])
        assert torch.equal(attention.processor.to_k_ip[0].weight, attention.to_k.weight)
    frozen = {k: v.clone() for k, v in unet.state_dict().items() if "_ip." not in k}
    optimizer = torch.optim.AdamW(trainable.values(), lr=1e-2)
    before = {k: p.detach().clone() for k, p in trainable.items()}
    loss = model(batch_of(model))["loss"]
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable.values())
    optimizer.step()
    assert all(not torch.equal(before[k], p) for k, p in trainable.items())
    assert all(torch.equal(frozen[k], v) for k, v in unet.state_dict().items() if "_ip." not in k)


@pytest.mark.parametrize("variant", ["plain", "plus"])
def test_the_export_loads_with_load_ip_adapter_and_draws_the_same_picture(sd_folder: Path, tmp_path: Path, variant: str) -> None:
    model = built(ip_recipe(sd_folder, variant=variant))
    randomize_trainables(model, scale=0.2)
    model.eval()  # the bridge's training-time embedding dropout off
    card = save_card(model, tmp_path / "card")
    stock = stock_pipeline(sd_folder)
    plain = stock_images(stock, [PROMPT], seed=3)
    stock.load_ip_adapter(str(card / "diffusers"), subfolder="", weight_name="ip_adapter.safetensors", image_encoder_folder=None)
    ours = []
    for index in (0, 1):  # the stock pipeline takes one image prompt per call (it repeats the embeddings per prompt)
        batch = batch_of(model, indices=[index])
        ours.append(as_array(model.generate(batch, [PROMPT], num_inference_steps=4, output_type="np", seed=3))[0])
        # What a user of stock diffusers computes for this encoder: the embedding the bridge projects
        embeds = model.nodes["ipa"].embedding(model.run_nodes(batch, until_generator=True)["vision"])  # plain (1, D); plus (1, N, D)
        generator = torch.Generator().manual_seed(3)
        theirs = stock([PROMPT], num_inference_steps=4, guidance_scale=4.0, generator=generator, output_type="np",
                       ip_adapter_image_embeds=[torch.cat([torch.zeros_like(embeds), embeds])[:, None]]).images[0]
        assert np.abs(ours[-1] - theirs).max() < 1e-4
        assert np.abs(plain[0] - theirs).max() > 5e-3  # the image prompt changes the picture, so the match is not vacuous
    assert np.abs(ours[0] - ours[1]).max() > 5e-3  # and each picture's own prompt counts
    # In a batch, each picture follows its own image prompt alone (the pipeline's repeat once mixed them all)
    pair = as_array(model.generate(batch_of(model, indices=[0, 1]), [PROMPT] * 2, num_inference_steps=4, output_type="np", seed=3))
    same = as_array(model.generate(batch_of(model, indices=[0, 0]), [PROMPT] * 2, num_inference_steps=4, output_type="np", seed=3))
    assert np.abs(pair[0] - same[0]).max() < 1e-5 and np.abs(pair[0] - ours[0]).max() < 1e-4

    again = built(ip_recipe(sd_folder, variant=variant)).eval()
    load_card_weights(again, card)
    assert np.array_equal(as_array(again.generate(batch_of(again, indices=[0, 1]), [PROMPT] * 2, num_inference_steps=4,
                                                  output_type="np", seed=3)), pair)


CLIP_TOWER = {"model_type": "clip_vision_model", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
              "num_attention_heads": 2, "image_size": 32, "patch_size": 8, "projection_dim": 24}


def test_an_hf_clip_export_draws_from_the_picture_in_stock_diffusers(sd_folder: Path, tmp_path: Path) -> None:
    """With transformers' CLIP image encoder, the export carries it (image_encoder/), and the stock pipeline given the
    picture itself (ip_adapter_image) draws mmadapt's picture."""
    raw = ip_recipe(sd_folder)
    raw["graph"]["vision"] = {"type": "hf_vision", "config": dict(CLIP_TOWER), "feature": "pooled", "projection": True, "seed": 1}
    model = built(raw)
    assert model.nodes["vision"].widths()["output"] == 24  # the projected embedding, read off the config at validate too
    randomize_trainables(model, scale=0.2)
    model.eval()
    card = save_card(model, tmp_path / "card")
    assert (card / "diffusers" / "image_encoder" / "config.json").is_file()
    stock = stock_pipeline(sd_folder)
    stock.load_ip_adapter(str(card / "diffusers"), subfolder="", weight_name="ip_adapter.safetensors")  # its image_encoder/
    data = build_dataset({"type": "digits_captions", "split": "test", "text": PROMPT})
    drawn = []
    for index in (0, 1):
        ours = as_array(model.generate(batch_of(model, indices=[index]), [PROMPT], num_inference_steps=4, output_type="np", seed=3))[0]
        theirs = stock_images(stock, [PROMPT], seed=3, ip_adapter_image=data[index]["image"])[0]
        assert np.abs(ours - theirs).max() < 1e-4
        drawn.append(theirs)
    assert np.abs(drawn[0] - drawn[1]).max() > 5e-3  # each picture draws its own: the match is not vacuous

    # Without the projection the tower's output is not what diffusers computes from a picture: no image_encoder/
    raw["graph"]["vision"]["projection"] = False
    plain_tower = built(raw)
    assert not (save_card(plain_tower, tmp_path / "unprojected") / "diffusers" / "image_encoder").exists()


def test_a_projection_on_a_tower_without_one_is_refused(sd_folder: Path) -> None:
    raw = ip_recipe(sd_folder)
    raw["graph"]["vision"] = {"type": "hf_vision", "config": {**CLIP_TOWER, "model_type": "siglip_vision_model"},
                              "feature": "pooled", "projection": True}
    with pytest.raises(RecipeError, match="graph.vision.projection.*siglip_vision_model.*no CLIP image projection"):
        check_recipe(raw, "test")


def test_tokens_without_the_attention_or_the_attention_without_tokens_are_refused(sd_folder: Path) -> None:
    with pytest.raises(RecipeError, match=r"graph\.sd\.ip_adapter_scale: inputs\.ip_tokens is wired, but the U-Net has no "
                                          r"IP-Adapter attention to read them: set ip_adapter_scale"):
        built(ip_recipe(sd_folder, scale=None))
    with pytest.raises(RecipeError, match=r"graph\.sd\.ip_adapter_scale: is set, but no node feeds inputs\.ip_tokens"):
        built(ip_recipe(sd_folder, wired=False))
    # and at run time, for a generator built outside a recipe
    model = built(ip_recipe(sd_folder))
    with pytest.raises(MMAdaptError, match="has ip_adapter_scale set, but no ip_tokens reached it"):
        model.generator.generate([PROMPT], num_inference_steps=1)


def test_bridge_settings_that_cannot_work_are_refused_before_loading(sd_folder: Path) -> None:
    raw = ip_recipe(sd_folder)
    raw["graph"]["ipa"].update(pool="flatten")
    with pytest.raises(RecipeError, match=r"graph\.ipa\.pool: pool: flatten \(variant: plain\) joins input_tokens"):
        built(raw)
    raw = ip_recipe(sd_folder, variant="plus")
    raw["graph"]["ipa"].update(hidden_size=96)
    with pytest.raises(RecipeError, match=r"graph\.ipa\.hidden_size: 96 is not a multiple of 64: .* \(e\.g\. hidden_size: 128\)"):
        built(raw)


def test_a_flattened_token_grid_is_one_embedding_of_all_its_tokens(sd_folder: Path) -> None:
    raw = ip_recipe(sd_folder)
    raw["graph"]["vision"]["feature"] = "patch"
    raw["graph"]["ipa"].update(pool="flatten", input_tokens=16)  # digits-clip: 4x4 patches
    model = built(raw)
    tokens = model.run_nodes(batch_of(model, 2), until_generator=True)["vision"]  # (2, 16, D)
    bridge = model.nodes["ipa"]
    assert bridge.projection.image_embeds.in_features == 16 * tokens.shape[-1]
    assert torch.equal(bridge.embedding(tokens), tokens.reshape(2, -1))


def test_training_drops_an_embedding_to_the_no_image_prompt_guidance_uses(sd_folder: Path) -> None:
    """IP-Adapter's training zeroes an embedding now and then: those samples get exactly the tokens guidance contrasts
    with; in eval, none is dropped."""
    model = built(ip_recipe(sd_folder))
    bridge = model.nodes["ipa"]
    tokens = model.run_nodes(batch_of(model, 4), until_generator=True)["vision"]
    bridge.drop_rate = 1.0
    assert torch.allclose(bridge.train()(tokens), bridge.unconditional(tokens))
    assert not torch.allclose(bridge.eval()(tokens), bridge.unconditional(tokens))
    bridge.drop_rate = 0.5
    torch.manual_seed(0)
    dropped = [bool(torch.allclose(t, u)) for t, u in zip(bridge.train()(tokens.repeat(8, 1, 1)), bridge.unconditional(tokens).repeat(8, 1, 1))]
    assert 0 < sum(dropped) < len(dropped)  # per sample, not per batch
