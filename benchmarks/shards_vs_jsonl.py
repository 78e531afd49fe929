"""Training from webdataset tar shards (read by `type: hf_dataset`) against a caption JSONL of picture files, on 20,000
digits, the mini Q-Former recipe with the feature cache off (every step reads and decodes its pictures).

    python benchmarks/shards_vs_jsonl.py --samples 20000 --steps 60

Variants: the JSONL with no DataLoader workers (the default), the shards with none, the shards with 2 workers. Each
runs its steps after a warm-up, one variant after another (workers would prefetch during another variant's steps if
they were interleaved), in two rounds with the order reversed; the figure is each variant's median seconds per sample
over both rounds, and its ratio to the JSONL's. Writing the files and shards, and datasets' one-off conversion of the
shards to arrow, are timed apart.
"""
from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def write_digits(root: Path, count: int) -> Path:
    """`count` captioned digit pictures (scikit-learn's 1,797 cycled, each shifted by its cycle so files differ) as PNG
    files and a JSONL naming them."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    from mmadapt.data.digits import WORDS

    digits = load_digits()
    (root / "files").mkdir(parents=True)
    rows = []
    for index in range(count):
        source = index % len(digits.images)
        pixels = np.roll(digits.images[source], index // len(digits.images), axis=1)  # (8, 8) in 0..16
        name = f"{index:06d}.png"
        Image.fromarray((pixels * 15).astype("uint8")).convert("RGB").save(root / "files" / name)
        rows.append({"image": name, "text": f"a handwritten {WORDS[int(digits.target[source])]}"})
    (root / "files" / "data.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    return root / "files" / "data.jsonl"


def stepper(data: dict[str, Any], workers: int, out: Path) -> Any:
    from mmadapt.core.spec import apply_overrides, load_yaml
    from mmadapt.core.validate import check_recipe
    from mmadapt.training.trainer import Trainer, micro_batches
    from mmadapt.data.collate import batch_to_device

    raw = apply_overrides(load_yaml(REPO / "recipes/mini/qformer.yaml"), [f"train.output_dir={out}", "train.cache_frozen_features=false",
                                                                          f"train.num_workers={workers}"])
    raw["data"] = data
    raw.pop("val_data", None)
    trainer = Trainer(*check_recipe(raw, "benchmark"))
    trainer.train_mode()
    acc, cfg = trainer.accelerator, trainer.cfg
    batches = micro_batches(trainer.dataset, trainer.train_collator, cfg, 0, 1, 0)
    params = list(trainer.model.trainable_parameters().values())

    def step() -> int:
        _, batch = trainer._next_usable(batches)
        loss = trainer.wrapped(batch_to_device(batch, acc.device))["loss"]
        acc.backward(loss)
        acc.clip_grad_norm_(params, cfg.max_grad_norm)
        trainer.optimizer.step()
        trainer.scheduler.step()
        trainer.optimizer.zero_grad(set_to_none=True)
        loss.item()
        return int(batch["size"])

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=20_000)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=5)
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    from mmadapt.data.shards import write_shards

    root = Path(tempfile.mkdtemp())
    began = time.perf_counter()
    jsonl = write_digits(root, args.samples)
    files_s = time.perf_counter() - began
    began = time.perf_counter()
    report = write_shards(jsonl, root / "shards", per_shard=1000)
    shards_s = time.perf_counter() - began
    shards = {"type": "hf_dataset", "path": str(root / "shards"), "column": "png", "text_column": "txt"}
    variants = {"jsonl, 0 workers": ({"type": "image_captions", "path": str(jsonl)}, 0),
                "shards, 0 workers": (shards, 0), "shards, 2 workers": (shards, 2)}
    began = time.perf_counter()
    from mmadapt.data.collate import build_dataset

    build_dataset(shards)  # datasets' conversion to arrow, once (later loads reuse it)
    convert_s = time.perf_counter() - began
    per_sample: dict[str, list[float]] = {name: [] for name in variants}
    for round_ in range(2):
        for name in list(variants)[:: 1 if round_ == 0 else -1]:
            data, workers = variants[name]
            step = stepper(data, workers, root / "run" / name.replace(" ", ""))
            for _ in range(args.warmup):
                step()
            for _ in range(args.steps):
                began = time.perf_counter()
                size = step()
                per_sample[name].append((time.perf_counter() - began) / size)
    base = statistics.median(per_sample["jsonl, 0 workers"])
    print(f"{args.samples} digits; {report.samples} samples in {len(report.shards)} shards; writing files {files_s:.1f} s, "
          f"shards {shards_s:.1f} s, datasets' arrow conversion {convert_s:.1f} s; {machine()}")
    print("| variant | ms per sample (median of 2 x {0} steps) | ratio to the JSONL's time |\n|---|---|---|".format(args.steps))
    for name, values in per_sample.items():
        median = statistics.median(values)
        print(f"| {name} | {median * 1000:.3f} | {median / base:.3f} |")


if __name__ == "__main__":
    main()
