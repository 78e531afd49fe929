"""Leave one speaker out: an audio -> LLM recipe trained on four of FSDD's five speakers, read on the fifth, each in turn.

    python benchmarks/speakers_held_out.py --recipe recipes/mini/audio-grid.yaml

For each speaker S, the recipe as written trains on the other four (`data.speakers`, `val_data.speakers`), then
`mmadapt eval`'s caption figure is read on two sets: every recording of S (500 clips, none of them heard in training),
and the test recordings (indices 0-4) of the four trained speakers, the recipe's usual figure. Needs the recordings
(`MMADAPT_FSDD` or `--root`). Prints a table and the mean over the five folds.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine  # noqa: E402

SPLITS = ("test", "val", "train")  # FSDD's indices 0-4, 5-9 and 10-49: together every recording of a speaker


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="recipes/mini/audio-grid.yaml")
    parser.add_argument("--root", default=os.environ.get("MMADAPT_FSDD"), help="the folder holding recordings/")
    parser.add_argument("--hold-out", action="append", help="hold out only this speaker (repeatable; default: each of the five in turn)")
    parser.add_argument("overrides", nargs="*", help="key=value recipe overrides, e.g. train.steps=1000")
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    from mmadapt.core.spec import apply_overrides, load_yaml
    from mmadapt.core.validate import check_recipe
    from mmadapt.data.fsdd import FSDDCaptions
    from mmadapt.eval.evaluate import evaluate_digits
    from mmadapt.training.trainer import Trainer

    test = FSDDCaptions(split="test", root=args.root)
    everyone = sorted({test.group(i) for i in range(len(test))})
    unknown = sorted(set(args.hold_out or []) - set(everyone))
    if unknown:
        parser.error(f"--hold-out {', '.join(unknown)}: not a speaker of the recordings ({', '.join(everyone)})")
    held = args.hold_out or everyone
    out = Path(tempfile.mkdtemp(prefix="mmadapt-loso-"))
    rows = []
    for speaker in held:
        others = [s for s in everyone if s != speaker]
        raw = apply_overrides(load_yaml(args.recipe), [f"train.output_dir={out / speaker}", f"train.cache_dir={out / 'cache'}",
                                                        f"data.speakers={json.dumps(others)}", f"val_data.speakers={json.dumps(others)}",
                                                        *([f"data.root={args.root}", f"val_data.root={args.root}"] if args.root else []),
                                                        *args.overrides])
        began = time.perf_counter()
        trainer = Trainer(*check_recipe(raw, args.recipe))
        trainer.train()
        model, data = trainer.model, trainer.recipe.data
        trained = evaluate_digits(model, "test", data=data)["caption_accuracy"]
        unheard = [evaluate_digits(model, split, data={**data, "speakers": [speaker]}) for split in SPLITS]
        clips = sum(r["samples"] for r in unheard)
        accuracy = sum(r["caption_accuracy"] * r["samples"] for r in unheard) / clips
        rows.append((speaker, accuracy, clips, unheard[0]["caption_accuracy"], trained, time.perf_counter() - began))
        print(f"{speaker}: unheard {accuracy:.3f} ({clips} clips; its test clips {unheard[0]['caption_accuracy']:.3f}), "
              f"trained speakers' test clips {trained:.3f}, {rows[-1][-1] / 60:.1f} min", flush=True)
    print(f"{args.recipe} {' '.join(args.overrides)}; {machine()}")
    print("| held-out speaker | caption accuracy on all its recordings (unheard) | on its 50 test recordings | "
          "the four trained speakers' test recordings | minutes |\n|---|---|---|---|---|")
    for speaker, accuracy, clips, test, trained, seconds in rows:
        print(f"| {speaker} | {accuracy:.1%} of {clips} | {test:.1%} | {trained:.1%} | {seconds / 60:.1f} |")
    mean = lambda index: sum(r[index] for r in rows) / len(rows)  # noqa: E731
    print(f"| mean | **{mean(1):.1%}** | {mean(3):.1%} | {mean(4):.1%} | |")


if __name__ == "__main__":
    main()
