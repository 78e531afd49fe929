"""Packing on against off: a LLaVA-style graph with the mid-size 125M Llama, on conversations whose lengths spread about 1-8x.

    python benchmarks/packing.py --steps 8

The data: LLaVA-format conversations about scikit-learn's digits, one picture each and 1 to 10 question/answer turns
(sample i has 1 + i % 10, so that the token lengths spread about 1-8x), written as a JSON file with PNG pictures and
read by `type: conversations` through the Mistral template (which adds no system turn, so the lengths keep the turns'
spread). The graph: a 16-patch ViT at the mini zoo's size (the LM dominates here, as it does once a tower's features
are cached), a 2-layer MLP projector, and the mid Llama of vlm_vs_transformers (12 x 768, vocabulary 32k),
frozen; fp32, SDPA. Both sides are one recipe, `packing: true` on one; they live in one process and take one step each in
turn (order reversed every step), and the figure is the median of the paired steps' time ratios.
"""
from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine  # noqa: E402
from vlm_vs_transformers import SIZES, TOKENIZER, mmadapt_stepper  # noqa: E402

QUESTIONS = ["What digit is shown here?", "Which number does the picture show?", "Is the digit even or odd?",
             "What is the digit plus one?", "Describe the picture in a few words.", "How would you write the digit as a word?",
             "Is it larger than four?", "What is twice the digit?", "What is the digit minus one?", "Is it a prime number?"]


def answers(label: int) -> list[str]:
    from mmadapt.data.digits import WORDS

    return [f"It shows a {WORDS[label]}.", f"The picture shows the number {label}.", "It is even." if label % 2 == 0 else "It is odd.",
            f"The digit plus one is {label + 1}.", f"A handwritten {WORDS[label]} in white on black.", f"As a word it is {WORDS[label]}.",
            "Yes, it is." if label > 4 else "No, it is not.", f"Twice the digit is {2 * label}.",
            f"The digit minus one is {label - 1}.", "Yes, it is prime." if label in (2, 3, 5, 7) else "No, it is not prime."]


def write_conversations(root: Path, count: int) -> Path:
    """`count` samples, sample i with 1 + i % 10 turns about digit i, as a LLaVA JSON list beside its PNG pictures."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    rows = []
    for index in range(count):
        Image.fromarray((digits.images[index] * 15).astype("uint8")).convert("RGB").save(root / f"{index}.png")
        label, turns = int(digits.target[index]), []
        for turn in range(1 + index % len(QUESTIONS)):
            question = QUESTIONS[turn]
            turns += [{"from": "human", "value": ("<image>\n" if turn == 0 else "") + question},
                      {"from": "gpt", "value": answers(label)[turn]}]
        rows.append({"id": str(index), "image": f"{index}.png", "conversations": turns})
    path = root / "conversations.json"
    path.write_text(json.dumps(rows))
    return path


def recipe(data: Path, batch: int, packing: bool, out: Path) -> dict[str, Any]:
    size = SIZES["mid"]
    vision = {"type": "hf_vision", "config": {"model_type": "clip_vision_model", **SIZES["mini"]["vision"]}, "layer": -2, "keep_cls": False}
    lm = {"type": "causal_lm", "config": {"model_type": "llama", **size["llama"]}, "tokenizer": TOKENIZER, "prefix_after_bos": True,
          "markers": {"bridge": "<image>"}, "chat_template": "mistral", "packing": packing, "inputs": {"prefix_embeds": "bridge"}}
    return {"name": "bench-packing", "graph": {"vision": vision, "bridge": {"type": "mlp_projector", "inputs": {"x": "vision"}, "num_layers": 2},
                                                "llm": lm},
            "data": {"type": "conversations", "path": str(data)},
            "train": {"lr": 1e-4, "batch_size": batch, "steps": 10_000, "max_text_tokens": 512, "cache_frozen_features": False,
                      "output_dir": str(out), "log_every": 10_000}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=8, help="timed steps per side, after warm-up")
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    root = Path(tempfile.mkdtemp())
    data = write_conversations(root, args.samples)
    steppers, trainers = {}, {}
    for name, packing in (("packing off", False), ("packing on", True)):
        steppers[name], trainers[name] = mmadapt_stepper(recipe(data, args.batch, packing, root / name.replace(" ", "")))
    generator = trainers["packing off"].model.generator
    vision = SIZES["mini"]["vision"]
    pictured = (vision["image_size"] // vision["patch_size"]) ** 2  # the picture's tokens, beside the text's
    lengths = [len(generator.prepare(trainers["packing off"].dataset[i], 512)[0]) + pictured for i in range(args.samples)]
    names = list(steppers)
    times: dict[str, list[float]] = {name: [] for name in names}
    for index in range(args.warmup + args.steps):
        for name in names if index % 2 == 0 else names[::-1]:
            times[name].append(steppers[name]())
    timed = {name: values[args.warmup:] for name, values in times.items()}
    ratios = [off / on for off, on in zip(timed["packing off"], timed["packing on"])]
    print(f"{args.samples} conversations, {min(lengths)}-{max(lengths)} tokens (mean {statistics.mean(lengths):.0f}, "
          f"spread {max(lengths) / min(lengths):.1f}x); batch {args.batch}; {machine()}")
    print(f"| side | s per step (median of {args.steps}) | samples/s | speed-up (median of paired steps) | paired range |\n|---|---|---|---|---|")
    for name in names:
        seconds = statistics.median(timed[name])
        speed = "1" if name == "packing off" else f"**{statistics.median(ratios):.2f}**"
        spread = "" if name == "packing off" else f"{min(ratios):.2f}-{max(ratios):.2f}"
        print(f"| {name} | {seconds:.2f} | {args.batch / seconds:.2f} | {speed} | {spread} |")


if __name__ == "__main__":
    main()
