"""How the stock export of a digits VLM card captions the test digits, beside mmadapt's own captions (not a speed benchmark).

    python benchmarks/export_agreement.py runs/mini-projector/card [--limit 300]

Exports the card with `mmadapt export`, captions the test split with transformers alone (a subprocess that cannot
import mmadapt, through the export's own processor), and with mmadapt; prints each one's caption accuracy and how
often the two captions are the same.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

STOCK = """
import json, sys
sys.meta_path.insert(0, type("NoMmadapt", (), {"find_spec": staticmethod(
    lambda name, *a: (_ for _ in ()).throw(ImportError(name)) if name.split(".")[0] == "mmadapt" else None)})())
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor
folder, images, out = sys.argv[1], json.loads(open(sys.argv[2]).read()), sys.argv[3]
processor = AutoProcessor.from_pretrained(folder)
model = AutoModelForImageTextToText.from_pretrained(folder).eval()
prompt = json.load(open(folder + "/mmadapt_export.json"))["prompt"]
captions = []
for path in images:
    inputs = processor(images=Image.open(path).convert("RGB"), text=prompt, return_tensors="pt")
    with torch.no_grad():
        ids = model.generate(**inputs, max_new_tokens=16, do_sample=False)[0, inputs["input_ids"].shape[1]:]
    captions.append(processor.tokenizer.decode(ids, skip_special_tokens=True).strip())
open(out, "w").write(json.dumps(captions))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("card")
    parser.add_argument("--limit", type=int, default=300)
    args = parser.parse_args()

    from mmadapt.cli import main as mmadapt
    from mmadapt.data.digits import DigitsCaptions
    from mmadapt.eval.evaluate import named_digit
    from mmadapt.serve.inference import generate_from_images, load_card

    dataset = DigitsCaptions(split="test", style="fixed")
    samples = [dataset[i] for i in range(min(args.limit, len(dataset)))]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "export"
        if mmadapt(["export", args.card, str(folder)]) != 0:
            raise SystemExit("the card could not be exported")
        paths = []
        for index, sample in enumerate(samples):
            paths.append(str(Path(tmp) / f"{index}.png"))
            sample["image"].save(paths[-1])
        (Path(tmp) / "images.json").write_text(json.dumps(paths))
        subprocess.run([sys.executable, "-c", STOCK, str(folder), str(Path(tmp) / "images.json"), str(Path(tmp) / "out.json")],
                       check=True)
        stock = json.loads((Path(tmp) / "out.json").read_text())
    ours = generate_from_images(load_card(args.card), [s["image"] for s in samples], max_new_tokens=16)
    labels = [s["label"] for s in samples]
    accuracy = {name: sum(named_digit(c) == y for c, y in zip(captions, labels)) / len(labels)
                for name, captions in (("mmadapt", ours), ("stock export", stock))}
    same = sum(a == b for a, b in zip(ours, stock)) / len(labels)
    print(json.dumps({"samples": len(labels), "caption accuracy": accuracy, "same caption": same}, indent=2))


if __name__ == "__main__":
    main()
