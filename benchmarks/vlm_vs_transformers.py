"""BLIP-2- and LLaVA-style bridge training: mmadapt's Trainer against transformers' own model class, at equal settings.

    python benchmarks/vlm_vs_transformers.py --family blip2 --size mini
    python benchmarks/vlm_vs_transformers.py --family llava --size mid --batch 4

Three sides: `transformers` (Blip2ForConditionalGeneration / LlavaForConditionalGeneration with vision tower
and LM frozen by requires_grad_(False), the usual way), `mmadapt` (the same dims as a recipe, built and stepped
by mmadapt's Trainer), `mmadapt+cache` (the same, reading the frozen tower's features from the feature cache,
whose build is timed). Timing: all three live in one process and take one step each in turn (order reversed
every step), so the machine's load swings hit them alike; ratios are medians of the paired steps. Peak
memory: each side again alone in a fresh process (ru_maxrss; tracemalloc does not see torch's allocations).
Shared: random weights of equal dims, fp32, SDPA,
batch, data (digits, the instruction template, zoo:digits-lm's tokenizer), AdamW, cosine schedule, clipping
at 1.0, frozen parts in eval mode (no dropout), and what a step times: batch fetch and collation (image
processing, tokenization), forward, backward, optimizer step.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path
from collections.abc import Callable
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import current_rss_mb, machine, median, peak_rss_mb, run_child, table  # noqa: E402

TOKENIZER = "zoo:digits-lm"
PROMPT = "What does it show?"
MAX_TOKENS = 64  # mmadapt's max_text_tokens default; the baseline truncates the same way
# Per (family, size): the vision tower, the bridge and the LM, as plain dicts both sides are built from.
SIZES: dict[str, dict[str, Any]] = {
    "mini": {  # the miniature zoo's scale: digits-clip's 4x96 ViT on 32 px, digits-lm's 4x128 Llama
        "vision": {"hidden_size": 96, "intermediate_size": 384, "num_hidden_layers": 4, "num_attention_heads": 4,
                   "image_size": 32, "patch_size": 8},
        "qformer": {"num_queries": 8, "hidden_size": 64, "num_layers": 2, "num_heads": 4, "intermediate_size": 128,
                    "cross_attention_every": 1},
        "opt": {"vocab_size": 400, "hidden_size": 128, "ffn_dim": 384, "num_hidden_layers": 4, "num_attention_heads": 4,
                "word_embed_proj_dim": 128, "max_position_embeddings": 512},
        "llama": {"vocab_size": 400, "hidden_size": 128, "intermediate_size": 384, "num_hidden_layers": 4,
                  "num_attention_heads": 4, "num_key_value_heads": 4, "max_position_embeddings": 512},
        "batch": 32, "samples": 256,
    },
    "mid": {  # ViT-B/16 at 224 px; BLIP-2's own Q-Former (BERT-base, 32 queries); OPT-125m / a 125M Llama
        "vision": {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
                   "image_size": 224, "patch_size": 16},
        "qformer": {"num_queries": 32, "hidden_size": 768, "num_layers": 12, "num_heads": 12, "intermediate_size": 3072,
                    "cross_attention_every": 2},
        "opt": {"vocab_size": 50272, "hidden_size": 768, "ffn_dim": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
                "word_embed_proj_dim": 768, "max_position_embeddings": 2048},
        "llama": {"vocab_size": 32000, "hidden_size": 768, "intermediate_size": 2048, "num_hidden_layers": 12,
                  "num_attention_heads": 12, "num_key_value_heads": 12, "max_position_embeddings": 2048},
        "batch": 4, "samples": 64,
    },
}
LM_OF = {"blip2": "opt", "llava": "llama"}  # BLIP-2's OPT checkpoints; LLaVA's Vicuna is a Llama


def image_token(size: dict[str, Any], family: str) -> int:
    return size[LM_OF[family]]["vocab_size"] - 1  # an id the zoo tokenizer (399 tokens) never produces


# --- the mmadapt side: a recipe mapping ---
def recipe(family: str, size: dict[str, Any], args: argparse.Namespace, cache: bool, out: Path, compiled: bool = False) -> dict[str, Any]:
    vision = {"type": "hf_vision", "config": {"model_type": "clip_vision_model", **size["vision"]}}
    if family == "blip2":
        vision.update(layer=-1, keep_cls=True)  # BLIP-2 cross-attends to every token of the last layer
        q = size["qformer"]
        bridge = {"type": "qformer", "inputs": {"context": "vision"}, "num_queries": q["num_queries"], "hidden_size": q["hidden_size"],
                  "num_layers": q["num_layers"], "num_heads": q["num_heads"], "intermediate_size": q["intermediate_size"],
                  "cross_attention_every": q["cross_attention_every"], "dropout": 0.1}
        prefix_after_bos = False  # BLIP-2: [queries][bos prompt target]
    else:
        vision.update(layer=-2, keep_cls=False)  # LLaVA: penultimate layer, patches only ("default" strategy)
        bridge = {"type": "mlp_projector", "inputs": {"x": "vision"}, "num_layers": 2}
        prefix_after_bos = True  # LLaVA: [bos][image tokens][prompt target]
    lm = {"type": "causal_lm", "config": {"model_type": LM_OF[family], **size[LM_OF[family]]}, "tokenizer": TOKENIZER,
          "prefix_after_bos": prefix_after_bos, "inputs": {"prefix_embeds": "bridge"}}
    return {"name": f"bench-{family}", "graph": {"vision": vision, "bridge": bridge, "llm": lm},
            "data": {"type": "digits_captions", "split": "train", "style": "fixed", "template": "instruction", "prompt": PROMPT,
                     "limit": size["samples"]},
            "train": {"lr": 1e-4, "batch_size": args.batch or size["batch"], "steps": 10_000, "cache_frozen_features": cache,
                      "cache_dir": str(out / "cache"), "output_dir": str(out / "run"), "log_every": 10_000, "compile": compiled}}


# --- the transformers side: what a user writes with the model class ---
def hf_model(family: str, size: dict[str, Any]) -> Any:
    import torch
    from transformers import Blip2Config, Blip2ForConditionalGeneration, LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(0)
    lm = {"model_type": LM_OF[family], **size[LM_OF[family]]}
    if family == "blip2":
        q = size["qformer"]
        config = Blip2Config(vision_config=dict(size["vision"]), text_config=lm, num_query_tokens=q["num_queries"],
                             image_token_index=image_token(size, family),
                             qformer_config={"hidden_size": q["hidden_size"], "num_hidden_layers": q["num_layers"],
                                             "num_attention_heads": q["num_heads"], "intermediate_size": q["intermediate_size"],
                                             "cross_attention_frequency": q["cross_attention_every"],
                                             "encoder_hidden_size": size["vision"]["hidden_size"]})
        model = Blip2ForConditionalGeneration._from_config(config, attn_implementation="sdpa")
    else:
        config = LlavaConfig(vision_config={"model_type": "clip_vision_model", **size["vision"]}, text_config=lm,
                             image_token_index=image_token(size, family), vision_feature_layer=-2,
                             vision_feature_select_strategy="default", projector_hidden_act="gelu")
        model = LlavaForConditionalGeneration._from_config(config, attn_implementation="sdpa")
    tower = model.vision_model if family == "blip2" else model.model.vision_tower
    language = model.language_model if family == "blip2" else model.model.language_model
    tower.requires_grad_(False)
    language.requires_grad_(False)
    if family == "llava":
        model.lm_head.requires_grad_(False)
    model.train()
    tower.eval()  # frozen parts without dropout, as mmadapt keeps them
    language.eval()
    return model


def hf_stepper(family: str, size: dict[str, Any], batch: int) -> Callable[[], float]:
    import torch
    from torch.utils.data import DataLoader
    from transformers import CLIPImageProcessor, get_cosine_schedule_with_warmup

    from mmadapt.generators.causal_lm import IGNORE_INDEX, load_tokenizer
    from mmadapt.data.digits import DigitsCaptions

    model = hf_model(family, size)
    tokenizer = load_tokenizer(TOKENIZER)
    pixels = size["vision"]["image_size"]
    processor = CLIPImageProcessor(size={"shortest_edge": pixels}, crop_size={"height": pixels, "width": pixels})
    image_id = image_token(size, family)
    count = size["qformer"]["num_queries"] if family == "blip2" else (pixels // size["vision"]["patch_size"]) ** 2

    def collate(samples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        rows = []
        for s in samples:
            prompt = [tokenizer.bos_token_id] + tokenizer(s["prompt"], add_special_tokens=False)["input_ids"]
            target = tokenizer(s["target"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            ids, labels = (prompt + target)[:MAX_TOKENS], ([IGNORE_INDEX] * len(prompt) + target)[:MAX_TOKENS]
            at = 0 if family == "blip2" else 1  # where the image tokens go, as the processors place them
            rows.append((ids[:at] + [image_id] * count + ids[at:], labels[:at] + [IGNORE_INDEX] * count + labels[at:]))
        length = max(len(ids) for ids, _ in rows)
        input_ids = torch.full((len(rows), length), tokenizer.pad_token_id, dtype=torch.long)
        label_ids = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(rows), length), dtype=torch.long)
        for row, (ids, labels) in enumerate(rows):
            input_ids[row, : len(ids)], label_ids[row, : len(ids)], mask[row, : len(ids)] = torch.tensor(ids), torch.tensor(labels), 1
        return {"input_ids": input_ids, "attention_mask": mask, "labels": label_ids,
                "pixel_values": processor(images=[s["image"] for s in samples], return_tensors="pt")["pixel_values"]}

    data = DigitsCaptions("train", style="fixed", template="instruction", prompt=PROMPT, limit=size["samples"])
    loader = DataLoader(data, batch_size=batch, shuffle=True, drop_last=True, collate_fn=collate,
                        generator=torch.Generator().manual_seed(0))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    scheduler = get_cosine_schedule_with_warmup(optimizer, 0, 10_000)
    batches = [iter(loader)]

    def step() -> float:
        """One step as a user's loop runs it: fetch and collate, forward, backward, clip, optimizer and schedule."""
        started = time.perf_counter()
        try:
            inputs = next(batches[0])
        except StopIteration:
            batches[0] = iter(loader)
            inputs = next(batches[0])
        loss = model(**inputs).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()
        return time.perf_counter() - started

    return step


def mmadapt_stepper(raw: dict[str, Any]) -> tuple[Callable[[], float], Any]:
    """mmadapt's Trainer, built as `mmadapt train` builds it, stepped by the body of its loop at one process and
    one micro-batch (where the token weighting is exactly 1 and the reduce a no-op), so steps can interleave."""
    from mmadapt.data.collate import batch_to_device
    from mmadapt.training.trainer import Trainer, micro_batches
    from mmadapt.core.validate import check_recipe

    trainer = Trainer(*check_recipe(raw, "benchmark"))
    trainer.train_mode()
    acc, cfg = trainer.accelerator, trainer.cfg
    data = micro_batches(trainer.dataset, trainer.train_collator, cfg, 0, 1, 0)
    params = list(trainer.model.trainable_parameters().values())

    def step() -> float:
        started = time.perf_counter()
        _, batch = trainer._next_usable(data)
        loss = trainer.wrapped(batch_to_device(batch, acc.device))["loss"]
        acc.backward(loss)
        acc.clip_grad_norm_(params, cfg.max_grad_norm)
        trainer.optimizer.step()
        trainer.scheduler.step()
        trainer.optimizer.zero_grad(set_to_none=True)
        loss.item()
        return time.perf_counter() - started

    return step, trainer


def sides_of(args: argparse.Namespace) -> list[str]:
    """The compared sides: transformers' class first (the baseline), then mmadapt without and with the cache, and with
    `--compile` the same two with train.compile."""
    return ["transformers", "mmadapt", "mmadapt+cache"] + (["mmadapt+compile", "mmadapt+cache+compile"] if args.compile else [])


def child(args: argparse.Namespace) -> None:
    import logging

    logging.disable(logging.WARNING)
    size = SIZES[args.size]
    batch = args.batch or size["batch"]
    out = Path(args.workdir)
    total = args.warmup + args.steps
    if args.side == "interleaved":  # every side in one process, one step each in turn: load swings hit all alike
        steppers = {"transformers": hf_stepper(args.family, size, batch)}
        cached = None
        for side in sides_of(args)[1:]:
            steppers[side], trainer = mmadapt_stepper(recipe(args.family, size, args, "cache" in side, out, "compile" in side))
            cached = trainer if side == "mmadapt+cache" else cached
        names = list(steppers)
        times: dict[str, list[float]] = {n: [] for n in names}
        for index in range(total):
            for name in names if index % 2 == 0 else names[::-1]:
                times[name].append(steppers[name]())
        stats = cached.cache_stats
        result = {"batch": batch, "seconds": {n: t[args.warmup:] for n, t in times.items()},
                  "cache": {"built": stats.built, "seconds": stats.seconds, "bytes_per_sample": stats.bytes_per_sample}}
    else:  # one side alone in this process: its peak RSS
        if args.side == "transformers":
            step = hf_stepper(args.family, size, batch)
        else:
            step = mmadapt_stepper(recipe(args.family, size, args, "cache" in args.side, out, "compile" in args.side))[0]
        before = current_rss_mb()
        seconds = [step() for _ in range(total)]
        result = {"seconds_per_step": median(seconds[args.warmup:]), "rss_before_steps_mb": before,
                  "peak_rss_mb": peak_rss_mb(), "batch": batch}
    print(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", choices=["blip2", "llava"], default="blip2")
    parser.add_argument("--size", choices=list(SIZES), default="mini")
    parser.add_argument("--batch", type=int, help="samples per step (default: 32 mini, 4 mid)")
    parser.add_argument("--steps", type=int, default=8, help="timed steps per side, after warm-up")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=1, help="separate-process runs per side, for peak RSS")
    parser.add_argument("--compile", action="store_true", help="also mmadapt with train.compile (warm-up steps include compiling)")
    parser.add_argument("--side", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        return child(args)
    started = machine()
    common = ["--family", args.family, "--size", args.size, "--steps", str(args.steps), "--warmup", str(args.warmup)]
    common += ["--batch", str(args.batch)] if args.batch else []
    common += ["--compile"] if args.compile else []
    sides = sides_of(args)
    memory: dict[str, list[dict[str, Any]]] = {s: [] for s in sides}
    with tempfile.TemporaryDirectory(prefix="mmadapt-bench-") as tmp:
        workdir = str(Path(tmp) / "run")
        timing = run_child(__file__, common + ["--side", "interleaved", "--workdir", workdir])
        print("timing done", file=sys.stderr, flush=True)
        for round_index in range(args.rounds):  # the cache the timing run built is reused: these measure training only
            for side in sides if round_index % 2 == 0 else sides[::-1]:
                memory[side].append(run_child(__file__, common + ["--side", side, "--workdir", workdir, "--steps", "3"]))
                print(f"memory round {round_index + 1}: {side} peak {memory[side][-1]['peak_rss_mb']:.0f} MB", file=sys.stderr, flush=True)
    report(args, sides, timing, memory, started)


def report(args: argparse.Namespace, sides: list[str], timing: dict[str, Any], memory: dict[str, list[dict[str, Any]]],
           started: dict[str, Any]) -> None:
    batch, seconds = timing["batch"], timing["seconds"]
    base = seconds["transformers"]
    base_peak = median([m["peak_rss_mb"] for m in memory["transformers"]])
    rows = []
    for side in sides:
        paired = [b / t for b, t in zip(base, seconds[side])]  # samples/s ratio of steps taken side by side
        peaks = [m["peak_rss_mb"] for m in memory[side]]
        rows.append([side, batch / median(seconds[side]), median(paired), f"{min(paired):.2f}-{max(paired):.2f}", median(peaks),
                     median(peaks) / base_peak, median([m["peak_rss_mb"] - m["rss_before_steps_mb"] for m in memory[side]])])
    print(f"\n{args.family}, {args.size}: batch {batch}, fp32, SDPA; {len(base)} timed steps per side after {args.warmup} warm-up, "
          f"interleaved in one process; peak RSS from {args.rounds} separate process(es) per side")
    print(table(["side", "samples/s", "samples/s ratio vs transformers (median of paired steps)", "paired range",
                 "peak RSS MB", "peak RSS ratio", "MB added during steps"], rows))
    cache = timing["cache"]
    per_sample_build = cache["seconds"] / max(1, cache["built"])
    plain, cached = median(seconds["mmadapt"]) / batch, median(seconds["mmadapt+cache"]) / batch
    saving = plain - cached
    break_even = per_sample_build / saving if saving > 0 else math.inf
    print(table(["cache build s/sample", "bytes/sample", "s/sample without cache", "s/sample with cache", "break-even epoch"],
                [[per_sample_build, f"{cache['bytes_per_sample']:,.0f}", plain, cached,
                  f"{break_even:.2f}" if math.isfinite(break_even) else "never"]]))
    ended = machine()
    print(f"machine: {started['cpu']}, {started['cores']} cores, torch {started['torch']} ({started['torch_threads']} threads); "
          f"load average {started['load_average_1m']} at start, {ended['load_average_1m']} at end")


if __name__ == "__main__":
    main()
