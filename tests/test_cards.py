"""Cards load only where they fit, say what differs otherwise, and export LoRA in peft's own layout."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import batch_for, build, tiny_recipe
from mmadapt.core.card import load_card_weights, save_card
from mmadapt.errors import CardError


@pytest.fixture(scope="module")
def lora_card(tmp_path_factory: pytest.TempPathFactory) -> tuple[object, Path]:
    torch.manual_seed(0)
    model = build(tiny_recipe("lora"))
    with torch.no_grad():
        for param in model.trainable_parameters().values():
            param.add_(torch.randn_like(param) * 0.1)
    folder = tmp_path_factory.mktemp("cards") / "card"
    save_card(model, folder)
    return model, folder


def test_card_metadata_records_bases_widths_and_counts(lora_card: tuple[object, Path]) -> None:
    model, folder = lora_card
    meta = json.loads((folder / "card.json").read_text())
    assert set(meta["bases"]) == {"vision", "llm"} and meta["bases"]["llm"]["config_hash"]
    assert meta["widths"]["proj"] == {"output": 48, "input": 32}
    assert meta["trainable_parameters"] == sum(p.numel() for p in model.trainable_parameters().values())
    assert meta["libraries"]["torch"] == torch.__version__.split("+")[0] or meta["libraries"]["torch"].startswith(torch.__version__[:4])
    assert "in_dim: 32" in (folder / "recipe.yaml").read_text()  # the resolved recipe spells out inferred widths


def test_card_on_a_different_base_says_what_differs(lora_card: tuple[object, Path]) -> None:
    _, folder = lora_card
    raw = tiny_recipe("lora")
    raw["graph"]["llm"]["config"]["num_hidden_layers"] = 3
    other = build(raw)
    with pytest.raises(CardError, match=r"graph.llm: the card was trained on inline-config \(config \w+\), this graph has inline-config \(config \w+\)"):
        load_card_weights(other, folder)


def test_a_base_with_the_same_config_and_other_weights_is_refused(lora_card: tuple[object, Path], tmp_path: Path) -> None:
    import shutil

    import yaml

    from mmadapt.serve.inference import load_card

    model, folder = lora_card
    meta = json.loads((folder / "card.json").read_text())
    assert meta["bases"]["llm"]["weights"] == model.nodes["llm"].weights_fingerprint()
    raw = tiny_recipe("lora")
    raw["graph"]["llm"]["seed"] = 1  # the same config, initialised from another seed
    with pytest.raises(CardError, match=r"graph.llm: same config, other weights: the card was trained on inline-config with "
                                        rf"weights {meta['bases']['llm']['weights']}, this graph's inline-config has weights \w+"):
        load_card_weights(build(raw), folder)
    copy = tmp_path / "edited"
    shutil.copytree(folder, copy)  # the card's own recipe edited the same way: `mmadapt eval/generate` load through this
    recipe = yaml.safe_load((copy / "recipe.yaml").read_text())
    recipe["graph"]["vision"]["seed"] = 3
    (copy / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    with pytest.raises(CardError, match=r"graph.vision: same config, other weights"):
        load_card(copy)


def test_a_recipe_whose_adapter_settings_differ_is_refused(lora_card: tuple[object, Path]) -> None:
    _, folder = lora_card
    raw = tiny_recipe("lora")
    raw["graph"]["llm"]["adapters"][0]["alpha"] = 16  # same shapes: without the check this loads and scales LoRA 2x
    with pytest.raises(CardError, match=r"graph.llm.model: adapter settings differ from the card's \(lora_alpha: \{'lora_alpha': 8\} "
                                        r"in the card, \{'lora_alpha': 16\} here\)"):
        load_card_weights(build(raw), folder)


def test_a_card_written_before_weights_were_recorded_still_loads(lora_card: tuple[object, Path], tmp_path: Path) -> None:
    import shutil

    from mmadapt.serve.inference import load_card

    model, folder = lora_card
    old = tmp_path / "old"
    shutil.copytree(folder, old)
    meta = json.loads((old / "card.json").read_text())
    del meta["adapters"]
    for base in meta["bases"].values():
        del base["weights"]
    (old / "card.json").write_text(json.dumps(meta))
    loaded = load_card(old)
    for key, param in model.trainable_parameters().items():
        assert torch.equal(loaded.trainable_parameters()[key], param)


def test_card_on_different_bridge_widths_names_the_tensors(lora_card: tuple[object, Path]) -> None:
    _, folder = lora_card
    raw = tiny_recipe("lora")
    raw["graph"]["proj"]["hidden_dim"] = 20
    with pytest.raises(CardError, match=r"proj.mlp.0.weight: shape \(40, 32\) in the card, \(20, 32\) here"):
        load_card_weights(build(raw), folder, check_bases=False)


def test_not_a_card_is_named(tmp_path: Path) -> None:
    from mmadapt.serve.inference import load_card

    with pytest.raises(CardError, match="no such card folder"):
        load_card(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CardError, match="not a bridge card"):
        load_card(tmp_path / "empty")


def test_lora_export_loads_with_stock_peft_and_alpha_survives(lora_card: tuple[object, Path]) -> None:
    from peft import PeftModel

    model, folder = lora_card
    config = json.loads((folder / "peft" / "llm" / "adapter_config.json").read_text())
    assert config["lora_alpha"] == 8 and config["r"] == 4
    fresh = build(tiny_recipe("lora")).nodes["llm"]  # same seed, same random base; LoRA re-initialised
    base = type(fresh.model)(fresh.model.config).eval()
    base.load_state_dict({k.replace(".base_layer", ""): v for k, v in model.nodes["llm"].model.state_dict().items() if "lora_" not in k})
    ids = torch.tensor([[1, 50, 60, 70]])
    with torch.no_grad():
        expected = model.nodes["llm"].model(input_ids=ids).logits
        assert not torch.allclose(base(input_ids=ids).logits, expected, atol=1e-3)  # the LoRA does change the output
        peft_model = PeftModel.from_pretrained(base, str(folder / "peft" / "llm")).eval()
        assert torch.allclose(peft_model(input_ids=ids).logits, expected, atol=1e-5)


def test_card_round_trip_keeps_generation(lora_card: tuple[object, Path]) -> None:
    from mmadapt.serve.inference import load_card

    model, folder = lora_card
    reloaded = load_card(folder)
    model.eval()
    batch = batch_for(model, 3, split="test")
    assert reloaded.generate(batch, batch["prompts"], max_new_tokens=5) == model.generate(batch, batch["prompts"], max_new_tokens=5)


def test_a_port_added_since_the_card_is_no_difference_but_a_changed_width_is(lora_card: tuple[object, Path], tmp_path: Path) -> None:
    """A card records each node's port widths. One written before a port existed (the diffusion generator's ip_tokens
    came later; the shipped AudioToken card predates it) still loads; a recorded port of another width does not."""
    import shutil

    _, folder = lora_card
    copy = tmp_path / "card"
    shutil.copytree(folder, copy)
    meta = json.loads((copy / "card.json").read_text())
    meta["widths"]["llm"] = {k: v for k, v in meta["widths"]["llm"].items() if k != "prefix_embeds"}  # as if it came later
    (copy / "card.json").write_text(json.dumps(meta))
    load_card_weights(build(tiny_recipe("lora")), copy)
    meta["widths"]["llm"] = {"prefix_embeds": 47}
    (copy / "card.json").write_text(json.dumps(meta))
    with pytest.raises(CardError, match=r"graph.llm: widths \{'prefix_embeds': 48\} here, \{'prefix_embeds': 47\} in the card"):
        load_card_weights(build(tiny_recipe("lora")), copy)
