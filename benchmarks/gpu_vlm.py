"""Real-size bridge training on one GPU: CLIP ViT-L/14-336 + a 7B Llama config, random weights, bf16; samples/s, MFU, memory.

    python benchmarks/gpu_vlm.py --stage projector            # LLaVA-1.5 stage 1: 2-layer GELU MLP, 576 image tokens
    python benchmarks/gpu_vlm.py --stage qformer --cache      # BLIP-2 stage 2: Q-Former (32 queries) into the 7B LM
    python benchmarks/gpu_vlm.py --stage projector --gradient-checkpointing --batch 16

Model FLOPs per sample follow the litgpt/Megatron accounting: 6*N*tokens for trainable parameters, 4*N*tokens
for frozen parameters downstream of a trainable one (activation gradients, no weight gradients), 2*N*tokens for
frozen parameters upstream of all of them, 0 when their output comes from the cache. MFU is reported against a
large bf16 GEMM measured on the same device (the ceiling this code could reach) and, with --peak-tflops,
against the datasheet figure. Steps come from mmadapt's Trainer (see vlm_vs_transformers.mmadapt_stepper).
Not run in this repository's CI (no GPU there); see benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

VIT_L_336 = {"model_type": "clip_vision_model", "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
             "num_attention_heads": 16, "image_size": 336, "patch_size": 14}
LLAMA_7B = {"model_type": "llama", "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
            "num_attention_heads": 32, "num_key_value_heads": 32, "max_position_embeddings": 4096}
BRIDGES = {
    "projector": {"type": "mlp_projector", "inputs": {"x": "vision"}, "num_layers": 2},
    "qformer": {"type": "qformer", "inputs": {"context": "vision"}, "num_queries": 32, "hidden_size": 768, "num_layers": 12,
                "num_heads": 12, "cross_attention_every": 2},
}


def recipe(stage: str, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    vision = {"type": "hf_vision", "config": dict(VIT_L_336), "layer": -2}
    lm = {"type": "causal_lm", "config": dict(LLAMA_7B), "tokenizer": "zoo:digits-lm", "dtype": "bfloat16",
          "prefix_after_bos": stage == "projector", "inputs": {"prefix_embeds": "bridge"}}
    return {"name": f"gpu-{stage}", "graph": {"vision": vision, "bridge": dict(BRIDGES[stage]), "llm": lm},
            "data": {"type": "digits_captions", "split": "train", "style": "fixed", "template": "instruction",
                     "prompt": "What does it show?", "limit": args.samples},
            "train": {"lr": 1e-3, "batch_size": args.batch, "steps": 100_000, "precision": "bf16",
                      "cache_frozen_features": args.cache, "gradient_checkpointing": args.gradient_checkpointing,
                      "cache_dir": str(workdir / "cache"), "output_dir": str(workdir / "run"), "log_every": 100_000}}


def gemm_ceiling_tflops(size: int = 8192, repeats: int = 20) -> float:
    """bf16 matmul throughput of a large square GEMM: what this device delivers to dense transformer layers."""
    a = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    torch.cuda.synchronize()
    return 2 * size**3 * repeats / (time.perf_counter() - start) / 1e12


def count(module: torch.nn.Module, trainable: bool | None = None) -> int:
    return sum(p.numel() for p in module.parameters() if trainable is None or p.requires_grad == trainable)


def model_flops_per_sample(model: Any, text_tokens: float, cached: bool) -> float:
    """6N / 4N / 2N (0 cached) per token, by each node's place relative to the trainable tensors."""
    vision, bridge, llm = model.nodes["vision"], model.nodes["bridge"], model.nodes["llm"]
    image_tokens = (VIT_L_336["image_size"] // VIT_L_336["patch_size"]) ** 2
    vision_tokens = image_tokens + 1  # the tower runs on the class token too
    prefix_tokens = BRIDGES["qformer"]["num_queries"] if "qformer" in type(bridge).__name__.lower() else image_tokens
    bridge_tokens = prefix_tokens  # Q-Former: its queries (cross-attention to the image tokens is counted in N)
    llm_weights = count(llm) - llm.model.get_input_embeddings().weight.numel()  # a lookup is not a matmul
    flops = 6 * count(bridge) * bridge_tokens + 4 * llm_weights * (prefix_tokens + text_tokens)
    return flops + (0 if cached else 2 * count(vision) * vision_tokens)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stage", choices=list(BRIDGES), default="projector")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--samples", type=int, default=512, help="digits in the dataset (the cache build encodes them all)")
    parser.add_argument("--cache", action="store_true", help="read the frozen tower's features from the cache")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="recompute the frozen LLM's layers in backward")
    parser.add_argument("--peak-tflops", type=float, help="the device's datasheet dense bf16 TFLOP/s, for a second MFU figure")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("gpu_vlm.py needs a CUDA GPU; the CPU benchmarks are vlm_vs_transformers.py and scaling.py")
    from vlm_vs_transformers import mmadapt_stepper

    ceiling = gemm_ceiling_tflops()
    with tempfile.TemporaryDirectory(prefix="mmadapt-gpu-") as tmp:
        step, trainer = mmadapt_stepper(recipe(args.stage, args, Path(tmp)))
        torch.cuda.reset_peak_memory_stats()
        seconds = []
        for _ in range(args.warmup + args.steps):
            seconds.append(step())  # the step ends in loss.item(), which waits for the GPU
        samples = [trainer.dataset[i] for i in range(min(64, len(trainer.dataset)))]
        text_tokens = statistics.mean(len(trainer.model.generator.prepare(s, trainer.cfg.max_text_tokens)[0]) for s in samples)
        flops = model_flops_per_sample(trainer.model, text_tokens, args.cache)
    per_step = statistics.median(seconds[args.warmup:])
    achieved = flops * args.batch / per_step / 1e12
    result = {"device": torch.cuda.get_device_name(), "stage": args.stage, "batch": args.batch, "cache": args.cache,
              "gradient_checkpointing": args.gradient_checkpointing, "samples_per_s": args.batch / per_step,
              "model_tflops_per_sample": flops / 1e12, "achieved_tflops": achieved, "gemm_ceiling_tflops": ceiling,
              "mfu_vs_gemm_ceiling": achieved / ceiling, "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30,
              "cache_build_s": getattr(getattr(trainer, "cache_stats", None), "seconds", None)}
    if args.peak_tflops:
        result["mfu_vs_datasheet"] = achieved / args.peak_tflops
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
