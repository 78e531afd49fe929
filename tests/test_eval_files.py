"""`mmadapt eval CARD --data FILE` on a user's own caption JSONL and conversation JSON: figures, and a JSON report with
every sample's output; a bad row is skipped and named."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from test_chat_training import chat_graph, digits


@pytest.fixture(scope="module")
def card(word_tokenizer_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from mmadapt.core.card import save_card

    return save_card(chat_graph(word_tokenizer_dir), tmp_path_factory.mktemp("card") / "card")


def test_a_caption_file_gets_cider_bleu_and_every_caption(card: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from mmadapt.cli import main

    rows = []
    for index, image in enumerate(digits(3)):
        image.save(tmp_path / f"{index}.png")
        rows.append({"image": f"{index}.png", "text": f"a handwritten {['zero', 'one', 'two'][index]}"})
    (tmp_path / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["eval", str(card), "--data", str(tmp_path / "captions.jsonl")]) == 0
    out = capsys.readouterr().out
    assert "CIDEr:" in out and "BLEU-4:" in out
    report = json.loads((tmp_path / "captions.eval.json").read_text())
    assert report["kind"] == "captions" and report["samples"] == 3 and len(report["outputs"]) == 3
    assert [o["reference"] for o in report["outputs"]] == [r["text"] for r in rows]
    assert 0.0 <= report["bleu4"] <= 1.0 and report["cider"] >= 0.0


def test_caption_rows_are_asked_in_the_cards_template_once(word_tokenizer_dir: Path, tmp_path: Path) -> None:
    """An instruction-template card asks "Question: What does it show? Answer:", not that wrapped a second time."""
    from mmadapt.core.card import save_card
    from mmadapt.eval.files import report_file
    from mmadapt.serve.inference import load_card

    model = chat_graph(word_tokenizer_dir)
    model.recipe.data.update(template="instruction", prompt="What does it show?")
    card = save_card(model, tmp_path / "card")
    digits(1)[0].save(tmp_path / "0.png")
    (tmp_path / "c.jsonl").write_text(json.dumps({"image": "0.png", "text": "a handwritten zero"}) + "\n")
    figures = report_file(load_card(card), tmp_path / "c.jsonl", tmp_path / "r.json")
    assert figures["outputs"][0]["prompt"] == "Question: What does it show? Answer:"


def test_a_conversation_file_gets_exact_and_contains_of_the_last_turn(card: Path, tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture) -> None:
    from mmadapt.cli import main

    digits(1)[0].save(tmp_path / "a.png")
    good = {"id": "g", "image": "a.png", "conversations": [{"from": "human", "value": "<image> What is it?"},
                                                           {"from": "gpt", "value": "a zero"},
                                                           {"from": "human", "value": "Is it even?"},
                                                           {"from": "gpt", "value": "zero is even, so yes"}]}
    bad = {"id": "b", "image": "a.png", "conversations": [{"from": "human", "value": "no marker"}, {"from": "gpt", "value": "x"}]}
    (tmp_path / "chat.json").write_text(json.dumps([good, bad]))
    assert main(["eval", str(card), "--data", str(tmp_path / "chat.json"), "--report", str(tmp_path / "r.json")]) == 0
    assert "samples: 1 (1 bad, skipped)" in capsys.readouterr().out
    report = json.loads((tmp_path / "r.json").read_text())
    output = report["outputs"][0]
    assert output["sample_id"] == "g" and output["expected"] == "zero is even, so yes"
    assert report["contains"] == float("zero is even so yes" in " ".join(output["generated"].lower().replace(",", " ").split()))
    assert "0 '<image>' placeholder(s) but 1 image(s)" in report["bad_samples"][0]


def test_a_missing_file_is_named(card: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from mmadapt.cli import main

    assert main(["eval", str(card), "--data", str(tmp_path / "none.json")]) == 2
    assert f"--data: {tmp_path / 'none.json'}: no such file" in capsys.readouterr().err
