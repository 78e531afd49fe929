"""Checkpoint I/O: atomic directory writes, guarded readers of weight and card files, and resumable trainer state."""
from __future__ import annotations

import contextlib
import json
import logging
import os
import pickletools
import random
import re
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from safetensors.torch import load_file

from mmadapt.errors import CardError, MMAdaptError
from mmadapt.zoo import resolve_checkpoint

log = logging.getLogger("mmadapt.checkpoint")
TRAINER_STATE = "trainer_state.pt"
TRAINER_STATE_KEYS = ("step", "consumed", "optimizer", "scheduler", "rng", "history")
MAX_CARD_FILE_NODES = 200_000  # a card's recipe or metadata is a few hundred values; YAML aliases can fake billions
_WRITING: set[Path] = set()  # temporary folders this process is filling right now (never stale)


def _reason(exc: BaseException) -> str:
    """The first sentence of a library's error, never torch's advice to turn weights_only off."""
    text = str(exc).strip().splitlines()[0].split(". ")[0][:200] if str(exc).strip() else ""
    if "weights_only" in text:
        text = ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def read_safetensors(path: Path, error: type[MMAdaptError] = CardError) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file; a file that is not one (a pickle, cut short, a header that lies about its
    sizes) raises `error` naming the file. Safetensors parses no code, so this is the only check a weight file needs."""
    try:
        return load_file(str(path))
    except Exception as exc:  # noqa: BLE001 - SafetensorError, OSError, MemoryError ...: each means a bad file
        raise error(f"{path}: not a readable safetensors file ({_reason(exc)})") from None


def _pickle_calls_code(path: Path) -> bool:
    """Whether a raw (non-zip) pickle names a global or calls one; torch's own reader stops at newer protocols'
    opcodes before it sees them. pickletools only lists opcodes: nothing is unpickled."""
    try:
        with open(path, "rb") as handle:
            if handle.read(2) in (b"PK", b""):  # torch's zip format: its reader already named any global
                return False
            handle.seek(0)
            names = [op.name for op, _, _ in pickletools.genops(handle)]  # the whole stream, up to its STOP
        return bool(CODE_OPCODES.intersection(names))
    except Exception:  # noqa: BLE001 - not a pickle at all (a zip, garbage, cut short): the caller says "not readable"
        return False


CODE_OPCODES = {"GLOBAL", "STACK_GLOBAL", "INST", "OBJ", "REDUCE", "NEWOBJ", "NEWOBJ_EX"}


def read_torch_state(path: Path, error: type[MMAdaptError] = CardError, what: str = "trainer state") -> Any:
    """A `torch.save` file read with weights_only: tensors and plain containers only. A file carrying anything else
    (a pickled class or function) or a corrupt one raises `error` naming the file, never torch's own advice to load it
    with weights_only=False; nothing else is ever unpickled."""
    try:
        with warnings.catch_warnings():  # torch's notes on pickle protocols are noise here: the file is refused or fine
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise error(f"{path}: missing") from None
    except Exception as exc:  # noqa: BLE001 - zip, pickle and storage errors vary; all mean the file is unusable
        found = re.search(r"GLOBAL ([\w.]+)", str(exc))
        if found or _pickle_calls_code(path) or ("Weights only load failed" in str(exc)
                                                 and "Unsupported operand" not in str(exc)):
            held = f"'{found.group(1)}'" if found else "an object that is not a tensor or plain data"
            raise error(f"{path}: refused: it holds {held}, which would run code when loaded; mmadapt reads "
                        "checkpoints as tensors and plain data only") from None
        raise error(f"{path}: not a readable {what} ({_reason(exc)})") from None


def _check_plain(value: Any, path: Path, budget: list[int], seen: tuple[int, ...] = ()) -> None:
    """Refuse a self-referencing value, or one whose aliases expand past MAX_CARD_FILE_NODES values."""
    budget[0] -= 1
    if budget[0] < 0:
        raise CardError(f"{path}: more than {MAX_CARD_FILE_NODES:,} values once its aliases are expanded; not a card file")
    if isinstance(value, (dict, list)):
        if id(value) in seen:
            raise CardError(f"{path}: a value that contains itself (a recursive YAML alias); not a card file")
        for item in (value.values() if isinstance(value, dict) else value):
            _check_plain(item, path, budget, (*seen, id(value)))


def read_card_file(path: Path, kind: str = "") -> dict[str, Any]:
    """A card's JSON or YAML file as a mapping (JSON for `.json`, else YAML); not UTF-8, not parseable, not a
    mapping or absurdly large raises CardError naming the file and what is wrong."""
    kind = kind or ("JSON" if path.suffix == ".json" else "YAML")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CardError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    except OSError as exc:
        raise CardError(f"{path}: cannot be read ({_reason(exc)})") from None
    try:
        value = json.loads(text) if kind == "JSON" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError, RecursionError) as exc:
        raise CardError(f"{path}: not valid {kind} ({' '.join(str(exc).split())[:200]})") from None
    if not isinstance(value, dict):
        raise CardError(f"{path}: expected a {kind} mapping at the top, found {type(value).__name__}")
    _check_plain(value, path, [MAX_CARD_FILE_NODES])  # the parsers refuse nesting deeper than this walk can go
    return value


@contextlib.contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a temporary sibling folder, then rename it onto `final`; a crash leaves `final` as it was."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".tmp-{final.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    writing = tmp.resolve()
    _WRITING.add(writing)
    try:
        try:
            yield tmp
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        old = final.parent / f".old-{final.name}-{os.getpid()}"
        if final.exists():
            final.rename(old)
        tmp.rename(final)  # (a kill between the two renames leaves `old` + a complete `tmp`: see remove_stale_temp_dirs)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        _WRITING.discard(writing)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError, ValueError):
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_stale_temp_dirs(parent: Path, name_pattern: str) -> list[Path]:
    """Remove the `.tmp-NAME-PID` / `.old-NAME-PID` folders that atomic_dir left in `parent` when its writer was killed.

    Only names atomic_dir writes for targets matching `name_pattern` (a regex, e.g. `step-[0-9]+`), and only those whose
    writer is gone (its pid is no live process, or is this process, which is not writing them). A writer killed between
    its two renames left its target missing, the previous version in `.old-*` and the new one complete in `.tmp-*`:
    the new one is put in place rather than deleted. One log line per folder removed or restored.
    """
    pattern = re.compile(rf"\.(tmp|old)-(?P<name>{name_pattern})-(?P<pid>\d+)")
    if not parent.is_dir():
        return []
    stale = [p for p in sorted(parent.iterdir()) if (m := pattern.fullmatch(p.name)) and p.is_dir() and not p.is_symlink()
             and p.resolve() not in _WRITING and (int(m["pid"]) == os.getpid() or not _pid_alive(int(m["pid"])))]
    stale.sort(key=lambda p: p.name.startswith(".old-"))  # each `.tmp-*` first: it may be the newer complete copy
    removed = []
    for path in stale:
        kind, name, pid = pattern.fullmatch(path.name).group(1, "name", "pid")  # type: ignore[union-attr]
        final, old = parent / name, parent / f".old-{name}-{pid}"
        try:
            if kind == "tmp" and old.is_dir() and not final.exists():
                path.rename(final)
                log.info("finished the save of %s interrupted by the exit of process %s (from %s)", final, pid, path.name)
                continue
            shutil.rmtree(path)
        except OSError as exc:
            log.warning("could not remove stale %s: %s", path, _reason(exc))
            continue
        log.info("removed stale %s, left by process %s", path, pid)
        removed.append(path)
    return removed


def _weight_files(source: str) -> tuple[Path | str, list[str]]:
    """Safetensors files of a local folder or hub id, reading the shard index when there is one."""
    folder = Path(resolve_checkpoint(source))
    if folder.is_dir():
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            weight_map = read_card_file(index, "JSON").get("weight_map")
            if not isinstance(weight_map, dict):
                raise MMAdaptError(f"{index}: no 'weight_map' mapping")
            return folder, sorted(set(map(str, weight_map.values())))
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
        for key, value in read_safetensors(path, MMAdaptError).items():
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
    """The optimizer, scheduler, RNG and data position of a checkpoint; never unpickles code (see read_torch_state)."""
    path = directory / TRAINER_STATE
    state = read_torch_state(path)
    missing = [k for k in TRAINER_STATE_KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        raise CardError(f"{path}: not a trainer state written by mmadapt (missing {', '.join(missing)})")
    return state
