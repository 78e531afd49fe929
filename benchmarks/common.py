"""Shared by the CPU benchmarks: one process per measured side, peak RSS, the machine, and mmadapt's timed Trainer."""
from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]


def current_rss_mb() -> float:
    """Resident memory now (VmRSS), from /proc: torch's CPU allocations are invisible to tracemalloc."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_mb() -> float:
    """The process's peak resident memory so far; Linux reports ru_maxrss in KiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def machine() -> dict[str, Any]:
    """What the figures were measured on, including how busy the machine was."""
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor())
    return {"cpu": model, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "load_average_1m": round(os.getloadavg()[0], 2), "python": platform.python_version()}


def run_child(script: str, args: list[str], env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run one measured side in a fresh interpreter, so its peak memory is its own; it prints one JSON line last."""
    done = subprocess.run([sys.executable, script, *args], capture_output=True, text=True, cwd=REPO,
                          env=dict(os.environ, HF_HUB_OFFLINE="1", **(env or {})))
    if done.returncode != 0:
        raise SystemExit(f"{script} {' '.join(args)} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def table(headers: list[str], rows: list[list[Any]]) -> str:
    """A GitHub markdown table, so the printout pastes into RESULTS.md as it is."""
    def cell(value: Any) -> str:
        return f"{value:.3g}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


class StopAfterSteps(Exception):
    """Raised by the timed Trainer after its last timed step, so no card or plot is written into the figures."""


def timed_mmadapt_run(raw: dict[str, Any], total_steps: int, warmup: int) -> dict[str, Any]:
    """Train a recipe mapping with mmadapt's own Trainer and return its step times and memory."""
    from mmadapt.training.trainer import Trainer
    from mmadapt.core.validate import check_recipe

    recipe, plan = check_recipe(raw, "benchmark")
    seconds: list[float] = []

    class TimedTrainer(Trainer):
        """The real loop; only its per-step record is read (the loop times each step from batch fetch to optimizer step)."""

        def _log(self, record: dict[str, Any]) -> None:
            super()._log(record)
            if "samples_per_s" in record:
                seconds.append(self.cfg.batch_size / record["samples_per_s"])
                if len(seconds) == total_steps:
                    raise StopAfterSteps

    trainer = TimedTrainer(recipe, plan)
    before = current_rss_mb()
    try:
        trainer.train()
    except StopAfterSteps:
        pass
    stats = getattr(trainer, "cache_stats", None)
    timed = seconds[warmup:]
    return {"seconds_per_step": median(timed), "steps_timed": len(timed), "rss_before_steps_mb": before,
            "peak_rss_mb": peak_rss_mb(), "batch": trainer.cfg.batch_size,
            "cache": None if stats is None else {"built": stats.built, "reused": stats.reused, "seconds": stats.seconds,
                                                 "bytes_per_sample": stats.bytes_per_sample}}
