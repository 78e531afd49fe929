"""DreamBooth data: a few subject images with their prompts, class images for prior preservation, and the mini world's slanted style."""
from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any, ClassVar

from PIL import Image
from torch.utils.data import Dataset

from mmadapt.data.captions import CAPTION_FIELDS
from mmadapt.data.digits import WORDS, digit_image, load_digits_arrays, split_indices
from mmadapt.errors import DataError
from mmadapt.core.params import NonNegativeFloat, NonNegativeInt, PositiveInt
from mmadapt.core.semantics import Finding, argument, place_finding

log = logging.getLogger(__name__)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
MIN_IMAGES = 3
STYLE_EXAMPLES = (0, 3, 5, 8)  # the mini world's subject: these digits drawn slanted, the "style" to learn


def list_images(folder: str | Path, field: str = "images") -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{field}: {folder} is not a folder")
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


class DreamBoothImages(Dataset):
    """Instance images with the instance prompt, and class images (made by the frozen base) with the class prompt.

    An image's caption is its sidecar `<image>.txt` when there is one (e.g. "a <sks> seven" for a style, whose
    images differ in content), else the folder's prompt. Items 0..L-1 are instance images, L..2L-1 class images
    (L = the larger count), so a shuffled batch mixes them about evenly, as diffusers' script puts one of each
    per pair; class items carry `prior_loss_weight`.
    """

    fields: ClassVar[frozenset[str]] = CAPTION_FIELDS | {"image", "loss_weight", "prior"}

    @classmethod
    def param_problems(cls, params: dict[str, Any]) -> list[Finding]:
        """instance_dir is a folder with enough images; class_dir, made at the first run when missing, is no file."""
        instance_dir, class_dir = params.get("instance_dir"), params.get("class_dir")
        found = place_finding(instance_dir, "instance_dir", "folder")
        findings = [found] if found else []
        if found is None and isinstance(instance_dir, str):
            count, least = len(list_images(instance_dir)), argument(cls, params, "min_images")
            if isinstance(least, int) and count < least:
                findings.append(Finding("instance_dir", f"{instance_dir} has {count} image(s) ({', '.join(IMAGE_SUFFIXES)}); "
                                                        f"personalization needs at least {least}"))
        if isinstance(class_dir, str) and Path(class_dir).is_file():
            findings.append(Finding("class_dir", f"{class_dir} is a file; class images are generated into this folder"))
        return findings

    def __init__(
        self,
        instance_dir: str,  # the 3-5 subject images, optionally with <image>.txt captions
        instance_prompt: str,  # e.g. "a <sks> digit", for images without a caption file; must hold the placeholder
        class_prompt: str | list[str] | None = None,  # e.g. "a digit", or several cycled over; None = no prior preservation
        class_dir: str | None = None,  # where class images are generated once and reused; default: beside the run
        num_class_images: NonNegativeInt = 100,  # diffusers suggests 200-300 for SD; the mini world needs fewer
        prior_loss_weight: NonNegativeFloat = 1.0,
        min_images: PositiveInt = MIN_IMAGES,
    ) -> None:
        self.instances = list_images(instance_dir, "data.instance_dir")
        if len(self.instances) < min_images:
            raise DataError(f"data.instance_dir: {instance_dir} has {len(self.instances)} image(s); personalization needs at least {min_images}")
        self.instance_prompt = instance_prompt
        self.class_prompts = [class_prompt] if isinstance(class_prompt, str) else list(class_prompt or [])
        self.class_dir = Path(class_dir) if class_dir else None
        self.num_class_images, self.prior_loss_weight = num_class_images, prior_loss_weight
        self.classes: list[Path] = []

    def prepare(self, model: Any, output_dir: Path) -> None:
        """Generate the missing class images with the frozen base model itself (before any adapter has learned)."""
        if not self.class_prompts:
            return
        self.class_dir = self.class_dir or output_dir / "class_images"
        self.class_dir.mkdir(parents=True, exist_ok=True)
        have = len(list_images(self.class_dir, "data.class_dir"))
        if have < self.num_class_images:
            log.info("generating %d class images into %s", self.num_class_images - have, self.class_dir)
        for offset in range(have, self.num_class_images, 16):
            indices = range(offset, min(offset + 16, self.num_class_images))
            prompts = [self.class_prompts[i % len(self.class_prompts)] for i in indices]
            for index, prompt, image in zip(indices, prompts, model.generator.generate(prompts, seed=offset)):
                (self.class_dir / f"class-{index:05d}.txt").write_text(prompt)
                image.save(self.class_dir / f"class-{index:05d}.png")
        self.classes = list_images(self.class_dir, "data.class_dir")[: self.num_class_images]

    @staticmethod
    def caption(path: Path, default: str) -> str:
        sidecar = path.with_suffix(".txt")
        return sidecar.read_text().strip() if sidecar.is_file() else default

    def __len__(self) -> int:
        return max(len(self.instances), len(self.classes)) * (2 if self.classes else 1)

    def __getitem__(self, index: int) -> dict[str, Any]:
        half = len(self) // (2 if self.classes else 1)
        is_class = index >= half
        if is_class:
            path = self.classes[(index - half) % len(self.classes)]
            prompt = self.caption(path, self.class_prompts[0])
        else:
            path = self.instances[index % len(self.instances)]
            prompt = self.caption(path, self.instance_prompt)
        return {"image": str(path), "prompt": prompt, "text": prompt, "target": "", "id": index,
                "key": hashlib.sha1(str(path).encode()).hexdigest(), "loss_weight": self.prior_loss_weight if is_class else 1.0, "prior": is_class}


# --- the mini world: a slant as the subject's style ---
SLANT = 0.4  # horizontal shear of the style: a stroke leans right by 0.4 px per px of height
# Chosen because the frozen digits-sd VAE keeps it (its slant statistic survives encode/decode: 0.35 -> 0.33), while a frame
# or inverted ink, which the VAE never saw, comes back blurred away (frame score 1.0 -> 0.35).


def slanted(image: Image.Image, shear: float = SLANT) -> Image.Image:
    """The style: the picture sheared so that its top leans right by `shear` per pixel of height."""
    image = image.convert("RGB")
    centre = image.height / 2
    return image.transform(image.size, Image.Transform.AFFINE, (1, shear, -shear * centre, 0, 1, 0),
                           resample=Image.Resampling.BICUBIC, fillcolor=(255, 255, 255))


def write_style_examples(folder: str | Path, size: int = 16, token: str = "<sks>") -> list[Path]:
    """The personalization example: a few train digits at the zoo's resolution, each slanted."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    images, labels = load_digits_arrays()
    train = split_indices("train")
    paths = []
    for digit in STYLE_EXAMPLES:
        index = next(i for i in train if labels[i] == digit)
        path = folder / f"slanted-{WORDS[digit]}.png"
        slanted(digit_image(images[index]).resize((size, size), Image.Resampling.BICUBIC)).save(path)
        path.with_suffix(".txt").write_text(f"a {token} {WORDS[digit]}")  # the caption names the content; the token the style
        paths.append(path)
    return paths


