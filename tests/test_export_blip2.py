"""`mmadapt export` of a blip2_vision -> Q-Former -> LM card: a Blip2ForConditionalGeneration folder that transformers
alone loads (in a process that cannot import mmadapt) and that gives mmadapt's own logits and greedy generation."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from conftest import build
from test_blip2_full import blip2_graph, save_tiny_blip2
from test_export_llava import card_of, image, stock  # noqa: F401 - image: a fixture

PROMPT = {"template": "instruction", "prompt": "What does it show?"}
LORA = [{"type": "lora", "r": 4, "target_modules": ["q_proj", "v_proj"]}]


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("blip2")
    save_tiny_blip2(path)
    return path



def blip2_recipe(folder: Path, tokenizer: Path, **llm: Any) -> dict[str, Any]:
    raw = blip2_graph(folder, tokenizer, **llm)
    raw["data"].update(PROMPT)
    return raw



def ours(card: Path, image: Any, max_new_tokens: int) -> tuple[torch.Tensor, list[int], str]:
    """mmadapt's logits over [queries][bos][prompt], its greedy ids on them (the LM may pick ids the tokenizer decodes to
    nothing), and its greedy caption, from the card as `mmadapt generate` loads it."""
    from mmadapt.serve.inference import generate_from_images, load_card, prompt_for

    model = load_card(card)
    generator = model.generator
    pixels = model.nodes["vision"].transform_images([image])[0][None]  # (1, 3, H, W)
    with torch.no_grad():
        prefix = model.nodes["qformer"](model.nodes["vision"](pixels))  # (1, Q, D)
        ids = torch.tensor(generator.encode_prompt(prompt_for(model.recipe.data)))
        sequence = torch.cat([prefix[0], generator.embed(ids)])[None]  # (1, Q + T, D)
        logits = generator.model(inputs_embeds=sequence).logits[0]  # (Q + T, V)
        ids = generator.model.generate(inputs_embeds=sequence, max_new_tokens=max_new_tokens, do_sample=False,
                                       eos_token_id=generator.eos_id, pad_token_id=generator.pad_id)[0]
    caption = generate_from_images(model, [image], max_new_tokens=max_new_tokens)[0]
    return logits, ids.tolist(), caption



@pytest.mark.parametrize("case", ["qformer", "qformer+lora"])
def test_the_export_gives_mmadapts_logits_and_generation(case: str, folder: Path, word_tokenizer_dir: Path, image: Any,
                                                           tmp_path: Path) -> None:
    from mmadapt.cli import main

    raw = blip2_recipe(folder, word_tokenizer_dir, **({"adapters": LORA} if case.endswith("lora") else {}))
    model = card_of(raw, tmp_path / "card")
    assert any("lora_B" in n for n, _ in model.named_parameters()) == case.endswith("lora")
    assert main(["export", str(tmp_path / "card"), str(tmp_path / "blip2")]) == 0
    theirs = stock(tmp_path / "blip2", image, tmp_path, max_new_tokens=8)
    logits, ids, caption = ours(tmp_path / "card", image, max_new_tokens=8)
    assert theirs["class"] == "Blip2ForConditionalGeneration" and not theirs["mmadapt_imported"]
    assert theirs["logits"].shape == logits.shape  # the processor put num_query_tokens image tokens before [bos] prompt
    difference = (theirs["logits"] - logits).abs().max().item()
    print(f"{case}: max |logit difference| {difference:.2e}")
    assert difference < 1e-5
    print(repr(caption), theirs["generated_ids"].tolist())
    assert theirs["generated_ids"].tolist() == ids and len(ids) == 8
    assert theirs["generated"] == caption


def test_graphs_blip2_does_not_hold_are_refused_naming_the_node(folder: Path, word_tokenizer_dir: Path, tmp_path: Path) -> None:
    from mmadapt.errors import ExportError

    after_bos = build(blip2_recipe(folder, word_tokenizer_dir, prefix_after_bos=True))
    with pytest.raises(ExportError, match=r"blip2: 'llm' puts the image after bos.*prefix_after_bos: false"):
        after_bos.generator.export_stock(after_bos, tmp_path / "out")
    raw = blip2_recipe(folder, word_tokenizer_dir)
    raw["graph"]["qformer"]["context_positions"] = 17
    positioned = build(raw)
    with pytest.raises(ExportError, match=r"blip2: 'qformer' adds context_positions \(17\)"):
        positioned.generator.export_stock(positioned, tmp_path / "out")
    assert not (tmp_path / "out").exists()
