"""`mmadapt eval` of a card trained on digits conversations: each assistant turn answered after the gold history, per
question kind, on held-out phrasings and on two-image questions; and the stage-1 caption accuracy after stage 2."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from mmadapt.core.model import AssembledModel
from mmadapt.core.registry import DATA_TYPES, UnknownType, resolve, sub_sections
from mmadapt.data.collate import build_dataset
from mmadapt.serve.inference import generate_after

EVAL_COUNT = 300  # test conversations asked by default (each has 2-3 turns)
# Turns are generated up to 32 new tokens: an answer in words outside digits-lm's vocabulary is spelled in pieces and
# runs to ~30 ("the number six, written by hand" is 11).
PICTURE_GROUPS = ("the first of two pictures", "the second of two pictures")  # a single-picture question about a pair, by picture
CAPTIONS = {"type": "digits_captions", "template": "instruction", "prompt": "What does it show?"}  # stage 1's data


def chat_section(data: dict[str, Any]) -> dict[str, Any] | None:
    """The recipe's conversation data that can judge its own answers (digits_conversations), or None."""
    for part in sub_sections(data) or [data]:
        try:
            if getattr(resolve(str(part.get("type", "")), DATA_TYPES), "judge", None) is not None:
                return part
        except UnknownType:
            continue
    return None


def turn_queries(sample: dict[str, Any], start_id: int) -> list[tuple[dict[str, Any], int]]:
    """One generation query per assistant turn: the conversation up to its question (gold answers before it), with the
    images whose markers that history holds; and the turn's index."""
    queries, turn = [], 0
    for end, message in enumerate(sample["conversations"]):
        if message["from"] != "gpt":
            continue
        history = sample["conversations"][:end]
        query = {"conversations": history, "prompt": "", "target": "", "text": "", "key": f"{sample['key']}:{turn}",
                 "id": start_id + len(queries)}
        if "image" in sample:
            images = sample["image"] if isinstance(sample["image"], list) else [sample["image"]]
            held = sum(m["value"].count("<image>") for m in history)
            query["image"] = images[:held] if len(images) > 1 else images[0]
        else:  # a text-only conversation
            query["fields_absent"] = sample.get("fields_absent", ["image"])
        queries.append((query, turn))
        turn += 1
    return queries


@torch.no_grad()
def evaluate_chat(model: AssembledModel, section: dict[str, Any], split: str = "test", count: int = EVAL_COUNT,
                  batch_size: int = 50, max_new_tokens: int = 32) -> dict[str, Any]:
    """Turn accuracy overall, per kind, on held-out phrasings and on two-image questions, with a few examples."""
    model.eval()
    dataset = build_dataset({**section, "split": split, "count": count, "limit": None})
    judge = dataset.judge
    asked: list[tuple[dict[str, Any], dict[str, Any], int]] = []  # (query, sample, turn)
    for index in range(len(dataset)):
        sample = dataset[index]
        asked += [(query, sample, turn) for query, turn in turn_queries(sample, len(asked))]
    answers: list[str] = []
    for offset in range(0, len(asked), batch_size):
        queries = [q for q, _, _ in asked[offset: offset + batch_size]]
        answers += generate_after(model, queries, [q["conversations"] for q in queries], max_new_tokens=max_new_tokens)
    hits: dict[str, list[bool]] = {}
    examples = []
    for (query, sample, turn), answer in zip(asked, answers):
        kind = sample["turn_kinds"][turn]
        right = judge(kind, answer, sample["turn_labels"][turn])
        groups = [kind, "all", f"round {turn + 1}"] + (["held_out"] if sample["held_out"][turn] else []) + \
            (["held_pair"] if sample.get("held_pair", [False] * (turn + 1))[turn] else []) + \
            (["two_image"] if kind in dataset.pair_kinds else []) + \
            (["one of two pictures", PICTURE_GROUPS[sample["turn_pictures"][turn][0]]]
             if kind not in dataset.pair_kinds and isinstance(sample.get("image"), list) else [])
        for group in groups:
            hits.setdefault(group, []).append(right)
        if len(examples) < 6:
            examples.append({"question": query["conversations"][-1]["value"], "answer": answer,
                             "expected": sample["conversations"][2 * turn + 1]["value"] if len(sample["conversations"]) > 2 * turn + 1 else "",
                             "right": right})
    rate = {group: sum(v) / len(v) for group, v in hits.items()}
    breakdown = {g: rate.pop(g) for g in sorted(rate) if g.startswith("round ") or g == "one of two pictures" or g in PICTURE_GROUPS}
    return {"conversations": len(dataset), "turns": len(asked), "turn_accuracy": rate.pop("all"),
            "held_out_accuracy": rate.pop("held_out", float("nan")), "two_image_accuracy": rate.pop("two_image", float("nan")),
            "held_out_pairs_accuracy": rate.pop("held_pair", float("nan")),
            "per_kind": rate, "breakdown": breakdown, "examples": examples}


def report_chat(model: AssembledModel, card: Path, limit: int | None, captions: dict[str, Any]) -> dict[str, Any]:
    """Print the chat figures, and `captions` (stage 1's caption figures, asked of the same card), as lines scripts can
    read; keep them in eval.json."""
    section = chat_section(model.recipe.data)
    assert section is not None
    figures = evaluate_chat(model, section, count=limit or EVAL_COUNT)
    figures["caption_accuracy"] = captions["caption_accuracy"]
    print(f"test conversations: {figures['conversations']} ({figures['turns']} assistant turns)")
    print(f"turn accuracy: {figures['turn_accuracy']:.3f}")
    for kind, value in sorted(figures["per_kind"].items()):
        print(f"turn accuracy, {kind}: {value:.3f}")
    for group, value in figures["breakdown"].items():  # by the turn's round, and single-picture questions about a pair (and which)
        print(f"turn accuracy, {group}: {value:.3f}")
    print(f"held-out phrasings accuracy: {figures['held_out_accuracy']:.3f}")
    print(f"two-image accuracy: {figures['two_image_accuracy']:.3f}")
    print(f"held-out pairs accuracy: {figures['held_out_pairs_accuracy']:.3f}")  # sums and comparisons of pairs train never showed
    print(f"caption accuracy: {figures['caption_accuracy']:.3f}")
    for example in figures["examples"]:
        print(f"  e.g. {example}")
    if limit is None:
        (card / "eval.json").write_text(json.dumps(figures, indent=2))
    return figures
