"""Checkpoint I/O: atomic directory writes, safetensors loading by prefix, and resumable trainer state."""
from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

from mmadapt.errors import MMAdaptError
from mmadapt.zoo import resolve_checkpoint

TRAINER_STATE = "trainer_state.pt"


@contextlib.contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a temporary sibling folder, then rename it onto `final`; a crash leaves `final` as it was."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".tmp-{final.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = final.parent / f".old-{final.name}-{os.getpid()}"
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def _weight_files(source: str) -> tuple[Path | str, list[str]]:
    """Safetensors files of a local folder or hub id, reading the shard index when there is one."""
    folder = Path(resolve_checkpoint(source))
    if folder.is_dir():
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            return folder, sorted(set(json.loads(index.read_text())["weight_map"].values()))
        if (folder / "model.safetensors").is_file():
            return folder, ["model.safetensors"]
        raise MMAdaptError(f"'{source}': no model.safetensors or model.safetensors.index.json in the folder")
    from huggingface_hub import hf_hub_download

    try:
        index = json.loads(Path(hf_hub_download(source, "model.safetensors.index.json")).read_text())
        files = sorted(set(index["weight_map"].values()))
    except Exception:  # noqa: BLE001 - the hub's errors vary by version; the next line names the failure
        files = ["model.safetensors"]
    try:
        return Path(hf_hub_download(source, files[0])).parent, files
    except Exception as exc:  # noqa: BLE001
        raise MMAdaptError(f"cannot read weights of '{source}' (no such folder, and the hub said: {str(exc).splitlines()[0]})") from None


def load_prefixed_tensors(source: str, prefixes: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """Tensors whose names start with one of `prefixes`, from a checkpoint folder or hub id."""
    folder, files = _weight_files(source)
    tensors: dict[str, torch.Tensor] = {}
    for name in files:
        path = Path(folder) / name
        if not path.exists():
            from huggingface_hub import hf_hub_download

            path = Path(hf_hub_download(str(source), name))
        for key, value in load_file(str(path)).items():
            if key.startswith(prefixes):
                tensors[key] = value
    if not tensors:
        raise MMAdaptError(f"'{source}' has no tensors starting with {', '.join(prefixes)}")
    return tensors


def rng_state() -> dict[str, Any]:
    """Every RNG the run draws from, in types that `torch.load(weights_only=True)` accepts."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:]),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate((state["python"][0], tuple(state["python"][1]), state["python"][2]))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy(), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_trainer_state(directory: Path, state: dict[str, Any]) -> None:
    torch.save(state, directory / TRAINER_STATE)


def load_trainer_state(directory: Path) -> dict[str, Any]:
    return torch.load(directory / TRAINER_STATE, weights_only=True)  # never unpickle code from a checkpoint
