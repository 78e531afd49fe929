"""One DreamBooth-LoRA training step two ways at equal settings: mmadapt's graph, and a plain diffusers + peft loop.

    python benchmarks/dreambooth_step.py --model mini            # digits-sd from the zoo (16 px)
    python benchmarks/dreambooth_step.py --model sd15 --resolution 256   # SD-1.5's U-Net config, random weights

Each variant runs in its own process (so peak memory is its own), the order reversed every round, and the ratios
of seconds per step and of peak memory against the plain loop are printed. Settings shared by all: LoRA rank and
targets, resolution, batch, fp32, the same picture and prompt every step (DreamBooth's few pictures repeat). The plain
loop encodes every batch with the VAE and the text encoder, as diffusers' SD 1.5 script does; `mmadapt+cache` keeps
the VAE posterior and the text states after the first step (cache_latents, cache_text_states: the loss is unchanged).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
SD15_UNET = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",), up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
                 cross_attention_dim=768, attention_head_dim=8)
SD15_VAE = dict(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, layers_per_block=2, sample_size=512)
SD15_TEXT = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=77)


def sd15_folder(root: Path) -> Path:
    """SD-1.5's architecture with random weights, saved as a pipeline folder (CLIP's tokenizer from open_clip's BPE)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from mmadapt.zoo.build.digits_sd import assemble_pipeline, build_tokenizer, text_encoder_for

    folder = root / "sd15-random"
    if not (folder / "model_index.json").exists():
        tokenizer = build_tokenizer()
        tokenizer.model_max_length = 77
        assemble_pipeline(AutoencoderKL(**SD15_VAE), text_encoder_for(tokenizer, SD15_TEXT), tokenizer,
                          UNet2DConditionModel(**SD15_UNET)).save_pretrained(folder)
    return folder


def peak_memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def batch_for(resolution: int, batch: int, device: str) -> tuple[torch.Tensor, list[str]]:
    generator = torch.Generator().manual_seed(0)
    pixels = torch.rand(batch, 3, resolution, resolution, generator=generator) * 2 - 1
    return pixels.to(device), ["a photo of sks dog"] * batch


def run_mmadapt(folder: str, resolution: int, batch: int, steps: int, rank: int, device: str, cache: bool = False) -> list[float]:
    """The graph's path: DiffusionGenerator with a peft LoRA adapter, as a recipe builds it; with `cache`, the
    pictures' VAE posteriors and the prompt's text states kept in memory (cache_latents, cache_text_states)."""
    from bridges.lora import LoRA
    from mmadapt.generators.diffusion.generator import DiffusionGenerator

    decoder = DiffusionGenerator(checkpoint=folder, placeholder="sks", resolution=resolution, cache_latents=cache, cache_text_states=cache)
    decoder.requires_grad_(False).eval()  # frozen parts in eval mode, as an assembled graph keeps them
    LoRA(r=rank, alpha=rank).apply(decoder.unet, DiffusionGenerator.adapter_modules["unet"])
    decoder.to(device)
    params = [p for p in decoder.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    pixels, prompts = batch_for(resolution, batch, device)
    ids = decoder.tokenize(prompts).to(device)
    return timed_steps(lambda: decoder(input_ids=ids, pixel_values=pixels)["loss"], optimizer, steps, device)


def run_plain(folder: str, resolution: int, batch: int, steps: int, rank: int, device: str) -> list[float]:
    """What diffusers' train_dreambooth_lora.py does per step, written out as a user would."""
    import torch.nn.functional as F
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from peft import LoraConfig
    from transformers import CLIPTextModel, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder").requires_grad_(False).to(device)
    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae").requires_grad_(False).to(device)
    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet").requires_grad_(False).to(device)
    scheduler = DDPMScheduler.from_pretrained(folder, subfolder="scheduler")
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=LORA_TARGETS))
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    pixels, prompts = batch_for(resolution, batch, device)
    ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt").input_ids.to(device)

    def loss() -> torch.Tensor:
        latents = vae.encode(pixels).latent_dist.sample() * vae.config.scaling_factor
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],), device=device)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        states = text_encoder(ids)[0]
        prediction = unet(noisy, timesteps, states, return_dict=False)[0]
        return F.mse_loss(prediction.float(), noise.float(), reduction="mean")

    return timed_steps(loss, optimizer, steps, device)


def timed_steps(loss_fn: Any, optimizer: torch.optim.Optimizer, steps: int, device: str) -> list[float]:
    """Seconds of each full step: forward, backward, optimizer step."""
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        loss_fn().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times


def child(args: argparse.Namespace) -> None:
    run = {"mmadapt": run_mmadapt, "mmadapt+cache": lambda *a: run_mmadapt(*a, cache=True), "plain": run_plain}[args.variant]
    times = run(args.folder, args.resolution, args.batch, args.warmup + args.steps, args.rank, args.device)
    print(json.dumps({"variant": args.variant, "seconds_per_step": statistics.median(times[args.warmup:]), "peak_mb": peak_memory_mb()}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["mini", "sd15"], default="mini")
    parser.add_argument("--resolution", type=int)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2, help="A B pairs, alternated")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        return child(args)
    from mmadapt.zoo import resolve_checkpoint

    workdir = Path(os.environ.get("MMADAPT_BENCH_DIR", tempfile.gettempdir()))
    folder = resolve_checkpoint("zoo:digits-sd") if args.model == "mini" else str(sd15_folder(workdir))
    resolution = args.resolution or (16 if args.model == "mini" else 512)
    results: dict[str, list[dict[str, Any]]] = {"mmadapt": [], "mmadapt+cache": [], "plain": []}
    for round_ in range(args.rounds):
        for variant in list(results)[:: 1 if round_ % 2 == 0 else -1]:  # order reversed every round
            command = [sys.executable, __file__, "--variant", variant, "--folder", folder, "--resolution", str(resolution),
                       "--batch", str(args.batch), "--rank", str(args.rank), "--steps", str(args.steps),
                       "--warmup", str(args.warmup), "--device", args.device]
            out = subprocess.run(command, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
            results[variant].append(json.loads(out))
    summary = {v: {"seconds_per_step": statistics.median(r["seconds_per_step"] for r in rs), "peak_mb": max(r["peak_mb"] for r in rs)}
               for v, rs in results.items()}
    device = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {os.cpu_count()} cores"
    print(json.dumps({"model": args.model, "resolution": resolution, "batch": args.batch, "rank": args.rank, "device": device,
                      **summary, **{f"time_ratio_{v}_over_plain": summary[v]["seconds_per_step"] / summary["plain"]["seconds_per_step"]
                                    for v in ("mmadapt", "mmadapt+cache")},
                      **{f"memory_ratio_{v}_over_plain": summary[v]["peak_mb"] / summary["plain"]["peak_mb"] for v in ("mmadapt", "mmadapt+cache")}},
                     indent=2))


if __name__ == "__main__":
    main()
