"""LLaVA-format conversation data: files as LLaVA publishes them, bad rows named, and the synthetic digits conversations."""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from mmadapt.data.conversations import (HELD_OUT_PAIRS, HELD_OUT_PHRASINGS, KINDS, PAIR_KINDS, PHRASINGS, Conversations,
                                        DigitsConversations, answer_is_right)
from mmadapt.data.modalities import content_key
from mmadapt.errors import DataError

ROWS: list[dict[str, Any]] = [
    {"id": "000000033471", "image": "coco/a.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat are the colors of the bus in the image?"},
        {"from": "gpt", "value": "The bus in the image is white and red."},
        {"from": "human", "value": "What feature can be seen on the back of the bus?"},
        {"from": "gpt", "value": "The back of the bus features an advertisement."}]},
    {"id": "pair-1", "image": ["coco/a.png", "b.png"], "conversations": [
        {"from": "human", "value": "Compare <image> and <image>."}, {"from": "gpt", "value": "The first is darker."}]},
    {"id": "wgByO4Y_0", "model": "", "conversations": [  # a text-only ShareGPT row of llava_v1_5_mix665k
        {"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"}]},
    {"image": "b.png", "conversations": [{"from": "human", "value": "Describe it.\n<image>"}, {"from": "gpt", "value": "Gray."}]},
]


def write_images(folder: Path) -> None:
    (folder / "coco").mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (16, 16), "red").save(folder / "coco" / "a.png")
    Image.new("RGB", (16, 16), "gray").save(folder / "b.png")


def write(path: Path, rows: list[Any], jsonl: bool) -> Path:
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n" if jsonl else json.dumps(rows, indent=2))
    return path


@pytest.mark.parametrize("jsonl", [False, True])
def test_llava_rows_become_samples_with_images_relative_to_the_file(tmp_path: Path, jsonl: bool) -> None:
    write_images(tmp_path)
    data = Conversations(str(write(tmp_path / ("data.jsonl" if jsonl else "data.json"), ROWS, jsonl)))
    assert len(data) == 4
    one, pair, text, unnamed = (data[i] for i in range(4))
    assert one["image"] == str(tmp_path / "coco" / "a.png") and one["conversations"] == ROWS[0]["conversations"]
    assert one["prompt"] == "<image>\nWhat are the colors of the bus in the image?"  # LLaVA's "<image>\n" kept as written
    assert one["target"] == one["text"] == "The back of the bus features an advertisement."
    assert (one["id"], one["sample_id"], one["key"]) == (0, "000000033471", content_key(tmp_path / "coco" / "a.png"))
    assert pair["image"] == [str(tmp_path / "coco" / "a.png"), str(tmp_path / "b.png")]
    assert pair["key"] not in (one["key"], unnamed["key"]) and pair["target"] == "The first is darker."
    assert "image" not in text and text["fields_absent"] == ["image"] and text["prompt"] == "Hi" and text["text"] == "Hello!"
    assert text["key"] == "text:wgByO4Y_0"
    assert unnamed["sample_id"] == "3" and unnamed["key"] == content_key(tmp_path / "b.png")  # no id: the row's index
    for sample in (one, pair, text, unnamed):
        assert set(sample) - {"fields_absent"} <= Conversations.fields


def test_image_root_and_limit(tmp_path: Path) -> None:
    write_images(tmp_path / "images")
    data = Conversations(str(write(tmp_path / "data.json", ROWS, False)), image_root=str(tmp_path / "images"), limit=2)
    assert len(data) == 2 and data[0]["image"] == str(tmp_path / "images" / "coco" / "a.png")


def bad_row(conversations: Any = None, image: Any = None, drop: bool = False) -> dict[str, Any]:
    row: dict[str, Any] = {"id": "bad"}
    if not drop:
        row["conversations"] = conversations
    if image is not None:
        row["image"] = image
    return row


GOOD = [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "A bus."}]
BAD_ROWS = {
    "one placeholder, two images": (bad_row(GOOD, ["a.png", "b.png"]), "1 '<image>' placeholder(s) but 2 image(s)"),
    "a placeholder, no image": (bad_row(GOOD), "1 '<image>' placeholder(s) but 0 image(s)"),
    "no placeholder, one image": (bad_row([{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Yo"}], "a.png"),
                                  "0 '<image>' placeholder(s) but 1 image(s)"),
    "no gpt turn": (bad_row([{"from": "human", "value": "<image>\nHi"}], "a.png"), "no gpt turn"),
    "no conversations": (bad_row(drop=True, image="a.png"), "no 'conversations'"),
    "empty conversations": (bad_row([], "a.png"), "'conversations' is empty"),
    "unknown role": (bad_row([{"from": "user", "value": "Hi"}, {"from": "gpt", "value": "Yo"}]), "turn 0 must be"),
    "image not a path": (bad_row(GOOD, 3), "'image' must be a path or a list of paths"),
}


@pytest.mark.parametrize("jsonl", [False, True])
@pytest.mark.parametrize("case", list(BAD_ROWS))
def test_a_bad_row_is_a_data_error_when_read_naming_file_row_and_problem(tmp_path: Path, case: str, jsonl: bool) -> None:
    write_images(tmp_path)
    row, problem = BAD_ROWS[case]
    path = write(tmp_path / ("data.jsonl" if jsonl else "data.json"), [ROWS[0], row], jsonl)
    data = Conversations(str(path))  # the file reads; the row fails when read, as one bad sample
    assert data[0]["sample_id"] == "000000033471"
    where = "row 1 (line 2) (id bad)" if jsonl else "row 1 (id bad)"
    with pytest.raises(DataError, match=re.escape(f"{path}: {where}: {problem}")):
        data.read(1)
    assert data[1]["problem"].startswith(f"{path}: {where}: {problem}")  # a stand-in the collator skips and counts


@pytest.mark.parametrize(("text", "message"), [
    ('[{"conversations": []},\n  {"id": 1,, }]', r"data\.json:2: not valid JSON"),
    ('{"id": 1, "conversations": []}\nnot json\n', r"data\.json:2: not valid JSON"),
    ('{\n  "id": 1,\n  "conversations": []\n}\n', r"data\.json: expected a JSON list of samples or JSONL .* one JSON dict"),
    ('[{"conversations": []}, "row"]', r"data\.json: row 1: expected an object with 'conversations', got str"),
    ('{"conversations": []}\n[1]\n', r"data\.json: row 1 \(line 2\): expected an object with 'conversations', got list"),
    ("[]", r"data\.json: no samples"),
])
def test_a_malformed_file_is_refused_at_construction_naming_file_and_line(tmp_path: Path, text: str, message: str) -> None:
    (tmp_path / "data.json").write_text(text)
    with pytest.raises(DataError, match=message):
        Conversations(str(tmp_path / "data.json"))


def test_a_missing_file_is_refused_naming_it_and_validate_says_so(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=re.escape(f"{tmp_path / 'none.json'}: data file not found")):
        Conversations(str(tmp_path / "none.json"))
    findings = Conversations.param_problems({"path": str(tmp_path / "none.json"), "image_root": str(tmp_path / "imgs")})
    assert [f.field for f in findings] == ["path", "image_root"]


# --- DigitsConversations ---
@pytest.fixture(scope="module")
def digits() -> dict[str, DigitsConversations]:
    return {split: DigitsConversations(split=split, count=600) for split in ("train", "val", "test")}


def pixel_set(split: str) -> set[bytes]:
    from mmadapt.data.digits import digit_image, load_digits_arrays, split_indices

    pixels = load_digits_arrays()[0]
    return {np.asarray(digit_image(pixels[i])).tobytes() for i in split_indices(split)}


def images_of(sample: dict[str, Any]) -> list[Image.Image]:
    return sample["image"] if isinstance(sample["image"], list) else [sample["image"]]


def test_each_split_uses_only_its_own_scans(digits: dict[str, DigitsConversations]) -> None:
    own = {split: pixel_set(split) for split in digits}
    for split, data in digits.items():
        others = set().union(*(own[s] for s in own if s != split)) - own[split]  # a scan may repeat across splits
        seen = [np.asarray(image).tobytes() for i in range(0, len(data), 7) for image in images_of(data[i])]
        assert set(seen) <= own[split] and not set(seen) & others, split


def test_samples_are_llava_conversations_with_a_placeholder_per_image(digits: dict[str, DigitsConversations]) -> None:
    for data in digits.values():
        for i in range(0, len(data), 11):
            sample = data[i]
            turns, images = sample["conversations"], images_of(sample)
            assert set(sample) <= DigitsConversations.fields and sample["id"] == i
            assert [t["from"] for t in turns] == ["human", "gpt"] * (len(turns) // 2) and len(turns) in (4, 6)
            assert turns[0]["value"].count("<image>") == len(images) == len(sample["labels"]) in (1, 2)
            assert all("<image>" not in t["value"] for t in turns[1:])
            assert isinstance(sample["image"], list) == (len(images) == 2) and all(im.mode == "RGB" for im in images)
            assert sample["prompt"] == turns[0]["value"] and sample["target"] == sample["text"] == turns[-1]["value"]
            assert len(sample["turn_kinds"]) == len(sample["held_out"]) == len(sample["turn_labels"]) == len(turns) // 2
            for kind, turn, labels in zip(sample["turn_kinds"], turns[1::2], sample["turn_labels"]):
                assert answer_is_right(kind, turn["value"], labels), (kind, turn, labels)


def test_every_kind_appears_and_held_out_phrasings_only_in_test(digits: dict[str, DigitsConversations]) -> None:
    held = [p.split("{ref}")[0] for phrasings in HELD_OUT_PHRASINGS.values() for p in phrasings]
    assert set(HELD_OUT_PHRASINGS) == set(PHRASINGS) == set(KINDS)
    for split, data in digits.items():
        kinds = {k for s in data.samples for k in s["turn_kinds"]}
        assert kinds == set(KINDS), split
        questions = [t["value"].lower() for s in data.samples for t in s["conversations"][0::2]]
        flags = [f for s in data.samples for f in s["held_out"]]
        uses_held = [q for q in questions if any(h.lower() in q for h in held)]
        pairs = [frozenset(s["labels"]) for s in data.samples if len(s["labels"]) == 2]
        held_pairs = [(k, frozenset(s["labels"]), f) for s in data.samples for k, f in zip(s["turn_kinds"], s["held_pair"])]
        assert all(f == (k in ("larger", "sum") and p in HELD_OUT_PAIRS) for k, p, f in held_pairs), split
        if split == "test":
            assert uses_held and 0.15 < sum(flags) / len(flags) < 0.4
            seen = {(k, any(h.lower() in t["value"].lower() for h in held)) for s in data.samples
                    for k, t, f in zip(s["turn_kinds"], s["conversations"][0::2], s["held_out"]) if f}
            assert {k for k, phrased in seen if phrased} == set(KINDS)  # each kind has held-out phrasings in test
            assert {p for p in pairs if p in HELD_OUT_PAIRS} == set(HELD_OUT_PAIRS)  # every held-out pair is asked about
            assert sum(f for _, _, f in held_pairs) >= 30
        else:
            assert not uses_held and not any(flags), split
            assert not set(pairs) & HELD_OUT_PAIRS, split  # never shown together outside test
    assert all(len(p) == 2 for p in HELD_OUT_PAIRS)


def test_the_same_arguments_draw_the_same_samples(digits: dict[str, DigitsConversations]) -> None:
    again = DigitsConversations(split="test", count=600)
    assert again.samples == digits["test"].samples
    assert np.array_equal(np.asarray(images_of(again[5])[0]), np.asarray(images_of(digits["test"][5])[0]))
    assert again[5]["key"] == digits["test"][5]["key"]
    assert DigitsConversations(split="test", count=600, seed=1).samples != again.samples
    assert DigitsConversations(split="test", count=600, limit=10).samples == again.samples[:10]
    with pytest.raises(DataError, match="digits split 'tran' unknown"):
        DigitsConversations(split="tran")


@pytest.mark.parametrize(("kind", "labels", "right", "wrong"), [
    ("shows", [7], ["a handwritten seven", "the digit 7", "The first one is a seven."], ["a handwritten one", "7 or 1", ""]),
    ("shows", [1], ["a picture of a one", "It shows 1."], ["the first one is a four"]),
    ("even", [7], ["seven is odd, so no", "No.", "It is odd."], ["seven is odd, so yes", "yes", "it is even"]),
    ("even", [4], ["four is even, so yes", "Yes, it is."], ["no", "four is odd"]),
    ("even", [5], ["five is odd, so no", "the second one is odd, so no"], ["seven is odd, so no"]),  # the verdict, of another digit
    ("plus_one", [5], ["five plus one is six", "6"], ["seven plus one is six", "the first one plus one is six, so five"]),
    ("plus_one", [7], ["seven plus one is eight", "8", "The first one plus one is eight."], ["seven plus one is nine", "seven"]),
    ("plus_one", [9], ["nine plus one is ten", "10"], ["nine plus one is eleven"]),
    ("larger", [3, 7], ["three is smaller than seven, so the second", "The second one.", "the second is larger"],
     ["the first", "they are equal"]),
    ("larger", [8, 2], ["eight is larger than two, so the first"], ["the second one"]),
    ("larger", [5, 5], ["both are five, so they are equal", "They are the same.", "five is not bigger than five"],
     ["the first", "the second", "five is bigger than five"]),
    ("larger", [3, 7], ["three is not bigger than seven", "three is smaller than seven"],
     ["seven is not bigger than three", "three is bigger than seven", "three is not smaller than seven", "three and seven"]),
    ("larger", [8, 2], ["eight is bigger than two", "eight is not smaller than two"], ["two is bigger than eight", "eight is not bigger than two"]),
    ("sum", [9, 8], ["nine plus eight is seventeen", "17", "The sum is 17."], ["nine plus eight is sixteen", "nine"]),
    ("sum", [0, 1], ["zero plus one is one"], ["zero plus one is two"]),
])
def test_answers_are_read_loosely(kind: str, labels: list[int], right: list[str], wrong: list[str]) -> None:
    assert all(answer_is_right(kind, answer, labels) for answer in right), kind
    assert not any(answer_is_right(kind, answer, labels) for answer in wrong), kind


def test_validate_accepts_a_recipe_on_digits_conversations_and_names_bad_values() -> None:
    from conftest import tiny_recipe
    from mmadapt.core.validate import check_recipe
    from mmadapt.errors import RecipeError

    raw = tiny_recipe("mlp_projector")
    raw["data"] = {"type": "digits_conversations", "split": "train"}
    raw["val_data"] = {"type": "digits_conversations", "split": "val", "count": 8}
    check_recipe(raw, "good.yaml")
    raw["data"] = {"type": "digits_conversations", "split": "tran", "count": 0}
    with pytest.raises(RecipeError) as info:
        check_recipe(raw, "bad.yaml")
    assert {str(p) for p in info.value.problems} == {"data.split: expected one of train, val, test, got 'tran'",
                                                     "data.count: must be >= 1, got 0"}


def test_chat_evaluation_scores_each_turn_and_group_from_the_answers_given(word_tokenizer_dir: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """evaluate_chat on a graph whose generation is replaced: gold answers score 1 in every group; no answer about a
    pair scores 0 on exactly the pair's groups (two-image questions, single-picture questions about a pair)."""
    from conftest import build, tiny_recipe
    from mmadapt.eval.chat import evaluate_chat

    raw = tiny_recipe("mlp_projector")
    raw["graph"]["llm"].update(tokenizer=str(word_tokenizer_dir), prefix_after_bos=True, markers={"mlp_projector": "<image>"},
                               chat_template="chatml")
    section = {"type": "digits_conversations", "split": "train", "count": 8}
    raw["data"] = section
    model = build(raw)
    data = DigitsConversations(split="test", count=40)
    gold, pairs, both, second = [], set(), set(), set()  # by the query's id: evaluate_chat numbers the turns in order
    for sample in data.samples:
        for i, kind in enumerate(sample["turn_kinds"]):
            if len(sample["labels"]) == 2:
                pairs.add(len(gold))
                if kind in PAIR_KINDS:
                    both.add(len(gold))
                elif sample["turn_pictures"][i] == [1]:
                    second.add(len(gold))
                    assert "the second one" in sample["conversations"][2 * i]["value"]
            gold.append(sample["conversations"][2 * i + 1]["value"])

    def answering(right: set[int]) -> Any:
        def generate(batch: Any, conversations: list[list[dict[str, str]]], **settings: Any) -> list[str]:
            return [gold[i] if i in right else "" for i in batch["ids"]]
        return generate

    monkeypatch.setattr(model, "generate", answering(set(range(len(gold)))))
    figures = evaluate_chat(model, section, count=40, batch_size=16)
    assert figures["conversations"] == 40 and figures["turns"] == len(gold)
    assert figures["turn_accuracy"] == figures["held_out_accuracy"] == figures["two_image_accuracy"] == 1.0
    assert set(figures["per_kind"]) == set(KINDS) and set(figures["per_kind"].values()) == {1.0}
    assert set(figures["breakdown"]) == {"round 1", "round 2", "round 3", "one of two pictures", "the first of two pictures",
                                         "the second of two pictures"}
    monkeypatch.setattr(model, "generate", answering(set(range(len(gold))) - pairs))  # nothing right about a pair
    figures = evaluate_chat(model, section, count=40, batch_size=16)
    assert figures["two_image_accuracy"] == figures["breakdown"]["one of two pictures"] == 0.0
    assert figures["per_kind"]["larger"] == figures["per_kind"]["sum"] == 0.0
    assert figures["turn_accuracy"] == pytest.approx(1 - len(pairs) / len(gold))
    monkeypatch.setattr(model, "generate", answering(both))  # only the questions about both pictures right
    figures = evaluate_chat(model, section, count=40, batch_size=16)
    assert figures["two_image_accuracy"] == 1.0 and figures["breakdown"]["one of two pictures"] == 0.0
    assert figures["per_kind"]["shows"] == figures["per_kind"]["even"] == figures["per_kind"]["plus_one"] == 0.0
    monkeypatch.setattr(model, "generate", answering(set(range(len(gold))) - second))  # all but the second picture's
    figures = evaluate_chat(model, section, count=40, batch_size=16)
    assert figures["breakdown"]["the first of two pictures"] == 1.0 and figures["breakdown"]["the second of two pictures"] == 0.0
    assert 0 < figures["breakdown"]["one of two pictures"] < 1
