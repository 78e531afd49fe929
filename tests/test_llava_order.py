"""The shipped LLaVA recipe puts the image where LLaVA does: its graph, on a tiny LlavaForConditionalGeneration's own
weights, gives LlavaForConditionalGeneration's loss."""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from conftest import TINY_LMS, TINY_VISION, batch_for, build

REPO = Path(__file__).resolve().parents[1]
IMAGE_TOKEN = 383  # outside the test tokenizer's 200 ids, inside the LM's 384


@pytest.fixture(scope="module")
def llava(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Path]:
    """A random tiny LLaVA, and its parts saved as the stock folders a graph names: the tower, the LM."""
    from transformers import LlamaConfig, LlamaForCausalLM, LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(0)
    text = {k: v for k, v in TINY_LMS["llama"].items() if k != "model_type"}
    config = LlavaConfig(vision_config=dict(TINY_VISION), text_config={"model_type": "llama", **text},
                         image_token_id=IMAGE_TOKEN, vision_feature_layer=-2, vision_feature_select_strategy="default",
                         projector_hidden_act="gelu")
    model = LlavaForConditionalGeneration(config).eval()
    folder = tmp_path_factory.mktemp("llava")
    model.model.vision_tower.save_pretrained(folder / "vision")
    lm = LlamaForCausalLM(LlamaConfig(**text))
    lm.model.load_state_dict(model.model.language_model.state_dict())
    lm.lm_head.load_state_dict(model.lm_head.state_dict())
    lm.save_pretrained(folder / "llm")
    return model, folder


def shipped_graph_on(folder: Path, tokenizer: Path) -> dict[str, Any]:
    """recipes/vlm/llava-1.5-7b.yaml with only its checkpoints swapped for the tiny parts."""
    raw = yaml.safe_load((REPO / "recipes/vlm/llava-1.5-7b.yaml").read_text())
    raw = copy.deepcopy(raw)
    raw["graph"]["vision"]["checkpoint"] = str(folder / "vision")
    raw["graph"]["llm"].update(checkpoint=str(folder / "llm"), tokenizer=str(tokenizer), dtype="float32")
    raw["data"] = {"type": "digits_captions", "split": "train", "limit": 8}
    raw["train"] = {"steps": 1, "batch_size": 2, "precision": "fp32"}
    return raw


def test_the_shipped_llava_recipe_gives_llavas_own_loss(llava: tuple[Any, Path], word_tokenizer_dir: Path) -> None:
    reference, folder = llava
    model = build(shipped_graph_on(folder, word_tokenizer_dir)).eval()
    projector = reference.model.multi_modal_projector
    with torch.no_grad():  # LLaVA's projector is linear_1, GELU, linear_2: the graph's 2-layer MLP
        model.nodes["projector"].mlp[0].load_state_dict(projector.linear_1.state_dict())
        model.nodes["projector"].mlp[2].load_state_dict(projector.linear_2.state_dict())
    batch = batch_for(model, 2)
    llm = {k: v.clone() for k, v in batch["node_inputs"]["llm"].items() if isinstance(v, torch.Tensor)}
    pixels = batch["node_inputs"]["vision"]["pixel_values"].clone()
    with torch.no_grad():
        ours = model(batch)["loss"]
    bos = model.generator.bos_id
    assert bos is not None and bool((llm["input_ids"][:, 0] == bos).all())
    patches = model.nodes["vision"](pixels).shape[1]  # (B, N, D): N image tokens per sample
    # LLaVA's processor: [bos][<image> x N][text]; the labels ignore bos and the image tokens.
    image = torch.full((2, patches), IMAGE_TOKEN)
    ignore = torch.full((2, patches), -100)
    input_ids = torch.cat([llm["input_ids"][:, :1], image, llm["input_ids"][:, 1:]], dim=1)
    labels = torch.cat([llm["labels"][:, :1], ignore, llm["labels"][:, 1:]], dim=1)
    mask = torch.cat([llm["attention_mask"][:, :1], torch.ones_like(image), llm["attention_mask"][:, 1:]], dim=1)
    with torch.no_grad():
        theirs = reference(input_ids=input_ids, pixel_values=pixels, attention_mask=mask,
                           labels=labels).loss
    assert abs(ours.item() - theirs.item()) < 1e-5, (ours.item(), theirs.item())
    moved = shipped_graph_on(folder, word_tokenizer_dir)
    moved["graph"]["llm"]["prefix_after_bos"] = False  # the image before bos, as the recipe had it: a different loss
    other = build(moved).eval()
    other.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert abs(other(batch_for(other, 2))["loss"].item() - theirs.item()) > 1e-3
