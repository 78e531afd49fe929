"""How mmadapt's cost grows with the dataset (1x, 4x, 16x, cache on) and with the number of visual tokens.

    python benchmarks/scaling.py

Each configuration trains in a fresh process (peak RSS is its own), configurations round-robin with the order
reversed every round. Dataset: recipes/mini/qformer.yaml (zoo digits-clip -> Q-Former -> zoo digits-lm) on
64, 256 and 1,024 digits, cache on (built by the run itself, timed apart). Epoch time = steps per epoch x the
median step time, so one slow step from other jobs on the machine does not decide it. Visual tokens: the
LLaVA- and BLIP-2-style mini graphs of vlm_vs_transformers.py with the ViT's image size raised from 32 px to
64 and 128 px (16, 64, 256 patch tokens); the projector passes every token to the LM, the Q-Former keeps 8.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, machine, median, run_child, table, timed_mmadapt_run  # noqa: E402

DATASET_SIZES = {"1x": 64, "4x": 256, "16x": 1024}
IMAGE_SIZES = {16: 32, 64: 64, 256: 128}  # visual tokens -> image size at patch 8


def dataset_recipe(samples: int, workdir: Path) -> dict[str, Any]:
    from mmadapt.core.spec import load_yaml

    raw = load_yaml(REPO / "recipes" / "mini" / "qformer.yaml")
    raw["data"]["limit"] = samples
    raw.pop("val_data", None)
    raw["train"].update(cache_dir=str(workdir / "cache"), output_dir=str(workdir / "run"), warmup_steps=0, log_every=10_000, steps=10_000)
    return raw


def tokens_recipe(family: str, tokens: int, workdir: Path) -> dict[str, Any]:
    import vlm_vs_transformers as vlm

    size = copy.deepcopy(vlm.SIZES["mini"])
    size["vision"]["image_size"] = IMAGE_SIZES[tokens]
    return vlm.recipe(family, size, argparse.Namespace(batch=None), True, workdir)


def child(args: argparse.Namespace) -> None:
    import logging

    logging.disable(logging.WARNING)
    workdir = Path(args.workdir)
    if args.kind == "dataset":
        raw = dataset_recipe(DATASET_SIZES[args.config], workdir)
        steps = max(args.steps, DATASET_SIZES[args.config] // raw["train"]["batch_size"])  # at least one epoch timed
    else:
        family, tokens = args.config.split(":")
        raw = tokens_recipe(family, int(tokens), workdir)
        steps = args.steps
    print(json.dumps(timed_mmadapt_run(raw, args.warmup + steps, args.warmup)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6, help="timed steps per run at least (a whole epoch for the dataset runs)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--kind", help=argparse.SUPPRESS)
    parser.add_argument("--config", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.kind:
        return child(args)
    started = machine()
    configs = [("dataset", name) for name in DATASET_SIZES] + [("tokens", f"{f}:{t}") for f in ("llava", "blip2") for t in IMAGE_SIZES]
    results: dict[tuple[str, str], list[dict[str, Any]]] = {c: [] for c in configs}
    with tempfile.TemporaryDirectory(prefix="mmadapt-scaling-") as tmp:
        for round_index in range(args.rounds):
            for kind, config in configs if round_index % 2 == 0 else configs[::-1]:
                workdir = Path(tmp) / f"{round_index}-{kind}-{config.replace(':', '-')}"  # own cache: its build is timed
                result = run_child(__file__, ["--kind", kind, "--config", config, "--workdir", str(workdir),
                                              "--steps", str(args.steps), "--warmup", str(args.warmup)])
                results[(kind, config)].append(result)
                print(f"round {round_index + 1}: {kind} {config}: {result['seconds_per_step']:.3f} s/step", file=sys.stderr, flush=True)
    rows = []
    base_per_sample = None
    for name, samples in DATASET_SIZES.items():
        runs = results[("dataset", name)]
        step = median([r["seconds_per_step"] for r in runs])
        batch = runs[0]["batch"]
        per_sample = step / batch
        base_per_sample = base_per_sample or per_sample
        rows.append([name, samples, (samples // batch) * step, per_sample * 1000, per_sample / base_per_sample,
                     median([r["cache"]["seconds"] for r in runs]), median([r["peak_rss_mb"] for r in runs])])
    print("\nDataset growth, recipes/mini/qformer.yaml, cache on, batch 32:")
    print(table(["dataset", "samples", "epoch s", "ms/sample", "ms/sample vs 1x", "cache build s", "peak RSS MB"], rows))
    rows = []
    for family in ("llava", "blip2"):
        base = None
        for tokens in IMAGE_SIZES:
            runs = results[("tokens", f"{family}:{tokens}")]
            per_sample = median([r["seconds_per_step"] for r in runs]) / runs[0]["batch"]
            base = base or per_sample
            rows.append([family, tokens, IMAGE_SIZES[tokens], per_sample * 1000, per_sample / base,
                         f"{median([r['cache']['bytes_per_sample'] for r in runs]):,.0f}", median([r["peak_rss_mb"] for r in runs])])
    print("\nVisual tokens, mini dims, cache on, batch 32:")
    print(table(["bridge", "visual tokens", "image px", "ms/sample", "vs 16 tokens", "cache bytes/sample", "peak RSS MB"], rows))
    ended = machine()
    print(f"machine: {started['cpu']}, {started['cores']} cores, torch {started['torch']}; "
          f"load average {started['load_average_1m']} at start, {ended['load_average_1m']} at end")


if __name__ == "__main__":
    main()
