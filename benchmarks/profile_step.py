"""Where a training step of vlm_vs_transformers' mmadapt side spends its time: data, each node's forward, backward
and the optimizer, as shares of the step (wall clock, median of steps), plus torch.profiler's top operators.

    python benchmarks/profile_step.py --family llava --size mid --steps 4
    python benchmarks/profile_step.py --family llava --size mid --steps 4 --cache
"""
from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine  # noqa: E402
from vlm_vs_transformers import SIZES, recipe  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", choices=["blip2", "llava"], default="llava")
    parser.add_argument("--size", choices=list(SIZES), default="mid")
    parser.add_argument("--batch", type=int)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--cache", action="store_true", help="read the frozen tower's features from the feature cache")
    args = parser.parse_args()
    logging.disable(logging.WARNING)

    from mmadapt.core.validate import check_recipe
    from mmadapt.data.collate import batch_to_device
    from mmadapt.training.trainer import Trainer, micro_batches

    out = Path(tempfile.mkdtemp())
    trainer = Trainer(*check_recipe(recipe(args.family, SIZES[args.size], args, args.cache, out), "profile"))
    trainer.train_mode()
    acc, cfg, model = trainer.accelerator, trainer.cfg, trainer.model
    data = micro_batches(trainer.dataset, trainer.train_collator, cfg, 0, 1, 0)
    params = list(model.trainable_parameters().values())
    spans: dict[str, list[float]] = {}

    def timed(name: str, started: float) -> None:
        spans.setdefault(name, []).append(time.perf_counter() - started)

    starts: dict[str, float] = {}
    for name, node in model.nodes.items():  # each node's forward, by hooks (the frozen ones run under no_grad)
        node.register_forward_pre_hook(lambda _m, _a, n=name: starts.__setitem__(n, time.perf_counter()))
        node.register_forward_hook(lambda _m, _a, _o, n=name: timed(f"forward: {n}", starts[n]))

    def step() -> None:
        began = time.perf_counter()
        _, batch = trainer._next_usable(data)
        timed("data (fetch, collate)", began)
        began = time.perf_counter()
        loss = trainer.wrapped(batch_to_device(batch, acc.device))["loss"]
        timed("forward (all)", began)
        began = time.perf_counter()
        acc.backward(loss)
        timed("backward", began)
        began = time.perf_counter()
        acc.clip_grad_norm_(params, cfg.max_grad_norm)
        trainer.optimizer.step()
        trainer.scheduler.step()
        trainer.optimizer.zero_grad(set_to_none=True)
        timed("clip, optimizer, schedule", began)

    step()  # warm-up
    spans.clear()
    walls = []
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
        for _ in range(args.steps):
            began = time.perf_counter()
            step()
            walls.append(time.perf_counter() - began)
    wall = statistics.median(walls)
    print(f"{args.family} {args.size}, cache {'on' if args.cache else 'off'}: {wall:.3f} s per step (median of {args.steps}); {machine()}")
    print("| part | s per step | share of the step |\n|---|---|---|")
    for name, values in spans.items():
        print(f"| {name} | {statistics.median(values):.3f} | {statistics.median(values) / wall:.1%} |")
    print(profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


if __name__ == "__main__":
    main()
