"""Run as a script: load an exported folder with transformers alone (mmadapt cannot be imported here) and write its
logits and greedy generation for one image and one text, so a test can compare them with mmadapt's own model.

    python tests/stock_load.py FOLDER IMAGE.png TEXT MAX_NEW_TOKENS OUT.pt [PIXELS.pt]

PIXELS.pt, when given, replaces the processor's pixel values (to compare the model alone where preprocessing differs).
"""
from __future__ import annotations

import importlib.abc
import sys


class NoMmadapt(importlib.abc.MetaPathFinder):
    """Refuse every import of mmadapt, so the export is proven to load without it."""

    def find_spec(self, name: str, path: object = None, target: object = None) -> None:
        if name == "mmadapt" or name.startswith("mmadapt."):
            raise ImportError(f"{name}: mmadapt is not importable in this check")
        return None


def main(folder: str, image_path: str, text: str, max_new_tokens: int, out: str, pixels: str | None = None) -> None:
    sys.meta_path.insert(0, NoMmadapt())
    import torch
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(folder)
    model = AutoModelForImageTextToText.from_pretrained(folder).eval()
    inputs = processor(images=Image.open(image_path).convert("RGB"), text=text, return_tensors="pt")
    if pixels is not None:
        inputs["pixel_values"] = torch.load(pixels)
    with torch.no_grad():
        logits = model(**inputs).logits[0]  # (T, V)
        generated = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    new = generated[0, inputs["input_ids"].shape[1]:]
    text_out = processor.tokenizer.decode(new, skip_special_tokens=True).strip()
    torch.save({"logits": logits, "input_ids": inputs["input_ids"][0], "generated_ids": new, "generated": text_out,
                "class": type(model).__name__, "mmadapt_imported": "mmadapt" in sys.modules}, out)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5], *sys.argv[6:7])
