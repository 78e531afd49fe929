"""A full BLIP-2 folder as the starting point of every node: the blip2_vision tower, the Q-Former (init_from) and the
causal_lm all read one saved Blip2ForConditionalGeneration, and the graph gives its loss and its greedy generation."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from conftest import TINY_LMS, batch_for, build

IMAGE_TOKEN = 383  # outside the test tokenizer's 200 ids, inside the LM's 384
QUERIES = 4
BLIP2_VISION = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                "image_size": 32, "patch_size": 8}
BLIP2_QFORMER = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
                 "cross_attention_frequency": 1}
TEXT_IDS = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}  # the test tokenizer's <pad>, <s>, </s>


def save_tiny_blip2(folder: Path, seed: int = 0) -> Any:
    """A random tiny Blip2ForConditionalGeneration (llama LM) saved with a BlipImageProcessor; the model, in eval mode."""
    from transformers import Blip2Config, Blip2ForConditionalGeneration, BlipImageProcessor

    torch.manual_seed(seed)
    config = Blip2Config(vision_config=dict(BLIP2_VISION), qformer_config=dict(BLIP2_QFORMER),
                         text_config={**TINY_LMS["llama"], **TEXT_IDS}, num_query_tokens=QUERIES, image_token_index=IMAGE_TOKEN)
    model = Blip2ForConditionalGeneration(config).eval()
    with torch.no_grad():
        model.query_tokens.normal_(std=0.02)  # the default zeros would make the queries' part of the match trivial
        model.vision_model.post_layernorm.weight.normal_(1.0, 0.5)  # post_layernorm counts: not an identity-like init
        model.vision_model.post_layernorm.bias.normal_(std=0.5)
        for name, weight in model.qformer.named_parameters():  # at std 0.02 the queries barely see the image
            if "crossattention" in name and name.endswith("weight") and weight.dim() == 2:
                weight.normal_(std=0.3)
        model.language_projection.weight.normal_(std=0.3)
    model.save_pretrained(folder)
    BlipImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    return model


def blip2_graph(folder: Path, tokenizer: Path, **llm: Any) -> dict[str, Any]:
    """vision, qformer and llm all starting from the one BLIP-2 folder."""
    graph = {
        "vision": {"type": "blip2_vision", "checkpoint": str(folder)},
        "qformer": {"type": "qformer", "inputs": {"context": "vision"}, "num_queries": QUERIES, "hidden_size": 32,
                    "num_layers": 2, "num_heads": 2, "intermediate_size": 64, "cross_attention_every": 1, "init_from": str(folder)},
        "llm": {"type": "causal_lm", "checkpoint": str(folder), "tokenizer": str(tokenizer), "inputs": {"prefix_embeds": "qformer"},
                **llm},
    }
    return {"name": "tiny-blip2", "graph": graph, "data": {"type": "digits_captions", "split": "train", "limit": 8},
            "train": {"steps": 1, "batch_size": 2, "precision": "fp32"}}


@pytest.fixture(scope="module")
def blip2(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Path]:
    folder = tmp_path_factory.mktemp("blip2")
    return save_tiny_blip2(folder), folder


def with_image_tokens(ids: torch.Tensor, fill: int) -> torch.Tensor:
    """BLIP-2's processor order: [image x num_query_tokens][bos][text]."""
    return torch.cat([torch.full((ids.shape[0], QUERIES), fill, dtype=ids.dtype), ids], dim=1)


def test_a_full_blip2_folder_gives_blip2s_own_loss_and_generation(blip2: tuple[Any, Path], word_tokenizer_dir: Path) -> None:
    reference, folder = blip2
    model = build(blip2_graph(folder, word_tokenizer_dir)).eval()
    assert type(model.nodes["vision"].processor).__name__ == "BlipImageProcessor"  # the folder's own
    batch = batch_for(model, 2)
    llm = {k: v.clone() for k, v in batch["node_inputs"]["llm"].items() if isinstance(v, torch.Tensor)}
    pixels = batch["node_inputs"]["vision"]["pixel_values"].clone()
    with torch.no_grad():
        tokens = model.nodes["vision"](pixels)
        assert tokens.shape == (2, 1 + 16, 32)  # (B, 1 + N, D): class token kept, as the Q-Former reads it
        ours = model(batch)["loss"]
        theirs = reference(input_ids=with_image_tokens(llm["input_ids"], IMAGE_TOKEN), pixel_values=pixels,
                           attention_mask=with_image_tokens(llm["attention_mask"], 1), labels=with_image_tokens(llm["labels"], -100)).loss
    print(f"loss: mmadapt {ours.item():.7f}, Blip2ForConditionalGeneration {theirs.item():.7f}")
    assert abs(ours.item() - theirs.item()) < 1e-5, (ours.item(), theirs.item())

    generator = model.generator
    prompts = batch["prompts"]
    generated = model.generate(batch, prompts, max_new_tokens=8)
    stock = []
    for row, prompt in enumerate(prompts):
        ids = torch.tensor([generator.encode_prompt(prompt)])
        out = reference.generate(pixel_values=pixels[row: row + 1], input_ids=with_image_tokens(ids, IMAGE_TOKEN), max_new_tokens=8,
                                 do_sample=False, eos_token_id=generator.eos_id, pad_token_id=generator.pad_id)
        stock.append(generator.tokenizer.decode(out[0, QUERIES + ids.shape[1]:], skip_special_tokens=True).strip())
    print("generated:", generated)
    assert generated == stock
    assert any(stock), stock  # something was generated: the match is not two empty strings

    # Break-check: the last layer's hidden_states (before post_layernorm) in place of last_hidden_state is another loss.
    vision = model.nodes["vision"]
    vision.forward = lambda pixel_values: vision.model(pixel_values=pixel_values, output_hidden_states=True).hidden_states[-1]
    with torch.no_grad():
        assert abs(model(batch)["loss"].item() - theirs.item()) > 1e-3


def test_a_blip2_folder_without_its_language_model_is_refused_by_name(blip2: tuple[Any, Path], word_tokenizer_dir: Path,
                                                                     tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    from mmadapt.errors import MMAdaptError
    from mmadapt.generators.causal_lm import CausalLM

    _, folder = blip2
    for name in ("config.json", "preprocessor_config.json"):
        (tmp_path / name).write_bytes((folder / name).read_bytes())
    tensors = load_file(str(folder / "model.safetensors"))
    save_file({k: v for k, v in tensors.items() if not k.startswith("language_model.")}, str(tmp_path / "model.safetensors"),
              metadata={"format": "pt"})
    refused = rf"'{tmp_path}': a blip-2 folder without all of its language model's tensors \(language_model\.\*"
    with pytest.raises(MMAdaptError, match=refused):
        CausalLM(checkpoint=str(tmp_path), tokenizer=str(word_tokenizer_dir))


def test_a_saved_blip2_vision_model_and_a_clip_folder(blip2: tuple[Any, Path], tmp_path: Path) -> None:
    """A saved Blip2VisionModel loads as the same tower; a CLIP folder is refused, pointing at hf_vision."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    from mmadapt.core.validate import check_recipe
    from mmadapt.encoders.blip2_vision import Blip2Vision
    from mmadapt.errors import MMAdaptError, RecipeError

    reference, folder = blip2
    reference.vision_model.save_pretrained(tmp_path / "tower")
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        tokens = Blip2Vision(checkpoint=str(tmp_path / "tower"))(pixels)  # (B, 1 + N, D)
        torch.testing.assert_close(tokens, reference.vision_model(pixels).last_hidden_state, atol=1e-6, rtol=0)
    CLIPVisionModel(CLIPVisionConfig(**BLIP2_VISION)).save_pretrained(tmp_path / "clip")
    with pytest.raises(MMAdaptError, match="is a 'clip_vision_model' model; blip2_vision takes a BLIP-2 folder.*use hf_vision"):
        Blip2Vision(checkpoint=str(tmp_path / "clip"))
    raw = blip2_graph(folder, Path("bytes"))
    raw["graph"]["vision"]["checkpoint"] = str(tmp_path / "clip")
    with pytest.raises(RecipeError, match=r"graph\.vision\.checkpoint: '.*clip' is a 'clip_vision_model' model"):
        check_recipe(raw, "test")  # validate says so before any weights load
