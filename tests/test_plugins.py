"""A new generator kind and a new modality, added from outside the package (tests/plugin_generator.py and
tests/plugin_modality.py, named by dotted path), go through validate, info, train, the card, and eval untouched."""
from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

from mmadapt.cli import main
from mmadapt.data.digits import WORDS
from mmadapt.errors import CardError, DataError

GENERATOR = "plugin_generator.DigitClassifier"
ENCODER = "plugin_modality.TabularEncoder"
DATASET = "plugin_modality.DigitsTable"
STEPS = 30


def plugin_recipe(out: Path) -> dict[str, Any]:
    """Pixel vectors -> frozen linear encoder (4 tokens of 24) -> linear projector (trains) -> frozen classifier head (16)."""
    return {
        "name": "plugin-digits",
        "graph": {
            "table": {"type": ENCODER, "width": 24, "tokens": 4},
            "proj": {"type": "linear_projector", "inputs": {"x": "table"}},
            "head": {"type": GENERATOR, "width": 16, "inputs": {"tokens": "proj"}},
        },
        "data": {"type": DATASET, "split": "train", "limit": 256},
        "val_data": {"type": DATASET, "split": "val", "limit": 64},
        "train": {"lr": 0.2, "batch_size": 32, "steps": STEPS, "log_every": 1, "output_dir": str(out)},
    }


def write(raw: dict[str, Any], path: Path) -> str:
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return str(path)


def frozen_state(model: Any) -> dict[str, torch.Tensor]:
    """Every tensor of the frozen nodes (the classifier head and the encoder), copied."""
    return {f"{n}.{k}": v.detach().clone() for n in ("head", "table") for k, v in model.nodes[n].state_dict().items()}


def val_loss(model: Any, split: str = "val", limit: int = 64) -> float:
    from mmadapt.data.collate import collator_for
    from plugin_modality import DigitsTable

    dataset = DigitsTable(split, limit)
    batch = collator_for(model, max_tokens=8)([dataset[i] for i in range(len(dataset))])
    model.eval()
    with torch.no_grad():
        return float(model(batch)["loss"])


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """`mmadapt train` on the plugin recipe, in-process; the trained model is kept, with its frozen tensors before training."""
    from mmadapt.training.trainer import Trainer

    folder = tmp_path_factory.mktemp("plugins")
    recipe = write(plugin_recipe(folder / "run"), folder / "plugins.yaml")
    seen: dict[str, Any] = {}
    original = Trainer.train

    def spy(self: Trainer, resume: bool = False) -> Path:
        seen["model"], seen["before"] = self.model, frozen_state(self.model)
        seen["untrained_val_loss"] = val_loss(self.model)
        self.model.train()
        return original(self, resume)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Trainer, "train", spy)
        code = main(["train", recipe])
    assert code == 0
    return {"recipe": recipe, "out": folder / "run", "card": folder / "run" / "card", **seen}


def test_validate_passes_and_infers_the_bridge_widths_from_the_plugins(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    raw = plugin_recipe(tmp_path / "run")
    assert main(["validate", write(raw, tmp_path / "ok.yaml")]) == 0
    out = capsys.readouterr().out
    assert "ok (3 nodes: table -> proj -> head)" in out
    assert "proj: in_dim=24, out_dim=16" in out  # the encoder's output width, the generator's `tokens` port width
    raw["graph"]["proj"]["out_dim"] = 8  # against the head's width: the plugin generator's config_widths is read
    assert main(["validate", write(raw, tmp_path / "narrow.yaml")]) == 2
    assert "graph.proj.out_dim: given as 8 but 'head' input 'tokens' has width 16" in capsys.readouterr().err
    del raw["graph"]["proj"]["out_dim"]
    raw["graph"]["table"]["inputs"] = {"pixels": "data.image"}  # a field the plugin dataset does not give
    assert main(["validate", write(raw, tmp_path / "field.yaml")]) == 2
    assert ("graph.table.inputs.pixels: data gives no field 'image'; its samples carry: id, key, label, pixels, prompt, "
            "target, text") in capsys.readouterr().err


def test_the_modality_lives_on_the_encoder_not_in_the_table(tmp_path: Path) -> None:
    from mmadapt.data.modalities import MODALITIES, modality_of
    from plugin_modality import TABULAR, TabularEncoder, read_vector

    assert modality_of(TabularEncoder) is TABULAR and TABULAR.field == "pixels"
    assert "tabular" not in MODALITIES and all(m.field != "pixels" for m in MODALITIES.values())  # nothing registered
    assert read_vector(TABULAR.example()).shape == (64,)
    short = tmp_path / "short.npy"
    np.save(short, np.zeros(10, dtype=np.float32))
    with pytest.raises(DataError, match=f"{short}: expected 64 pixel values, got shape \\(10,\\)"):
        read_vector(short)
    with pytest.raises(DataError, match="pixel values must be finite and in 0..16"):
        read_vector(np.full(64, 99.0))


def test_info_runs_the_dummy_forward_on_the_modality_example(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["info", write(plugin_recipe(tmp_path / "run"), tmp_path / "info.yaml")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert re.split(r"\s{2,}", lines[0]) == ["node", "type", "state", "params", "trainable", "inputs", "output"]
    rows = [re.split(r"\s{2,}", line) for line in lines[2:-1]]
    assert rows == [  # 64 -> 4 x 24 frozen linear; the projector 24 x 16 + 16; the frozen head 16 x 10 + 10
        ["table", ENCODER, "frozen", "6,240", "0", "pixels=(1, 64)", "(1, 4, 24)"],
        ["proj", "linear_projector", "trainable", "400", "400", "x=(1, 4, 24)", "(1, 4, 16)"],
        ["head", GENERATOR, "frozen", "170", "0", "tokens=(1, 4, 16)", "{loss: ()}"],
    ]
    assert lines[-1] == "trainable parameters: 400"  # the projector alone: 24 x 16 + 16


def test_a_bad_label_is_a_data_error_naming_the_sample_and_is_skipped(run: dict[str, Any]) -> None:
    from mmadapt.data.collate import collator_for
    from plugin_modality import DigitsTable

    model = run["model"]
    dataset = DigitsTable("val", 4)
    with pytest.raises(DataError, match=r"sample 7 \(key k7\): label must be an integer 0..9, got 12"):
        model.generator.prepare({"label": 12, "id": 7, "key": "k7"}, 8)
    samples = [dataset[i] for i in range(4)]
    samples[1]["label"] = "seven"
    batch = collator_for(model, max_tokens=8)(samples)
    assert batch["size"] == 3 and batch["ids"] == [0, 2, 3]
    reason = f"sample 1 (key {samples[1]['key']}): label must be an integer 0..9, got 'seven'"
    assert [(i, why) for i, _, why in batch["bad"]] == [(1, reason)]


def test_train_lowers_the_loss_and_leaves_the_frozen_head_bit_identical(run: dict[str, Any]) -> None:
    records = [json.loads(line) for line in (run["out"] / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == STEPS
    assert losses[0] == pytest.approx(math.log(10), abs=0.15)  # chance over ten digits
    assert sum(losses[-5:]) / 5 < losses[0] - 0.6, losses
    final_val = [r["val_loss"] for r in records if "val_loss" in r][-1]
    assert final_val < run["untrained_val_loss"] - 0.5, (final_val, run["untrained_val_loss"])
    after = frozen_state(run["model"])
    assert set(after) == set(run["before"]) and "head.head.weight" in after
    for key, tensor in run["before"].items():
        assert torch.equal(after[key], tensor), f"{key} changed in training"
    assert not any(p.requires_grad for p in run["model"].nodes["head"].parameters())
    assert set(run["model"].trainable_parameters()) == {"proj.proj.weight", "proj.proj.bias"}


def test_the_card_loads_back_with_trust_and_gives_the_same_outputs(run: dict[str, Any], tmp_path: Path) -> None:
    from mmadapt.data.collate import collator_for
    from mmadapt.serve.inference import generate_for_samples, generate_from_files, load_card
    from plugin_modality import DigitsTable

    card = load_card(run["card"], trust_code=True)
    trained = run["model"].eval()
    assert type(card.generator).__name__ == "DigitClassifier" and type(card.nodes["table"]).__name__ == "TabularEncoder"
    for key, tensor in frozen_state(trained).items():  # the frozen nodes rebuild from their seeds, bit for bit
        assert torch.equal(frozen_state(card)[key], tensor), key
    dataset = DigitsTable("test", 48)
    samples = [dataset[i] for i in range(len(dataset))]
    batch = collator_for(card, max_tokens=8)(samples)
    with torch.no_grad():
        theirs, ours = card(batch), trained(batch)
    assert torch.equal(theirs["logits"], ours["logits"]) and torch.equal(theirs["loss"], ours["loss"])
    names = generate_for_samples(card, [{k: v for k, v in s.items() if k != "label"} for s in samples], "")
    assert names == generate_for_samples(trained, samples, "")
    accuracy = sum(n == s["text"] for n, s in zip(names, samples)) / len(samples)
    assert accuracy > 0.3, (accuracy, names)  # chance is 0.1
    vector = tmp_path / "digit.npy"
    np.save(vector, samples[0]["pixels"])
    assert generate_from_files(card, "pixels", [vector, samples[0]["pixels"]]) == [names[0], names[0]]


def test_the_card_without_trust_is_refused_before_any_import(run: dict[str, Any], monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture) -> None:
    from mmadapt.serve.inference import load_card

    for module in ("plugin_generator", "plugin_modality"):
        monkeypatch.delitem(sys.modules, module)  # put back as they were after the test
    with pytest.raises(CardError) as info:
        load_card(run["card"])
    message = str(info.value)
    assert f"{run['card'] / 'recipe.yaml'}: the card names code outside mmadapt" in message
    assert f"graph.head.type: '{GENERATOR}' would import module 'plugin_generator'" in message
    assert f"graph.table.type: '{ENCODER}' would import module 'plugin_modality'" in message
    assert "Nothing was imported. If you trust this card, pass --trust-card-code" in message
    assert main(["eval", str(run["card"])]) == 2
    err = capsys.readouterr().err
    assert "--trust-card-code" in err and "Traceback" not in err
    assert "plugin_generator" not in sys.modules and "plugin_modality" not in sys.modules


def test_eval_reports_the_validation_loss_of_the_card(run: dict[str, Any], capsys: pytest.CaptureFixture) -> None:
    capsys.readouterr()
    assert main(["eval", str(run["card"]), "--trust-card-code"]) == 0
    out = capsys.readouterr().out
    figures = json.loads((run["card"] / "eval.json").read_text())
    assert figures["data"] == DATASET and figures["samples"] == 64 and figures["skipped"] == 0
    records = [json.loads(line) for line in (run["out"] / "metrics.jsonl").read_text().splitlines()]
    assert figures["loss"] == pytest.approx([r["val_loss"] for r in records if "val_loss" in r][-1], rel=1e-5)
    assert figures["loss"] < run["untrained_val_loss"] - 0.5
    assert f"val_data ({DATASET}): 64 samples, loss {figures['loss']:.4f}" in out
    assert len(figures["examples"]) == 3
    assert all(e["reference"] in WORDS and e["generated"] in WORDS for e in figures["examples"])  # class names, as generate gives
