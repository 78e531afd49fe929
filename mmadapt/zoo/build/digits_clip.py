"""`digits-clip`: a tiny open_clip CLIP pretrained contrastively on the digits' train split, and its zero-shot check."""
from __future__ import annotations

import json
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from mmadapt.data.digits import CAPTION_FORMATS, WORDS, digit_image, load_digits_arrays, split_indices

MODEL_CFG: dict[str, Any] = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 96, "layers": 4, "head_width": 24, "mlp_ratio": 2.0,
                   "pool_type": "avg"},  # mean of patch tokens: every patch token learns to carry the digit
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}


def class_prompts(label: int) -> list[str]:
    return [f.format(word=WORDS[label], number=label) for f in CAPTION_FORMATS]


def augment(pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random shifts, small rotations and scaling, then noise, on a normalised batch (B, 3, H, W) at once.

    Written as one affine_grid call because per-image PIL transforms cost more than the model here.
    """
    batch = pixels.shape[0]
    angle = (torch.rand(batch, generator=generator) - 0.5) * 2 * torch.pi * 12 / 180  # within +-12 degrees
    scale = 1 + (torch.rand(batch, generator=generator) - 0.5) * 0.2
    shift = (torch.rand(batch, 2, generator=generator) - 0.5) * 0.25  # up to 1/8 of the width each way
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)  # (B, 2, 3)
    grid = F.affine_grid(theta, list(pixels.shape), align_corners=False)
    background = pixels[:, :, :1, :1]  # white paper, in normalised units
    moved = F.grid_sample(pixels - background, grid, align_corners=False, padding_mode="zeros") + background
    return moved + 0.1 * torch.randn(moved.shape, generator=generator)


@torch.no_grad()
def zero_shot_accuracy(model: Any, preprocess: Any, tokenizer: Any, split: str = "test") -> float:
    """CLIP-style zero-shot: image vs the mean text embedding of each class's captions."""
    model.eval()
    class_embeddings = []
    for label in range(10):
        text = F.normalize(model.encode_text(tokenizer(class_prompts(label))), dim=-1).mean(0)
        class_embeddings.append(F.normalize(text, dim=-1))
    classes = torch.stack(class_embeddings)  # (10, E)
    images, labels = load_digits_arrays()
    indices = split_indices(split)
    pixels = torch.stack([preprocess(digit_image(images[i])) for i in indices])
    predicted = (F.normalize(model.encode_image(pixels), dim=-1) @ classes.T).argmax(-1)
    return (predicted.numpy() == labels[indices]).mean().item()


def train(out_dir: Path, seed: int = 0, epochs: int = 100, batch_size: int = 128, lr: float = 2e-3) -> dict[str, float]:
    """Train from scratch and save in open_clip's local-dir layout; returns the quality figures."""
    import open_clip
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)
    model = open_clip.model.CLIP(**MODEL_CFG)
    tokenizer = open_clip.SimpleTokenizer(context_length=MODEL_CFG["text_cfg"]["context_length"])
    preprocess = open_clip.image_transform(MODEL_CFG["vision_cfg"]["image_size"], is_train=False)
    images, labels = load_digits_arrays()
    train_idx = split_indices("train")
    base = {i: preprocess(digit_image(images[i])) for i in train_idx}  # the evaluation transform, then augment
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    steps = epochs * (len(train_idx) // batch_size)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.1)
    start, step = time.perf_counter(), 0
    model.train()
    for _ in range(epochs):
        order = np.random.permutation(train_idx)
        for offset in range(0, len(order) - batch_size + 1, batch_size):
            batch = order[offset: offset + batch_size]
            y = torch.as_tensor(labels[batch])
            pixels = augment(torch.stack([base[i] for i in batch]), generator)  # (B, 3, H, W)
            captions = [random.choice(class_prompts(int(label))) for label in y]
            img = F.normalize(model.encode_image(pixels), dim=-1)  # (B, E)
            txt = F.normalize(model.encode_text(tokenizer(captions)), dim=-1)  # (B, E)
            logits = model.logit_scale.exp().clamp(max=100) * img @ txt.T  # (B, B)
            # Several images of one digit share a batch: every same-digit pair is a positive, not a false negative.
            positives = (y[:, None] == y[None, :]).float()
            targets = positives / positives.sum(1, keepdim=True)
            loss = (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
            step += 1
    seconds = time.perf_counter() - start
    figures = {"zero_shot_val": zero_shot_accuracy(model, preprocess, tokenizer, "val"),
               "zero_shot_test": zero_shot_accuracy(model, preprocess, tokenizer, "test"), "train_seconds": round(seconds, 1)}
    out_dir.mkdir(parents=True, exist_ok=True)
    config = {"model_cfg": MODEL_CFG, "preprocess_cfg": {"size": MODEL_CFG["vision_cfg"]["image_size"]}}
    (out_dir / "open_clip_config.json").write_text(json.dumps(config, indent=2))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out_dir / "open_clip_model.safetensors"))
    return figures


def load(folder: Path) -> tuple[Any, Any, Any]:
    """The saved member through open_clip's own local-dir loader: (model, eval transform, tokenizer)."""
    import open_clip

    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{folder}")
    return model, preprocess, open_clip.get_tokenizer(f"local-dir:{folder}")
