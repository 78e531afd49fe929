"""Record, or compare against a record, the outputs of the deterministic mini recipes, through the CLI alone.

    python benchmarks/behaviour.py --out runs/behaviour --record benchmarks/behaviour-before.json    # before a refactor
    python benchmarks/behaviour.py --out runs/behaviour --compare benchmarks/behaviour-before.json   # after it

Float rounding differs between CPUs, so a record holds for the machine it was made on: behaviour-before.json is the
first machine's, behaviour-before-amd-epyc.json a 2-core AMD EPYC's, both recorded with the tree before the redesign
(abc2931). It runs `mmadapt` in subprocesses and reads only what a user sees (metrics.jsonl, eval.json, the diffusers export), so
it measures the same thing before and after any change inside the package. Losses must agree to 1e-6, accuracies
exactly, and the stock pipeline's image from the personalize export to 1e-6 per pixel.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
EXACT_FIGURES = ("samples", "caption_accuracy", "zero_shot", "caption_then_answer", "cider", "referee_accuracy", "per_digit")


def mmadapt(*argv: str) -> None:
    started = time.perf_counter()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    done = subprocess.run([sys.executable, "-m", "mmadapt", *argv], cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"mmadapt {' '.join(argv)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    print(f"  mmadapt {' '.join(argv)}: {time.perf_counter() - started:.0f} s", flush=True)


def losses(run: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def figures(card: Path) -> dict[str, Any]:
    measured = json.loads((card / "eval.json").read_text())
    return {k: measured[k] for k in EXACT_FIGURES if k in measured}


def stock_image(export: Path) -> list[float]:
    """digits-sd in stock diffusers, the export's LoRA and learned word loaded, one picture at a fixed seed."""
    import numpy as np
    import torch
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(ROOT / "mmadapt" / "zoo" / "digits-sd"), safety_checker=None)
    pipe.load_lora_weights(str(export))
    pipe.load_textual_inversion(str(export / "learned_embeds.safetensors"))
    image = pipe("a <sks> seven", num_inference_steps=10, guidance_scale=4.0, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images[0]
    return np.asarray(image, dtype=np.float64).ravel().tolist()


def measure(out: Path) -> dict[str, Any]:
    record: dict[str, Any] = {}
    mmadapt("train", "recipes/tiny/qformer-random.yaml", f"train.output_dir={out}/tiny")
    record["tiny_losses"] = losses(out / "tiny")
    for name in ("qformer", "prefix", "image-token"):
        mmadapt("train", f"recipes/mini/{name}.yaml", f"train.output_dir={out}/mini-{name}")
        record[f"mini_{name}"] = figures(out / f"mini-{name}" / "card")
    mmadapt("personalize", "--images", "examples/slanted-digits", "--method", "lora", "--output-dir", f"{out}/personalize",
            "train.steps=60")
    record["personalize_losses"] = losses(out / "personalize")
    record["personalize_image"] = stock_image(out / "personalize" / "card" / "diffusers")
    return record


def differences(before: Any, after: Any, where: str = "") -> list[str]:
    if isinstance(before, dict) and isinstance(after, dict):
        found = [f"{where}.{k}: only on one side" for k in set(before) ^ set(after)]
        return found + [d for k in before if k in after for d in differences(before[k], after[k], f"{where}.{k}")]
    if isinstance(before, list) and isinstance(after, list):
        if len(before) != len(after):
            return [f"{where}: {len(before)} values before, {len(after)} after"]
        if before and isinstance(before[0], float):
            worst = max(abs(a - b) for a, b in zip(before, after))
            return [] if worst <= 1e-6 else [f"{where}: max difference {worst:.3g} (allowed 1e-6)"]
        return [d for i, (a, b) in enumerate(zip(before, after)) for d in differences(a, b, f"{where}[{i}]")]
    if isinstance(before, float) and isinstance(after, float) and math.isclose(before, after, rel_tol=0, abs_tol=0):
        return []
    return [] if before == after else [f"{where}: {before!r} before, {after!r} after"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/behaviour"))
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--record", type=Path, help="write the measured values here")
    group.add_argument("--compare", type=Path, help="compare the measured values with this record")
    args = parser.parse_args()
    record = measure(args.out.resolve())
    summary = {k: v for k, v in record.items() if k != "personalize_image"}
    print(json.dumps(summary, indent=1))
    if args.record:
        args.record.write_text(json.dumps(record) + "\n")
        print(f"recorded: {args.record}")
        return
    found = differences(json.loads(args.compare.read_text()), record)
    for line in found:
        print(f"DIFFERENT {line}")
    print("same values" if not found else f"{len(found)} differences")
    sys.exit(1 if found else 0)


if __name__ == "__main__":
    main()
