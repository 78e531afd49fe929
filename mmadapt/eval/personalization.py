"""The personalization report: the learned style with and without the token, and the referee's digit accuracy."""
from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image

from mmadapt.data.digits import WORDS
from mmadapt.data.dreambooth import SLANT, slanted


def style_score(image: Image.Image) -> float:
    """How slanted a picture is: the ink's shear moment -mu11/mu02 (plain digits: -0.05 +- 0.11; the style: 0.35)."""
    ink = 1.0 - np.asarray(image.convert("L"), dtype=np.float32) / 255.0
    ys, xs = np.mgrid[0: ink.shape[0], 0: ink.shape[1]]
    mass = ink.sum() + 1e-6
    cx, cy = (ink * xs).sum() / mass, (ink * ys).sum() / mass
    return float(-((xs - cx) * (ys - cy) * ink).sum() / (((ys - cy) ** 2 * ink).sum() + 1e-6))


def unstyle(image: Image.Image) -> Image.Image:
    """The style undone (the opposite shear), so the referee, which reads upright scans, judges the digit itself."""
    return slanted(image, -SLANT)


def personalization_report(model: Any, token: str, per_digit: int = 5, seed: int = 0) -> dict[str, Any]:
    """Style score with and without the token; the referee's digit accuracy for 'a <token> seven', and for plain
    prompts after personalization against the base model (adapters switched off): prior preservation's check."""
    from mmadapt.eval.referee import read_digits

    generator = model.generator
    figures: dict[str, list[float]] = {"styled": [], "plain": [], "styled_right": [], "plain_right": [], "base_right": []}
    for digit in range(10):
        batch = {"size": per_digit, "node_inputs": {}}
        with_token = model.generate(batch, [f"a {token} {WORDS[digit]}"] * per_digit, seed=seed + digit)
        plain = generator.generate([f"a handwritten {WORDS[digit]}"] * per_digit, seed=seed + digit)
        with generator.adapters_disabled():
            base = generator.generate([f"a handwritten {WORDS[digit]}"] * per_digit, seed=seed + digit)
        figures["styled"] += [style_score(i) for i in with_token]
        figures["plain"] += [style_score(i) for i in plain]
        figures["styled_right"] += [d == digit for d in read_digits([unstyle(i) for i in with_token])]
        figures["plain_right"] += [d == digit for d in read_digits(plain)]
        figures["base_right"] += [d == digit for d in read_digits(base)]
    mean = {k: round(float(np.mean(v)), 4) for k, v in figures.items()}
    return {"style_with_token": mean["styled"], "style_without_token": mean["plain"],
            "referee_styled_prompts": mean["styled_right"], "referee_plain_prompts": mean["plain_right"],
            "referee_plain_prompts_base": mean["base_right"], "samples_per_digit": per_digit}
