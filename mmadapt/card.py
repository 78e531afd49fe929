"""The bridge card: trainable tensors keyed by node, the resolved recipe, and what they were trained on."""
from __future__ import annotations

import copy
import dataclasses
import datetime
import importlib.metadata
import json
from pathlib import Path
from typing import Any

import yaml
from safetensors.torch import load_file, save_file

from mmadapt.checkpoint_io import atomic_dir
from mmadapt.errors import CardError
from mmadapt.model import AssembledModel

CARD_FORMAT = "mmadapt-card/1"
WEIGHTS_FILE = "bridge.safetensors"
RECIPE_FILE = "recipe.yaml"
META_FILE = "card.json"
LIBRARIES = ("mmadapt", "torch", "transformers", "diffusers", "peft", "accelerate", "open_clip_torch", "safetensors")


def library_versions() -> dict[str, str]:
    versions = {}
    for name in LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def resolved_recipe(model: AssembledModel) -> dict[str, Any]:
    """The recipe as run: every train option spelled out and every inferred bridge width written in."""
    raw = copy.deepcopy(model.recipe.raw)
    raw["train"] = dataclasses.asdict(model.recipe.train)
    for name, dims in model.plan.bridge_dims.items():
        raw["graph"][name].update(dims)
    return raw


def card_metadata(model: AssembledModel) -> dict[str, Any]:
    tensors = model.trainable_parameters()
    return {
        "format": CARD_FORMAT,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "bases": {n: m.describe() for n, m in model.nodes.items() if n not in model.bridges()},
        "widths": {n: m.widths() for n, m in model.nodes.items()},
        "trainable_parameters": sum(p.numel() for p in tensors.values()),
        "trainable_tensors": {k: list(p.shape) for k, p in tensors.items()},
        "libraries": library_versions(),
    }


def write_card(model: AssembledModel, directory: Path) -> None:
    """Write the card's files into an existing folder (callers make it atomic)."""
    tensors = {k: p.detach().cpu().contiguous() for k, p in model.trainable_parameters().items()}
    save_file(tensors, str(directory / WEIGHTS_FILE), metadata={"format": CARD_FORMAT})
    (directory / RECIPE_FILE).write_text(yaml.safe_dump(resolved_recipe(model), sort_keys=False))
    (directory / META_FILE).write_text(json.dumps(card_metadata(model), indent=2))
    export_peft_adapters(model, directory / "peft")
    if model.decoder.output == "image":
        from mmadapt.diffusers_export import export_diffusers

        export_diffusers(model, directory / "diffusers")


def save_card(model: AssembledModel, directory: str | Path) -> Path:
    """Save a card atomically: a crash mid-save leaves any previous card at `directory` intact."""
    directory = Path(directory)
    with atomic_dir(directory) as tmp:
        write_card(model, tmp)
    return directory


def peft_config_of(module: Any) -> Any | None:
    """The peft config injected into a module under the default adapter name, if any."""
    configs = getattr(module, "peft_config", None)
    return configs.get("default") if configs else None


def export_peft_adapters(model: AssembledModel, folder: Path) -> None:
    """Also write each node's LoRA in peft's own layout, so `PeftModel.from_pretrained(base, dir)` loads it."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils import get_peft_model_state_dict

    for name, node in model.nodes.items():
        spec = model.recipe.nodes[name]
        for inner in dict.fromkeys(a.get("target") or node.adapter_target for a in spec.adapters):
            target = getattr(node, inner)
            if not any(isinstance(m, BaseTunerLayer) for m in target.modules()):
                continue
            config = peft_config_of(target)
            if config is None:
                continue
            out = folder / (name if inner == node.adapter_target else f"{name}.{inner}")
            out.mkdir(parents=True, exist_ok=True)
            state = get_peft_model_state_dict(target)
            save_file({f"base_model.model.{k}": v.contiguous() for k, v in state.items()}, str(out / "adapter_model.safetensors"))
            config.save_pretrained(str(out))


def read_card(directory: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """The card's resolved recipe and metadata; a missing or foreign folder gets a clear message."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CardError(f"{directory}: no such card folder")
    missing = [f for f in (WEIGHTS_FILE, RECIPE_FILE, META_FILE) if not (directory / f).is_file()]
    if missing:
        raise CardError(f"{directory}: not a bridge card (missing {', '.join(missing)})")
    meta = json.loads((directory / META_FILE).read_text())
    if meta.get("format") != CARD_FORMAT:
        raise CardError(f"{directory}: card format {meta.get('format')!r}, this mmadapt reads {CARD_FORMAT}")
    return yaml.safe_load((directory / RECIPE_FILE).read_text()), meta


def check_card_fits(model: AssembledModel, meta: dict[str, Any], directory: Path) -> None:
    """Compare the card's bases and widths with the graph's; raise one error listing every difference."""
    differences = []
    for name, base in meta["bases"].items():
        if name not in model.nodes:
            differences.append(f"graph.{name}: the card was trained with this node; the graph has none")
            continue
        here = model.nodes[name].describe()
        if here.get("config_hash") != base.get("config_hash"):
            differences.append(
                f"graph.{name}: the card was trained on {base.get('source')} (config {base.get('config_hash')}), "
                f"this graph has {here.get('source')} (config {here.get('config_hash')})"
            )
    for name, widths in meta["widths"].items():
        if name in model.nodes and model.nodes[name].widths() != widths:
            differences.append(f"graph.{name}: widths {model.nodes[name].widths()} here, {widths} in the card")
    if differences:
        raise CardError(f"{directory} does not fit this graph:\n  - " + "\n  - ".join(differences))


def load_card_weights(model: AssembledModel, directory: str | Path, check_bases: bool = True) -> None:
    """Load a card's trainable tensors onto a graph; every key and shape must match."""
    directory = Path(directory)
    _, meta = read_card(directory)
    if check_bases:
        check_card_fits(model, meta, directory)
    tensors = load_file(str(directory / WEIGHTS_FILE))
    own = model.trainable_parameters()
    problems = [f"{k}: missing from the card" for k in own if k not in tensors]
    problems += [f"{k}: in the card but not trainable in this graph" for k in tensors if k not in own]
    problems += [f"{k}: shape {tuple(tensors[k].shape)} in the card, {tuple(p.shape)} here" for k, p in own.items() if k in tensors and tensors[k].shape != p.shape]
    if problems:
        raise CardError(f"{directory} does not fit this graph:\n  - " + "\n  - ".join(problems[:10]))
    for key, param in own.items():
        param.data.copy_(tensors[key].to(param.dtype))
