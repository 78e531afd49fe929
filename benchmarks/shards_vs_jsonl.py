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
from collections.abc import Callable
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine  # noqa: E402
from vlm_vs_transformers import mmadapt_stepper  # noqa: E402

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


def stepper(data: dict[str, Any], workers: int, out: Path) -> tuple[Callable[[], float], int]:
    """The mini Q-Former recipe on `data` with `workers`, stepped as vlm_vs_transformers steps mmadapt's Trainer:
    a step's seconds, and the samples per step (no digit here is unreadable, so every batch is full)."""
    from mmadapt.core.spec import apply_overrides, load_yaml

    raw = apply_overrides(load_yaml(REPO / "recipes/mini/qformer.yaml"), [f"train.output_dir={out}", "train.cache_frozen_features=false",
                                                                          f"train.num_workers={workers}"])
    raw["data"] = data
    raw.pop("val_data", None)
    step, trainer = mmadapt_stepper(raw)
    return step, trainer.cfg.batch_size


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
            step, size = stepper(data, workers, root / "run" / name.replace(" ", ""))
            for _ in range(args.warmup):
                step()
            per_sample[name] += [step() / size for _ in range(args.steps)]
    base = statistics.median(per_sample["jsonl, 0 workers"])
    print(f"{args.samples} digits; {report.samples} samples in {len(report.shards)} shards; writing files {files_s:.1f} s, "
          f"shards {shards_s:.1f} s, datasets' arrow conversion {convert_s:.1f} s; {machine()}")
    print("| variant | ms per sample (median of 2 x {0} steps) | ratio to the JSONL's time |\n|---|---|---|".format(args.steps))
    for name, values in per_sample.items():
        median = statistics.median(values)
        print(f"| {name} | {median * 1000:.3f} | {median / base:.3f} |")


if __name__ == "__main__":
    main()
