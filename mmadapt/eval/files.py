"""`mmadapt eval CARD --data FILE`: a card measured on any user's file of captions (CIDEr, BLEU-4) or of conversations
(exact-match and contains accuracy of the last assistant turn), with every sample's output in a JSON report."""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch

from mmadapt.core.model import AssembledModel
from mmadapt.data.collate import batch_to_device, collator_for
from mmadapt.errors import DataError


def is_conversation_file(path: Path) -> bool:
    """Whether the file's first sample is a LLaVA-format conversation (else: a caption file)."""
    text = path.read_text(errors="replace").lstrip()
    try:
        first = json.loads(text)[0] if text.startswith("[") else json.loads(text.splitlines()[0])
    except (json.JSONDecodeError, IndexError, KeyError) as exc:
        raise DataError(f"{path}: not a JSON list or JSONL of samples ({type(exc).__name__})") from None
    return isinstance(first, dict) and "conversations" in first


def normalized(text: str) -> str:
    return " ".join(re.sub(r"[^a-z0-9 ]", " ", text.lower()).split())


@torch.no_grad()
def evaluate_conversations(model: AssembledModel, path: Path, limit: int | None, batch_size: int,
                           max_new_tokens: int) -> dict[str, Any]:
    """Each sample's last assistant turn, answered after the conversation before it (gold earlier turns)."""
    from mmadapt.data.conversations import Conversations
    from mmadapt.eval.chat import turn_queries

    dataset = Conversations(str(path), limit=limit)
    samples = [dataset[i] for i in range(len(dataset))]
    bad = [s["problem"] for s in samples if "problem" in s]
    queries, expected = [], []
    for sample in (s for s in samples if "problem" not in s):
        query, turn = turn_queries(sample, len(queries))[-1]  # the last assistant turn, after the gold turns before it
        queries.append({**query, "sample_id": sample["sample_id"]})
        expected.append([t for t in sample["conversations"] if t["from"] == "gpt"][turn]["value"])
    collate = collator_for(model, max_tokens=model.recipe.train.max_text_tokens, skip_bad_samples=False)
    device = next(model.parameters()).device
    answers: list[str] = []
    for offset in range(0, len(queries), batch_size):
        chunk = queries[offset: offset + batch_size]
        batch = batch_to_device(collate(chunk), device)
        answers += model.generate(batch, [q["conversations"] for q in chunk], max_new_tokens=max_new_tokens)
    exact = [normalized(a) == normalized(e) for a, e in zip(answers, expected)]
    contains = [normalized(e) in normalized(a) for a, e in zip(answers, expected)]
    count = max(1, len(answers))
    return {"kind": "conversations", "samples": len(answers), "bad_samples": bad,
            "exact_match": sum(exact) / count, "contains": sum(contains) / count,
            "outputs": [{"sample_id": q["sample_id"], "expected": e, "generated": a, "exact": x, "contains": c}
                        for q, e, a, x, c in zip(queries, expected, answers, exact, contains)]}


@torch.no_grad()
def evaluate_captions(model: AssembledModel, path: Path, limit: int | None, batch_size: int,
                      max_new_tokens: int) -> dict[str, Any]:
    """A caption for every row, asked the way the card was trained (its data's template and prompt)."""
    from pycocoevalcap.bleu.bleu import Bleu

    from mmadapt.data.captions import ImageCaptionDataset
    from mmadapt.eval.evaluate import cider
    from mmadapt.serve.inference import generate_for_samples

    data = model.recipe.data
    template = data.get("template", "caption") if isinstance(data, dict) else "caption"
    dataset = ImageCaptionDataset(str(path), template=template, prompt=data.get("prompt", "") if isinstance(data, dict) else "")
    rows = [dataset[i] for i in range(min(len(dataset), limit or len(dataset)))]
    captions: list[str] = [""] * len(rows)
    for prompt in dict.fromkeys(row["prompt"] for row in rows):  # the dataset formatted each row's prompt already
        indices = [i for i, row in enumerate(rows) if row["prompt"] == prompt]
        for offset in range(0, len(indices), batch_size):
            chunk = indices[offset: offset + batch_size]
            for i, caption in zip(chunk, generate_for_samples(model, [rows[i] for i in chunk], prompt, max_new_tokens=max_new_tokens)):
                captions[i] = caption
    references = {i: [row["text"]] for i, row in enumerate(rows)}
    generated = dict(enumerate(captions))
    bleu, _ = Bleu(4).compute_score({k: [normalized(r) or "empty" for r in v] for k, v in references.items()},
                                    {k: [normalized(v) or "empty"] for k, v in generated.items()}, verbose=0)
    return {"kind": "captions", "samples": len(rows), "cider": cider(references, generated), "bleu4": float(bleu[3]),
            "outputs": [{"image": row["image"], "prompt": row["prompt"], "reference": row["text"], "generated": c}
                        for row, c in zip(rows, captions)]}


def report_file(model: AssembledModel, path: str | Path, report: str | Path | None, limit: int | None = None,
                batch_size: int = 16) -> dict[str, Any]:
    """Measure the card on the file, print the figures and write the JSON report (default: beside the file)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"--data: {path}: no such file")
    max_new = model.recipe.train.max_new_tokens
    if is_conversation_file(path):
        figures = evaluate_conversations(model, path, limit, batch_size, max_new)
        print(f"samples: {figures['samples']} ({len(figures['bad_samples'])} bad, skipped)")
        print(f"exact match: {figures['exact_match']:.3f}")
        print(f"contains: {figures['contains']:.3f}")
    else:
        figures = evaluate_captions(model, path, limit, batch_size, max_new)
        print(f"samples: {figures['samples']}")
        print(f"CIDEr: {figures['cider']:.3f}")
        print(f"BLEU-4: {figures['bleu4']:.3f}")
    target = Path(report) if report else path.with_name(f"{path.stem}.eval.json")
    target.write_text(json.dumps({"data": str(path), **figures}, indent=2, default=str))
    print(f"report: {target}")
    return figures
