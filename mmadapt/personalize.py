"""Personalization (DreamBooth-LoRA / LoKr with prior preservation): its data, the mini world's style, and its report."""
from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw
from torch.utils.data import Dataset

from mmadapt.digits import WORDS, digit_image, load_digits_arrays, split_indices
from mmadapt.errors import DataError

log = logging.getLogger(__name__)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
MIN_IMAGES = 3
FRAMED_EXAMPLES = (0, 3, 5, 8)  # the mini world's subject: these digits drawn with a frame, the "style" to learn


def list_images(folder: str | Path, field: str = "images") -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{field}: {folder} is not a folder")
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


class DreamBoothImages(Dataset):
    """Instance images with the instance prompt, and class images (made by the frozen base) with the class prompt.

    Items 0..L-1 are instance images, L..2L-1 class images (L = the larger count), so a shuffled batch mixes
    them about evenly, as diffusers' script puts one of each per pair; class items carry `prior_loss_weight`.
    """

    def __init__(
        self,
        instance_dir: str,  # the 3-5 subject images
        instance_prompt: str,  # e.g. "a <sks> digit"; must contain the placeholder when a token bridge is wired
        class_prompt: str | None = None,  # e.g. "a digit"; None = no prior preservation
        class_dir: str | None = None,  # where class images are generated once and reused; default: beside the run
        num_class_images: int = 100,  # diffusers suggests 200-300 for SD; the mini world needs fewer
        prior_loss_weight: float = 1.0,
        min_images: int = MIN_IMAGES,
    ) -> None:
        self.instances = list_images(instance_dir, "data.instance_dir")
        if len(self.instances) < min_images:
            raise DataError(f"data.instance_dir: {instance_dir} has {len(self.instances)} image(s); personalization needs at least {min_images}")
        self.instance_prompt, self.class_prompt = instance_prompt, class_prompt
        self.class_dir = Path(class_dir) if class_dir else None
        self.num_class_images, self.prior_loss_weight = num_class_images, prior_loss_weight
        self.classes: list[Path] = []

    def prepare(self, model: Any, output_dir: Path) -> None:
        """Generate the missing class images with the frozen base model itself (before any adapter has learned)."""
        if self.class_prompt is None:
            return
        self.class_dir = self.class_dir or output_dir / "class_images"
        self.class_dir.mkdir(parents=True, exist_ok=True)
        have = list_images(self.class_dir, "data.class_dir")
        missing = self.num_class_images - len(have)
        if missing > 0:
            log.info("generating %d class images for '%s' into %s", missing, self.class_prompt, self.class_dir)
            decoder = model.decoder
            for offset in range(0, missing, 16):
                count = min(16, missing - offset)
                images = decoder.generate([self.class_prompt] * count, seed=len(have) + offset)
                for index, image in enumerate(images):
                    image.save(self.class_dir / f"class-{len(have) + offset + index:05d}.png")
        self.classes = list_images(self.class_dir, "data.class_dir")[: self.num_class_images]

    def __len__(self) -> int:
        return max(len(self.instances), len(self.classes)) * (2 if self.classes else 1)

    def __getitem__(self, index: int) -> dict[str, Any]:
        half = len(self) // (2 if self.classes else 1)
        is_class = index >= half
        path = self.classes[(index - half) % len(self.classes)] if is_class else self.instances[index % len(self.instances)]
        prompt = self.class_prompt if is_class else self.instance_prompt
        return {"image": str(path), "prompt": prompt, "text": prompt, "target": "", "id": index,
                "key": hashlib.sha1(str(path).encode()).hexdigest(), "loss_weight": self.prior_loss_weight if is_class else 1.0}


# --- the mini world: a frame as the subject's style ---
def framed(image: Image.Image, width: int = 1) -> Image.Image:
    """The style: a dark frame `width` pixels wide around the picture."""
    image = image.convert("RGB").copy()
    ImageDraw.Draw(image).rectangle([0, 0, image.width - 1, image.height - 1], outline=(0, 0, 0), width=width)
    return image


def write_framed_examples(folder: str | Path, size: int = 16) -> list[Path]:
    """The personalization example: a few train digits at the zoo's resolution, each with a frame."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    images, labels = load_digits_arrays()
    train = split_indices("train")
    paths = []
    for digit in FRAMED_EXAMPLES:
        index = next(i for i in train if labels[i] == digit)
        path = folder / f"framed-{WORDS[digit]}.png"
        framed(digit_image(images[index]).resize((size, size), Image.Resampling.BICUBIC)).save(path)
        paths.append(path)
    return paths


def style_score(image: Image.Image) -> float:
    """How framed a picture is: mean ink (0..1) on its outermost ring of pixels, which plain digits leave blank."""
    gray = np.asarray(image.convert("L"), dtype=np.float32) / 255.0
    ring = np.concatenate([gray[0], gray[-1], gray[1:-1, 0], gray[1:-1, -1]])
    return float((1.0 - ring).mean())


def personalization_report(model: Any, token: str, per_digit: int = 5, seed: int = 0) -> dict[str, Any]:
    """Style score with and without the token; the referee's digit accuracy for 'a <token> seven', and for plain
    prompts after personalization against the base model (adapters switched off): prior preservation's check."""
    from mmadapt.referee import read_digits

    decoder = model.decoder
    figures: dict[str, list[float]] = {"styled": [], "plain": [], "styled_right": [], "plain_right": [], "base_right": []}
    for digit in range(10):
        batch = {"size": per_digit, "node_inputs": {}}
        with_token = model.generate(batch, [f"a {token} {WORDS[digit]}"] * per_digit, seed=seed + digit)
        plain = decoder.generate([f"a handwritten {WORDS[digit]}"] * per_digit, seed=seed + digit)
        with adapters_off(decoder):
            base = decoder.generate([f"a handwritten {WORDS[digit]}"] * per_digit, seed=seed + digit)
        figures["styled"] += [style_score(i) for i in with_token]
        figures["plain"] += [style_score(i) for i in plain]
        figures["styled_right"] += [d == digit for d in read_digits([unframe(i) for i in with_token])]
        figures["plain_right"] += [d == digit for d in read_digits(plain)]
        figures["base_right"] += [d == digit for d in read_digits(base)]
    mean = {k: round(float(np.mean(v)), 4) for k, v in figures.items()}
    return {"style_with_token": mean["styled"], "style_without_token": mean["plain"],
            "referee_styled_prompts": mean["styled_right"], "referee_plain_prompts": mean["plain_right"],
            "referee_plain_prompts_base": mean["base_right"], "samples_per_digit": per_digit}


class adapters_off:
    """Switch a diffusion decoder's U-Net and text-encoder adapters off for a block, then back on."""

    def __init__(self, decoder: Any) -> None:
        self.models = [m for m in (decoder.unet, decoder.text_encoder) if getattr(m, "peft_config", None)]

    def __enter__(self) -> None:
        from peft.tuners.tuners_utils import BaseTunerLayer

        for module in (x for m in self.models for x in m.modules() if isinstance(x, BaseTunerLayer)):
            module.enable_adapters(False)

    def __exit__(self, *exc: Any) -> None:
        from peft.tuners.tuners_utils import BaseTunerLayer

        for module in (x for m in self.models for x in m.modules() if isinstance(x, BaseTunerLayer)):
            module.enable_adapters(True)


def unframe(image: Image.Image) -> Image.Image:
    """The picture with its outer ring painted paper-white, so the referee reads the digit and not the frame."""
    image = image.convert("RGB").copy()
    ImageDraw.Draw(image).rectangle([0, 0, image.width - 1, image.height - 1], outline=(255, 255, 255), width=1)
    return image
