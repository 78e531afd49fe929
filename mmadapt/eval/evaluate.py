"""`mmadapt eval`: caption accuracy, zero-shot QA, CIDEr and examples of a labelled-digits card (image, audio or 3D) on the test split."""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from mmadapt.data.captions import format_sample
from mmadapt.core.registry import sub_sections
from mmadapt.serve.inference import generate_for_samples
from mmadapt.data.digits import CAPTION_FORMATS, QUESTIONS, WORDS, DigitsCaptions, answer_word, question_prompt
from mmadapt.errors import MMAdaptError
from mmadapt.core.model import AssembledModel

# Asked zero-shot: the bridge only ever trained on captions. An answer is read by digits.answer_word.
ZERO_SHOT = {q: QUESTIONS[q] for q in ("Is it even?", "What is it plus one?")}
DIGIT_PATTERN = re.compile(r"\b(" + "|".join(WORDS) + r"|[0-9])\b")


def named_digit(text: str) -> int | None:
    """The one digit a caption names (as a word or numeral), or None if it names none or several."""
    found = {int(m) if m.isdigit() else WORDS.index(m) for m in DIGIT_PATTERN.findall(text.lower())}
    return found.pop() if len(found) == 1 else None


def cider(references: dict[int, list[str]], generated: dict[int, str]) -> float:
    """CIDEr-D from pycocoevalcap, with its input contract checked here so a bad input gets a message."""
    from pycocoevalcap.cider.cider import Cider

    if set(references) != set(generated) or not generated:
        raise MMAdaptError("CIDEr needs one generated caption for every sample with references")
    clean = lambda t: " ".join(re.sub(r"[^a-z0-9 ]", " ", t.lower()).split()) or "empty"  # noqa: E731
    score, _ = Cider().compute_score({k: [clean(r) for r in v] for k, v in references.items()}, {k: [clean(v)] for k, v in generated.items()})
    return float(score)


def is_labelled(data: dict[str, Any]) -> bool:
    """Whether a recipe's `data:` section is a dataset of digits with labels (images, recordings, point clouds)."""
    from mmadapt.core.registry import DATA_TYPES, UnknownType, resolve

    parts = sub_sections(data)
    if parts is not None:
        return any(is_labelled(part) for part in parts)
    try:
        return bool(getattr(resolve(str(data.get("type", "")), DATA_TYPES), "digit_labels", False))
    except UnknownType:
        return False


def labelled_parts(data: dict[str, Any]) -> list[dict[str, Any]]:
    """The data sections eval measures one by one: each labelled part of a mixture, or the section itself."""
    parts = sub_sections(data)
    return [part for part in (parts if parts is not None else [data]) if is_labelled(part)]


def labelled_split(model: AssembledModel, split: str = "test", limit: int | None = None, data: dict[str, Any] | None = None,
                   **changes: Any) -> Dataset:
    """The card's own dataset type and settings (or one part of its mixture), on another split with one fixed caption per sample."""
    from mmadapt.data.collate import build_dataset

    data = data or model.recipe.data
    if sub_sections(data) is not None or not is_labelled(data):
        raise MMAdaptError(f"eval measures cards trained on labelled digits data (e.g. digits_captions); this section is {data.get('type')}")
    return build_dataset({**data, "split": split, "style": "fixed", "limit": limit, **changes})


def accuracy_by_group(dataset: Dataset, hits: list[bool]) -> dict[str, float]:
    """Accuracy per group (e.g. per speaker) for datasets that define `group(position)`; empty otherwise."""
    if not hasattr(dataset, "group"):
        return {}
    totals: dict[str, list[int]] = {}
    for position, hit in enumerate(hits):
        totals.setdefault(dataset.group(position), []).append(int(hit))
    return {group: sum(v) / len(v) for group, v in sorted(totals.items())}


@torch.no_grad()
def evaluate_digits(model: AssembledModel, split: str = "test", limit: int | None = None, batch_size: int = 100,
                    max_new_tokens: int = 8, data: dict[str, Any] | None = None) -> dict[str, Any]:
    """Every figure of the README table for one card, on its data (or on `data`, one part of its mixture)."""
    model.eval()
    data = data or model.recipe.data  # captions are asked for the way the bridge was trained: its template and prompt
    dataset = labelled_split(model, split, limit, data)
    labels = [dataset.label(i) for i in range(len(dataset))]
    caption_prompt = format_sample(data.get("template", "caption"), "", data.get("prompt", ""))[0]
    captions: list[str] = []
    answers: dict[str, list[str]] = {q: [] for q in ZERO_SHOT}
    for offset in range(0, len(dataset), batch_size):
        samples = [dataset[i] for i in range(offset, min(offset + batch_size, len(dataset)))]
        captions += generate_for_samples(model, samples, caption_prompt, max_new_tokens=max_new_tokens)
        for question in ZERO_SHOT:
            answers[question] += generate_for_samples(model, samples, question_prompt(question), max_new_tokens=12)
    generator = model.generator
    pipeline = {q: [] for q in ZERO_SHOT}
    for question in ZERO_SHOT:  # the contrast: feed the generated caption back as text
        prompts = [f"{c.rstrip('.')}. {question_prompt(question)}" for c in captions]
        for offset in range(0, len(prompts), batch_size):
            pipeline[question] += generator.generate(prompts[offset: offset + batch_size], max_new_tokens=12)
    references = {i: [f.format(word=WORDS[d], number=d) for f in CAPTION_FORMATS] for i, d in enumerate(labels)}
    accuracy = lambda got, want: sum(a == b for a, b in zip(got, want)) / len(want)  # noqa: E731
    return {
        "samples": len(dataset),
        "caption_accuracy": accuracy([named_digit(c) for c in captions], labels),
        "caption_accuracy_by_group": accuracy_by_group(dataset, [named_digit(c) == d for c, d in zip(captions, labels)]),
        "zero_shot": {q: accuracy([answer_word(a) for a in answers[q]], [f(d) for d in labels]) for q, f in ZERO_SHOT.items()},
        "caption_then_answer": {q: accuracy([answer_word(a) for a in pipeline[q]], [f(d) for d in labels]) for q, f in ZERO_SHOT.items()},
        "cider": cider(references, dict(enumerate(captions))),
        "examples": [{"label": d, "caption": c, **{q: answers[q][i] for q in ZERO_SHOT}} for i, (d, c) in enumerate(zip(labels[:6], captions[:6]))],
        "captions": captions,
    }


def caption_grid(captions: list[str], path: Path, count: int = 16, split: str = "test") -> None:
    """A grid of test digits with their generated captions."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dataset = DigitsCaptions(split=split, style="fixed")
    columns = 4
    rows = (count + columns - 1) // columns
    fig, axes = plt.subplots(rows, columns, figsize=(columns * 2.4, rows * 2.6))
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < min(count, len(captions)):
            ax.imshow(dataset[i]["image"], interpolation="nearest")
            ax.set_title(captions[i], fontsize=8, wrap=True, color="green" if named_digit(captions[i]) == dataset.label(i) else "red")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


@torch.no_grad()
def evaluate_image_token(model: AssembledModel, split: str = "test", limit: int | None = 200, batch_size: int = 50,
                         seed: int = 0) -> dict[str, Any]:
    """For a digits -> diffusion card: how often the referee reads the input digit in the generated picture."""
    from mmadapt.eval.referee import read_digits

    model.eval()
    text = str(model.recipe.data.get("text", "<*>"))
    dataset = labelled_split(model, split, limit, text=text)
    labels = [dataset.label(i) for i in range(len(dataset))]
    read: list[int] = []
    for offset in range(0, len(dataset), batch_size):
        samples = [dataset[i] for i in range(offset, min(offset + batch_size, len(dataset)))]
        read += read_digits(generate_for_samples(model, samples, text, seed=seed + offset))
    per_digit = {WORDS[d]: sum(r == d for r, lab in zip(read, labels) if lab == d) / max(1, labels.count(d)) for d in range(10)}
    return {"samples": len(dataset), "referee_accuracy": sum(r == d for r, d in zip(read, labels)) / len(labels), "per_digit": per_digit,
            "referee_accuracy_by_group": accuracy_by_group(dataset, [r == d for r, d in zip(read, labels)])}


# --- `mmadapt eval` and the figures after `mmadapt train`: the generator's evaluation hook, or the validation loss ---
def report_card(model: AssembledModel, card: str | Path, grid: str | None = None, limit: int | None = None) -> dict[str, Any]:
    """Measure a card, print its figures and keep them beside it (eval.json): on labelled digits data, what its
    generator's `evaluation` hook reports (caption accuracy, zero-shot QA, the referee); otherwise the loss on its
    validation data (or its training data) and a few generations."""
    from mmadapt.core.registry import import_dotted

    from mmadapt.eval.chat import chat_section

    hook = model.generator.evaluation
    if hook and (is_labelled(model.recipe.data) or chat_section(model.recipe.data) is not None):
        return import_dotted(hook)(model, Path(card), grid, limit)
    return report_loss(model, Path(card), grid, limit)


def report_text(model: AssembledModel, card: Path, grid: str | None, limit: int | None) -> dict[str, Any]:
    """A text generator's figures on the test split, per part for a mixture (each modality on its own test split); a
    card trained on digits conversations gets the chat figures."""
    from mmadapt.eval.chat import CAPTIONS, EVAL_COUNT, chat_section, report_chat

    if chat_section(model.recipe.data) is not None:  # and stage 1's captions, asked of the stage-2 card
        return report_chat(model, card, limit, evaluate_digits(model, limit=limit or EVAL_COUNT, data=CAPTIONS))
    parts = labelled_parts(model.recipe.data)
    if len(parts) > 1:
        measured = []
        for index, part in enumerate(parts):
            print(f"== part {index}: {part.get('type')}")
            figures = evaluate_digits(model, limit=limit, data=part)
            figures.pop("captions")
            print_text_figures(figures)
            measured.append({"data": part, **figures})
        if limit is None:
            (card / "eval.json").write_text(json.dumps({"parts": measured}, indent=2))
        return {"parts": measured}
    figures = evaluate_digits(model, limit=limit)
    captions = figures.pop("captions")
    print_text_figures(figures)
    if limit is None:
        (card / "eval.json").write_text(json.dumps(figures, indent=2))
    if grid and model.recipe.data.get("type") == "digits_captions":
        caption_grid(captions, Path(grid))
        print(f"grid: {grid}")
    return figures


def print_text_figures(figures: dict[str, Any]) -> None:
    print(f"test samples: {figures['samples']}")
    print(f"caption accuracy: {figures['caption_accuracy']:.3f}")
    if figures["caption_accuracy_by_group"]:
        print(f"caption accuracy per group: {figures['caption_accuracy_by_group']}")
    for question, value in figures["zero_shot"].items():
        print(f"zero-shot '{question}': {value:.3f} (caption-then-answer pipeline: {figures['caption_then_answer'][question]:.3f})")
    print(f"CIDEr: {figures['cider']:.3f}")
    for example in figures["examples"]:
        print(f"  e.g. {example}")


def report_images(model: AssembledModel, card: Path, grid: str | None, limit: int | None) -> dict[str, Any]:
    """An image generator's figure: how often the referee reads the input digit in the picture drawn from it."""
    figures = evaluate_image_token(model, limit=limit or 200)
    print(f"test samples: {figures['samples']}")
    print(f"referee reads the input digit in the generated picture: {figures['referee_accuracy']:.3f}")
    print(f"per digit: {figures['per_digit']}")
    if figures["referee_accuracy_by_group"]:
        print(f"per group: {figures['referee_accuracy_by_group']}")
    (card / "eval.json").write_text(json.dumps(figures, indent=2))
    return figures


@torch.no_grad()
def report_loss(model: AssembledModel, card: Path, grid: str | None = None, limit: int | None = None,
                batch_size: int = 16) -> dict[str, Any]:
    """Any card: the mean loss over its validation data (its training data when it has none, at most `limit` or 200
    samples), and a few generations as its generator logs them."""
    from torch.utils.data import DataLoader, Subset

    from mmadapt.data.collate import batch_to_device, build_dataset, collator_for

    section = model.recipe.val_data or model.recipe.data
    dataset = build_dataset(section)
    dataset = Subset(dataset, range(min(len(dataset), limit or 200)))
    collate = collator_for(model, model.recipe.train.max_text_tokens)
    device = next(model.parameters()).device
    model.eval()
    total, counted, examples, skipped = 0.0, 0, [], 0
    for batch in DataLoader(dataset, batch_size=batch_size, collate_fn=collate):
        skipped += len(batch["bad"])
        if not batch["size"]:
            continue
        batch = batch_to_device(batch, device)
        total += model(batch)["loss"].item() * batch["size"]
        counted += batch["size"]
        if len(examples) < 3:
            examples += model.generator.examples(model, batch, 3 - len(examples), card / "eval-samples", 0)
    if not counted:
        raise MMAdaptError(f"{card}: no readable sample in its {'val_data' if model.recipe.val_data else 'data'} to measure the loss on")
    figures = {"data": section.get("type"), "samples": counted, "skipped": skipped, "loss": total / counted, "examples": examples}
    print(f"{'val_data' if model.recipe.val_data else 'data'} ({section.get('type')}): {counted} samples, loss {figures['loss']:.4f}")
    for example in examples:
        print(f"  e.g. {example}")
    if limit is None:
        (card / "eval.json").write_text(json.dumps(figures, indent=2))
    return figures
