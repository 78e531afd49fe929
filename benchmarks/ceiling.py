"""MFU against this machine: the mid-size LLaVA-style graph's model FLOPs per second (gpu_vlm.py's accounting) over a
large GEMM measured in the same process, in the training dtype and in the machine's fastest one.

    python benchmarks/ceiling.py --steps 4

Model FLOPs per sample: 2*N*tokens for the frozen tower (upstream of everything that trains), 6*N*tokens for the
bridge, 4*N*tokens for the frozen LM's body (activation gradients, no weight gradients) over the image and text
positions, and 4*N_head for its head at the labelled positions only, the work a step must do (the head elsewhere is
skipped: logits_at_targets). Embedding lookups count nothing.
"""
from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine  # noqa: E402
from vlm_vs_transformers import SIZES, mmadapt_stepper, recipe  # noqa: E402


def gemm_flops(dtype: torch.dtype, size: int, repeats: int = 5) -> float:
    """FLOP/s of a square `size` GEMM in `dtype` on this CPU (median of `repeats` products after one warm-up)."""
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    a @ b
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - began)
    return 2 * size**3 / statistics.median(times)


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--size", type=int, default=2048, help="the GEMM's side in fp32 (bf16 without matrix units: 512)")
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    args.batch = None
    size = SIZES["mid"]
    step, trainer = mmadapt_stepper(recipe("llava", size, args, False, Path(tempfile.mkdtemp())))
    model = trainer.model
    batch = trainer.train_collator([trainer.dataset[i] for i in range(size["batch"])])["node_inputs"]["llm"]
    text_tokens = float(batch["attention_mask"].sum(1).float().mean())  # (prompt + target) per sample
    labelled = float((batch["labels"] != -100).sum(1).float().mean())
    vision, bridge, llm = model.nodes["vision"], model.nodes["bridge"], model.nodes["llm"]
    config = vision.config
    image_tokens = (config.image_size // config.patch_size) ** 2
    head = count(llm.model.get_output_embeddings())
    body = count(llm) - head - llm.model.get_input_embeddings().weight.numel()
    flops = (2 * count(vision) * (image_tokens + 1) + 6 * count(bridge) * image_tokens
             + 4 * body * (image_tokens + text_tokens) + 4 * head * labelled)
    for _ in range(args.warmup):
        step()
    seconds = statistics.median([step() for _ in range(args.steps)])
    achieved = flops * size["batch"] / seconds
    fp32 = gemm_flops(torch.float32, args.size)
    fast_bf16 = torch.ops.mkldnn._is_mkldnn_bf16_supported()
    bf16 = gemm_flops(torch.bfloat16, args.size if fast_bf16 else 512, repeats=3)
    print(f"LLaVA mid (ViT-B/16 224 px, MLP, 125M Llama), batch {size['batch']}, fp32, cache off: {seconds:.3f} s per step; "
          f"{text_tokens:.1f} text tokens and {labelled:.1f} labelled per sample; {flops / 1e9:.1f} GFLOP per sample; {machine()}")
    print("| ceiling | GEMM GFLOP/s | model GFLOP/s | MFU |\n|---|---|---|---|")
    print(f"| fp32 GEMM {args.size}^3 (the training dtype) | {fp32 / 1e9:.1f} | {achieved / 1e9:.1f} | {achieved / fp32:.1%} |")
    side = args.size if fast_bf16 else 512
    mfu = f"{achieved / bf16:.1%}" if fast_bf16 else "n/a: emulated, slower than fp32 (train refuses bf16 here)"
    print(f"| bf16 GEMM {side}^3 (bf16 matrix units: {'yes' if fast_bf16 else 'no'}) | {bf16 / 1e9:.2f} | {achieved / 1e9:.1f} | {mfu} |")
    best = max(fp32, bf16)
    print(f"against the fastest dtype here ({'fp32' if best == fp32 else 'bf16'}): MFU {achieved / best:.1%}")


if __name__ == "__main__":
    main()
