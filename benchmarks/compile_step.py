"""`train.compile` on against off: vlm_vs_transformers' BLIP-2- or LLaVA-style graph, both sides mmadapt's Trainer.

    python benchmarks/compile_step.py --family llava --size mid --steps 6

Both sides are one recipe with the frozen tower's features cached (so a step is the bridge and the frozen LM, the
parts compile touches), `train.compile: true` on one. Each takes its warm-up steps alone first (the compiled side's
include the compilation, and the recompilation with dynamic shapes once the text length changes; both are timed and
reported), then they take one step each in turn in one process, order reversed every step; the figure is the median of
the paired steps' time ratios.
"""
from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine  # noqa: E402
from vlm_vs_transformers import SIZES, mmadapt_stepper, recipe  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", choices=["blip2", "llava"], default="llava")
    parser.add_argument("--size", choices=list(SIZES), default="mid")
    parser.add_argument("--batch", type=int, help="samples per step (default: 32 mini, 4 mid)")
    parser.add_argument("--steps", type=int, default=6, help="timed paired steps, after warm-up")
    parser.add_argument("--warmup", type=int, default=4, help="steps each side takes alone first (compilation included)")
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    out = Path(tempfile.mkdtemp())
    size = SIZES[args.size]
    steppers, warmup = {}, {}
    for name, compiled in (("eager", False), ("compiled", True)):
        raw = recipe(args.family, size, args, True, out / name)
        raw["train"]["compile"] = compiled
        steppers[name] = mmadapt_stepper(raw)[0]
        began = time.perf_counter()
        warmup[name] = [steppers[name]() for _ in range(args.warmup)]
        warmup[name].append(time.perf_counter() - began)
    times: dict[str, list[float]] = {name: [] for name in steppers}
    for index in range(args.steps):
        for name in list(steppers) if index % 2 == 0 else list(steppers)[::-1]:
            times[name].append(steppers[name]())
    ratios = [eager / compiled for eager, compiled in zip(times["eager"], times["compiled"])]
    batch = args.batch or size["batch"]
    print(f"{args.family} {args.size}, batch {batch}, feature cache on; {machine()}")
    print(f"| side | warm-up: {args.warmup} steps, s (each step) | s per step (median of {args.steps}) | samples/s | "
          f"speed-up (median of paired steps) | paired range |\n|---|---|---|---|---|---|")
    for name in steppers:
        seconds = statistics.median(times[name])
        each = ", ".join(f"{s:.1f}" for s in warmup[name][:-1])
        speed = "1" if name == "eager" else f"**{statistics.median(ratios):.3f}**"
        spread = "" if name == "eager" else f"{min(ratios):.2f}-{max(ratios):.2f}"
        print(f"| {name} | {warmup[name][-1]:.1f} ({each}) | {seconds:.2f} | {batch / seconds:.2f} | {speed} | {spread} |")


if __name__ == "__main__":
    main()
