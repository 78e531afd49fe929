"""`digits-sd`: a tiny Stable-Diffusion-layout pipeline (U-Net, VAE, CLIP text encoder) pretrained on the digits."""
from __future__ import annotations

import gzip
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from mmadapt.data.digits import WORDS, caption_for, digit_image, load_digits_arrays, split_indices

IMAGE_SIZE = 16  # pixels, twice the scans' 8x8; the VAE halves it, so the U-Net works on 4 x 8 x 8 latents (CPU-sized)
PROMPT_LENGTH = 20  # the tokenizer's model_max_length; the longest caption is 11 tokens
BPE_MERGES = 8000  # of CLIP's 48,894: enough that every digit word is one token
VAE = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
           block_out_channels=(32, 64), layers_per_block=1, latent_channels=4, norm_num_groups=16, sample_size=IMAGE_SIZE)
TEXT = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=PROMPT_LENGTH,
            projection_dim=64)
UNET = dict(sample_size=IMAGE_SIZE // 2, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=64, attention_head_dim=8, norm_num_groups=16)
SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")  # SD-1.x's


def build_tokenizer() -> Any:
    """A CLIPTokenizer on the first merges of CLIP's own BPE file (shipped in open_clip), so its ids match CLIP's."""
    from open_clip.tokenizer import bytes_to_unicode, default_bpe
    from transformers import CLIPTokenizer

    lines = gzip.open(default_bpe()).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1: 1 + BPE_MERGES]]
    symbols = list(bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    return CLIPTokenizer(vocab={v: i for i, v in enumerate(vocab)}, merges=merges, model_max_length=PROMPT_LENGTH)


def pixels_of(indices: list[int]) -> torch.Tensor:
    """Digit scans upsampled to IMAGE_SIZE, in the pipeline's [-1, 1] range: (N, 3, H, W)."""
    images, _ = load_digits_arrays()
    arrays = [np.asarray(digit_image(images[i]).resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BICUBIC)) for i in indices]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def assemble_pipeline(vae: Any, text_encoder: Any, tokenizer: Any, unet: Any) -> Any:
    """The stock StableDiffusionPipeline around the parts, with SD-1.x's DDIM sampler and no safety checker."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder.eval(), tokenizer=tokenizer, unet=unet.eval(),
                                   scheduler=DDIMScheduler(**SCHEDULE, steps_offset=1, clip_sample=False, set_alpha_to_one=False),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def random_pipeline(seed: int = 0) -> Any:
    """The member's architecture with random weights: what tests build instead of training (diffusers' dummy components)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    return assemble_pipeline(AutoencoderKL(**VAE), text_encoder_for(tokenizer), tokenizer, UNet2DConditionModel(**UNET))


def text_encoder_for(tokenizer: Any, sizes: dict[str, int] | None = None) -> Any:
    """A random CLIP text encoder whose vocabulary and special ids match the tokenizer; `sizes` replaces TEXT."""
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                                        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **(sizes or TEXT)))


def train_vae(pixels: torch.Tensor, steps: int, batch_size: int, generator: torch.Generator) -> Any:
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(**VAE)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=1e-3)
    for _ in range(steps):
        batch = pixels[torch.randint(len(pixels), (batch_size,), generator=generator)]
        posterior = vae.encode(batch).latent_dist
        reconstruction = vae.decode(posterior.sample(generator)).sample
        loss = F.mse_loss(reconstruction, batch) + 1e-6 * posterior.kl().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    vae.eval()
    with torch.no_grad():  # SD's convention: scale latents to unit variance, recorded in the VAE config
        std = vae.encode(pixels[:512]).latent_dist.sample(generator).std().item()
    vae.register_to_config(scaling_factor=round(1.0 / std, 5))
    return vae


def train(out_dir: Path, seed: int = 0, vae_steps: int = 800, steps: int = 3000, batch_size: int = 64, lr: float = 1e-3,
          uncond_fraction: float = 0.1) -> dict[str, Any]:
    """Train VAE, then U-Net with text encoder, from scratch; save with save_pretrained; returns the quality figures."""
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import get_cosine_schedule_with_warmup

    torch.manual_seed(seed)
    rng = random.Random(seed)
    generator = torch.Generator().manual_seed(seed)
    train_idx = split_indices("train")
    labels = load_digits_arrays()[1][train_idx]
    pixels = pixels_of(train_idx)
    start = time.perf_counter()
    vae = train_vae(pixels, vae_steps, 32, generator).requires_grad_(False)
    with torch.no_grad():
        posterior = vae.encode(pixels).latent_dist
    mean, std = posterior.mean, posterior.std  # (N, 4, h, w) each: latents are drawn fresh every step
    tokenizer = build_tokenizer()
    text_encoder = text_encoder_for(tokenizer)
    unet = UNet2DConditionModel(**UNET)
    noise_scheduler = DDPMScheduler(**SCHEDULE)
    parameters = list(unet.parameters()) + list(text_encoder.parameters())
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=0.01)
    schedule = get_cosine_schedule_with_warmup(optimizer, steps // 50, steps)
    unet.train(), text_encoder.train()
    for _ in range(steps):
        batch = torch.randint(len(train_idx), (batch_size,), generator=generator)
        latents = (mean[batch] + std[batch] * torch.randn(mean[batch].shape, generator=generator)) * vae.config.scaling_factor
        captions = ["" if rng.random() < uncond_fraction else caption_for(int(labels[i]), "varied", rng) for i in batch]
        ids = tokenizer(captions, padding="max_length", max_length=PROMPT_LENGTH, truncation=True, return_tensors="pt").input_ids
        noise = torch.randn(latents.shape, generator=generator)
        timesteps = torch.randint(SCHEDULE["num_train_timesteps"], (batch_size,), generator=generator)
        noisy = noise_scheduler.add_noise(latents, noise, timesteps)
        prediction = unet(noisy, timesteps, encoder_hidden_states=text_encoder(ids).last_hidden_state).sample
        loss = F.mse_loss(prediction, noise)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        schedule.step()
    seconds = time.perf_counter() - start
    pipeline = assemble_pipeline(vae, text_encoder, tokenizer, unet)
    out_dir.mkdir(parents=True, exist_ok=True)
    pipeline.save_pretrained(out_dir)
    return {**quality(out_dir), "train_seconds": round(seconds, 1)}


def generate_digits(pipeline: Any, prompts: list[str], seed: int = 0, steps: int = 25, guidance: float = 4.0,
                    **call: Any) -> list[Image.Image]:
    """The stock pipeline's pictures for prompts; `call` adds the layout's own arguments (SD 3: max_sequence_length)."""
    generator = torch.Generator().manual_seed(seed)
    return pipeline(prompts, num_inference_steps=steps, guidance_scale=guidance, generator=generator, **call).images


def referee_quality(pipeline: Any, per_digit: int = 20, seed: int = 0, guidance: float = 4.0, **call: Any) -> dict[str, Any]:
    """The referee's accuracy on `per_digit` pictures of each digit that a stock pipeline draws from its name."""
    from mmadapt.eval.referee import read_digits

    pipeline.set_progress_bar_config(disable=True)
    correct = {}
    for digit in range(10):
        images = generate_digits(pipeline, [f"a handwritten {WORDS[digit]}"] * per_digit, seed=seed + digit, guidance=guidance, **call)
        correct[WORDS[digit]] = sum(d == digit for d in read_digits(images)) / per_digit
    return {"referee_accuracy": round(sum(correct.values()) / 10, 4), "per_digit": correct, "guidance_scale": guidance,
            "inference_steps": 25}


def quality(folder: Path, per_digit: int = 20, seed: int = 0, guidance: float = 4.0) -> dict[str, Any]:
    """The referee's accuracy on `per_digit` images of each digit, generated by the stock pipeline from the folder."""
    from diffusers import StableDiffusionPipeline

    return referee_quality(StableDiffusionPipeline.from_pretrained(folder), per_digit, seed, guidance)
