"""The real loading path: tiny models saved with save_pretrained / open_clip's layout, then named in a recipe."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from conftest import TINY_LMS, TINY_VISION, build
from mmadapt.core.validate import check_recipe

OPEN_CLIP_CFG = {"embed_dim": 24, "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 40, "layers": 3, "head_width": 20},
                 "text_cfg": {"context_length": 16, "vocab_size": 100, "width": 32, "heads": 2, "layers": 1}}


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory, word_tokenizer_dir: Path) -> dict[str, Path]:
    import open_clip
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoTokenizer, CLIPImageProcessor, CLIPVisionModel, LlamaForCausalLM

    root = tmp_path_factory.mktemp("bases")
    torch.manual_seed(5)
    config = dict(TINY_VISION)
    vision = CLIPVisionModel(AutoConfig.for_model(config.pop("model_type"), **config))
    vision.save_pretrained(root / "vision")
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, image_mean=[0.1, 0.2, 0.3]).save_pretrained(root / "vision")
    lm_config = dict(TINY_LMS["llama"], vocab_size=300, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    lm = LlamaForCausalLM(AutoConfig.for_model(lm_config.pop("model_type"), **lm_config))
    lm.save_pretrained(root / "lm")
    AutoTokenizer.from_pretrained(word_tokenizer_dir).save_pretrained(root / "lm")
    clip = open_clip.model.CLIP(**OPEN_CLIP_CFG)
    (root / "clip").mkdir()
    (root / "clip" / "open_clip_config.json").write_text(json.dumps({"model_cfg": OPEN_CLIP_CFG, "preprocess_cfg": {}}))
    save_file(clip.state_dict(), str(root / "clip" / "open_clip_model.safetensors"))
    return {"root": root, "vision": vision, "lm": lm, "clip": clip}


def recipe(vision_node: dict, root: Path) -> dict:
    return {"name": "saved", "graph": {
        "vision": vision_node,
        "proj": {"type": "mlp_projector", "inputs": {"x": "vision"}},
        "llm": {"type": "causal_lm", "checkpoint": str(root / "lm"), "inputs": {"prefix_embeds": "proj"}},
    }, "data": {"type": "digits_captions"}, "train": {}}


def test_transformers_folders_load_with_their_weights_processor_and_tokenizer(saved: dict) -> None:
    raw = recipe({"type": "hf_vision", "checkpoint": str(saved["root"] / "vision")}, saved["root"])
    _, plan = check_recipe(raw, "saved.yaml")  # widths come from the saved configs, no weights read
    assert plan.bridge_dims["proj"] == {"in_dim": 32, "out_dim": 48} and not plan.notes
    model = build(raw)
    for key, value in saved["vision"].state_dict().items():
        assert torch.equal(model.nodes["vision"].model.state_dict()[key], value)
    for key, value in saved["lm"].state_dict().items():
        assert torch.equal(model.nodes["llm"].model.state_dict()[key], value)
    pixels = model.nodes["vision"].preprocess(Image.new("RGB", (32, 32), (0, 0, 0)))
    std = model.nodes["vision"].processor.image_std
    assert torch.allclose(pixels[:, 0, 0], torch.tensor([-0.1 / std[0], -0.2 / std[1], -0.3 / std[2]]), atol=1e-4)  # the saved mean
    assert model.nodes["llm"].tokenizer.bos_token == "<s>" and model.nodes["llm"].encode_prompt("")[0] == 1


def test_open_clip_local_folder_patch_and_pooled_features(saved: dict) -> None:
    folder = str(saved["root"] / "clip")
    model = build(recipe({"type": "open_clip_vision", "checkpoint": folder, "layer": -2}, saved["root"]))
    encoder = model.nodes["vision"]
    for key, value in saved["clip"].visual.state_dict().items():
        assert torch.equal(encoder.visual.state_dict()[key], value)
    assert model.plan.bridge_dims["proj"]["in_dim"] == 40
    image = torch.randn(2, 3, 32, 32)
    tokens = encoder(image)  # (B, 16 patches, width)
    assert tokens.shape == (2, 16, 40)
    with torch.no_grad():  # layer -2 is the output of the second-to-last block, before ln_post
        visual = saved["clip"].visual
        x = visual.conv1(image).flatten(2).transpose(1, 2)
        x = torch.cat([visual.class_embedding.expand(2, 1, -1), x], dim=1) + visual.positional_embedding
        x = visual.ln_pre(x)
        for block in visual.transformer.resblocks[:-1]:
            x = block(x)
    assert torch.allclose(tokens, x[:, 1:], atol=1e-5)
    pooled = build(recipe({"type": "open_clip_vision", "checkpoint": folder, "feature": "pooled"}, saved["root"]))
    assert pooled.plan.bridge_dims["proj"]["in_dim"] == 24
    assert torch.allclose(pooled.nodes["vision"](image)[:, 0], saved["clip"].encode_image(image), atol=1e-5)


def test_hf_tower_layer_choice_and_cls_handling(saved: dict) -> None:
    raw = recipe({"type": "hf_vision", "checkpoint": str(saved["root"] / "vision"), "layer": -1, "keep_cls": True}, saved["root"])
    encoder = build(raw).nodes["vision"]
    image = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        reference = saved["vision"](pixel_values=image, output_hidden_states=True).hidden_states[-1]
        assert torch.equal(encoder(image), reference)  # (1, 17, 32): CLS kept
    raw["graph"]["vision"].update(layer=-2, keep_cls=False)
    encoder = build(raw).nodes["vision"]
    with torch.no_grad():
        reference = saved["vision"](pixel_values=image, output_hidden_states=True).hidden_states[-2][:, 1:]
        assert torch.equal(encoder(image), reference)  # (1, 16, 32): LLaVA's default strategy


def test_missing_checkpoint_folder_is_named(tmp_path: Path) -> None:
    from mmadapt.errors import RecipeError

    raw = recipe({"type": "hf_vision", "config": TINY_VISION}, tmp_path)
    with pytest.raises(RecipeError) as info:
        build(raw)
    assert "graph.llm" in str(info.value) and str(tmp_path / "lm") in str(info.value)
