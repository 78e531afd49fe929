"""`mmadapt export` of a tower -> projector -> LM card: a LlavaForConditionalGeneration folder that transformers alone
loads (in a process that cannot import mmadapt) and that gives mmadapt's own logits and greedy generation."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from conftest import build, tiny_recipe

HERE = Path(__file__).resolve().parent
PROMPT = {"template": "instruction", "prompt": "What does it show?"}


def llava_recipe(tokenizer: Path, bridge: str = "mlp_projector", lora: bool = False, **llm: Any) -> dict[str, Any]:
    raw = tiny_recipe("lora" if lora else bridge)
    raw["graph"]["proj"] = raw["graph"].pop("proj", None) or raw["graph"].pop(bridge)
    raw["graph"]["proj"].pop("hidden_dim", None)  # LLaVA's MLP keeps the LM's width
    raw["graph"]["llm"].update({"tokenizer": str(tokenizer), "prefix_after_bos": True, "inputs": {"prefix_embeds": "proj"}, **llm})
    raw["data"].update(PROMPT)
    return raw


def card_of(raw: dict[str, Any], folder: Path) -> Any:
    """A card of the graph with every trainable tensor random (LoRA's B too, so merging matters)."""
    from mmadapt.core.card import save_card

    model = build(raw)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.requires_grad:
                parameter.copy_(torch.randn_like(parameter) * (0.3 if "lora_" in name else 0.2))
    save_card(model, folder)
    return model


def ours(card: Path, image: Any, max_new_tokens: int, bridge: str = "proj") -> tuple[torch.Tensor, str, torch.Tensor]:
    """mmadapt's logits over [bos][image][prompt] and its greedy caption, from the card as `mmadapt generate` loads it."""
    from mmadapt.serve.inference import generate_from_images, load_card, prompt_for

    model = load_card(card)
    generator = model.generator
    pixels = model.nodes["vision"].transform_images([image])[0][None]  # (1, 3, H, W)
    with torch.no_grad():
        prefix = model.nodes[bridge](model.nodes["vision"](pixels))  # (1, N, D)
        ids = torch.tensor(generator.encode_prompt(prompt_for(model.recipe.data)))
        embeds = generator.embed(ids)  # (T, D)
        sequence = torch.cat([embeds[:1], prefix[0].to(embeds.dtype), embeds[1:]])[None]  # (1, 1 + N + T - 1, D)
        logits = generator.model(inputs_embeds=sequence).logits[0]
    caption = generate_from_images(model, [image], max_new_tokens=max_new_tokens)[0]
    return logits, caption, pixels


def stock(folder: Path, image: Any, tmp_path: Path, max_new_tokens: int, pixels: torch.Tensor | None = None) -> dict[str, Any]:
    """transformers alone, in a subprocess where importing mmadapt fails; `pixels` replace its processor's."""
    image_path, out = tmp_path / "digit.png", tmp_path / "stock.pt"
    image.save(image_path)
    text = json.loads((folder / "mmadapt_export.json").read_text())["prompt"]
    given = []
    if pixels is not None:
        torch.save(pixels, tmp_path / "pixels.pt")
        given = [str(tmp_path / "pixels.pt")]
    done = subprocess.run([sys.executable, str(HERE / "stock_load.py"), str(folder), str(image_path), text,
                           str(max_new_tokens), str(out), *given], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return torch.load(out)


@pytest.fixture(scope="module")
def image() -> Any:
    from mmadapt.data.digits import DigitsCaptions

    return DigitsCaptions(split="test", style="fixed")[0]["image"]


@pytest.mark.parametrize("case", ["mlp", "mlp+lora", "linear"])
def test_the_export_gives_mmadapts_logits_and_generation(case: str, word_tokenizer_dir: Path, image: Any,
                                                           tmp_path: Path) -> None:
    from mmadapt.cli import main

    raw = llava_recipe(word_tokenizer_dir, bridge="linear_projector" if case == "linear" else "mlp_projector",
                       lora=case == "mlp+lora")
    card_of(raw, tmp_path / "card")
    assert main(["export", str(tmp_path / "card"), str(tmp_path / "llava")]) == 0
    theirs = stock(tmp_path / "llava", image, tmp_path, max_new_tokens=8)
    logits, caption, _ = ours(tmp_path / "card", image, max_new_tokens=8)
    assert theirs["class"] == "LlavaForConditionalGeneration" and not theirs["mmadapt_imported"]
    assert theirs["logits"].shape[0] == logits.shape[0]  # the processor expanded <image> to the tower's patch count
    difference = (theirs["logits"][:, : logits.shape[1]] - logits).abs().max().item()
    print(f"{case}: max |logit difference| {difference:.2e}")
    assert difference < 1e-5
    assert len(theirs["generated_ids"]) > 0 and theirs["generated"] == caption


def test_the_zoo_projector_card_exports_its_open_clip_tower_as_clip_vision_model(image: Any, tmp_path: Path) -> None:
    """recipes/mini/projector.yaml: the open_clip tower is converted to CLIPVisionModel. On mmadapt's own pixels the
    stock model is exact; the stock processor resizes with torch, not PIL, and the export says by how much."""
    import yaml

    from mmadapt.cli import main

    raw = yaml.safe_load((HERE.parent / "recipes/mini/projector.yaml").read_text())
    card_of(raw, tmp_path / "card")
    assert main(["export", str(tmp_path / "card"), str(tmp_path / "llava")]) == 0
    logits, caption, pixels = ours(tmp_path / "card", image, max_new_tokens=8, bridge="projector")
    theirs = stock(tmp_path / "llava", image, tmp_path, max_new_tokens=8, pixels=pixels)
    difference = (theirs["logits"][:, : logits.shape[1]] - logits).abs().max().item()
    print(f"open_clip tower: max |logit difference| {difference:.2e}")
    assert difference < 1e-5 and theirs["generated"] == caption
    notes = json.loads((tmp_path / "llava" / "mmadapt_export.json").read_text())
    assert 0 < notes["pixel_gap"]["8x8"] < 0.05  # bicubic upsampling in torch against PIL's: small, and said


def test_a_graph_no_stock_class_holds_is_refused_with_exit_2_and_nothing_written(
        word_tokenizer_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from mmadapt.cli import main

    card_of(llava_recipe(word_tokenizer_dir, prefix_after_bos=False), tmp_path / "card")
    assert main(["export", str(tmp_path / "card"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "llava: 'llm' puts the image before bos" in err and "prefix_after_bos: true" in err
    assert not (tmp_path / "out").exists()
    raw = llava_recipe(word_tokenizer_dir)
    raw["graph"]["proj"] = {  # a Q-Former on a CLIP tower: BLIP-2's bridge, not its tower
"type": "qformer", "num_queries": 4, "hidden_size": 32, "num_layers": 1, "num_heads": 2,
                            "inputs": {"context": "vision"}}
    card_of(raw, tmp_path / "qcard")
    assert main(["export", str(tmp_path / "qcard"), str(tmp_path / "out")]) == 2
    assert "llava: 'proj' is QFormer" in capsys.readouterr().err
    raw = llava_recipe(word_tokenizer_dir)
    raw["graph"]["proj"] = {"type": "prefix", "inputs": {"x": "vision"}, "num_tokens": 3, "hidden_dim": 24}
    card_of(raw, tmp_path / "pcard")  # a ClipCap prefix: neither class's projector
    assert main(["export", str(tmp_path / "pcard"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "llava: 'proj' is PrefixBridge" in err or "llava: 'proj' is Prefix" in err, err
    assert "blip2: 'vision' is HFVisionTower" in err
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    assert main(["export", str(tmp_path / "card"), str(tmp_path / "full")]) == 2
    assert "already exists" in capsys.readouterr().err and (tmp_path / "full" / "keep.txt").read_text() == "mine"


@pytest.mark.parametrize("recipe, says", [
    ("multimodal.yaml", "takes 3 bridge inputs (image_qformer, audio_grid, points_qformer)"),
    ("audio-grid.yaml", "llava: 'grid' is TokenEmbedder"),  # the grid reader is no per-token projector (and BLIP-2: AudioMAE)
])
def test_several_modalities_or_an_audio_encoder_have_no_stock_class(recipe: str, says: str) -> None:
    import yaml

    from mmadapt.core.assemble import assemble
    from mmadapt.core.validate import check_recipe
    from mmadapt.errors import ExportError

    raw = yaml.safe_load((HERE.parent / "recipes/mini" / recipe).read_text())
    model = assemble(*check_recipe(raw, recipe, for_training=False))  # the graph alone: no data needed
    with pytest.raises(ExportError) as refused:
        model.generator.export_stock(model, Path("/nonexistent/never-written"))
    assert says in str(refused.value) and "\n  - blip2: " in str(refused.value)
