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
from safetensors.torch import save_file

from mmadapt.core.nodes import peft_config_of
from mmadapt.core.checkpoint_io import atomic_dir, read_card_file, read_safetensors
from mmadapt.errors import CardError
from mmadapt.core.model import AssembledModel

CARD_FORMAT = "mmadapt-card/1"
WEIGHTS_FILE = "bridge.safetensors"
RECIPE_FILE = "recipe.yaml"
META_FILE = "card.json"
META_MAPPINGS = ("bases", "widths")  # card.json keys the loaders read: node name -> a mapping each
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
        "bases": {n: {**m.describe(), "weights": m.weights_fingerprint()} for n, m in model.nodes.items() if n not in model.bridges()},
        "adapters": adapter_settings(model),
        "widths": {n: m.widths() for n, m in model.nodes.items()},
        "trainable_parameters": sum(p.numel() for p in tensors.values()),
        "trainable_tensors": {k: list(p.shape) for k, p in tensors.items()},
        "libraries": library_versions(),
    }


# What fixes an adapter's function besides its tensors' shapes (alpha scales them; the targets say where they go).
ADAPTER_SETTINGS = ("peft_type", "r", "lora_alpha", "alpha", "target_modules", "use_rslora", "use_dora", "rank_pattern",
                    "alpha_pattern", "decompose_both", "decompose_factor", "use_effective_conv2d", "layers_to_transform")


def adapter_settings(model: AssembledModel) -> dict[str, dict[str, Any]]:
    """`node.inner` -> the settings of the peft adapter in it, as peft applied them (defaults filled in)."""
    found = {}
    for name, node in model.nodes.items():
        for inner in dict.fromkeys(a.get("target") or node.adapter_target for a in model.recipe.nodes[name].adapters):
            config = peft_config_of(getattr(node, inner, None))
            if config is not None:
                values = config.to_dict()
                found[f"{name}.{inner}"] = {k: sorted(v) if isinstance(v, (set, list, tuple)) else v
                                            for k, v in values.items() if k in ADAPTER_SETTINGS and v is not None}
    return json.loads(json.dumps(found, default=str))  # as card.json will read back


def same_base(card_base: dict[str, Any], here: dict[str, Any], weights: str) -> bool:
    """Same config, and the same weights where the card recorded them (cards written before weights were recorded
    carry the config hash only)."""
    return card_base.get("config_hash") == here.get("config_hash") and card_base.get("weights") in (None, weights)


def write_card(model: AssembledModel, directory: Path, exports: bool = True) -> None:
    """Write the card's files into an existing folder (callers make it atomic). `exports`: also the files stock
    libraries load (peft, and the generator's own); a training checkpoint leaves them out, so that an export that
    fails cannot take the trained tensors and the optimizer state down with it."""
    tensors = {k: p.detach().cpu().contiguous() for k, p in model.trainable_parameters().items()}
    save_file(tensors, str(directory / WEIGHTS_FILE), metadata={"format": CARD_FORMAT})
    (directory / RECIPE_FILE).write_text(yaml.safe_dump(resolved_recipe(model), sort_keys=False))
    (directory / META_FILE).write_text(json.dumps(card_metadata(model), indent=2))
    if exports:
        export_peft_adapters(model, directory / "peft")
        model.generator.export(model, directory)  # the files stock libraries load for this kind of generator, if any


def save_card(model: AssembledModel, directory: str | Path) -> Path:
    """Save a card atomically: a crash mid-save leaves any previous card at `directory` intact."""
    directory = Path(directory)
    with atomic_dir(directory) as tmp:
        write_card(model, tmp)
    return directory


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
    meta = read_card_file(directory / META_FILE)
    if meta.get("format") != CARD_FORMAT:
        raise CardError(f"{directory / META_FILE}: card format {str(meta.get('format'))[:80]!r}, this mmadapt reads {CARD_FORMAT}")
    for key in META_MAPPINGS:  # {node: {...}}, read by check_card_fits and from_card
        value = meta.get(key)
        for where, entry in (((f"{key}.{n}", v) for n, v in value.items()) if isinstance(value, dict) else [(key, value)]):
            if not isinstance(entry, dict):
                found = "nothing" if entry is None else type(entry).__name__
                raise CardError(f"{directory / META_FILE}: '{where}' must be a mapping, found {found}")
    return read_card_file(directory / RECIPE_FILE), meta


def refuse_card_code(raw: dict[str, Any], directory: str | Path, trust_code: bool = False) -> None:
    """Unless trusted, refuse a card whose recipe names code outside mmadapt's tables, before anything is imported:
    loading would import the module a dotted `type:` names, and a card is data someone else may have written."""
    from mmadapt.core.registry import foreign_types

    found = [] if trust_code else foreign_types(raw)
    if found:
        listed = "; ".join(f"{where}: '{name}' would import module '{name.rpartition('.')[0]}'" for where, name in found[:5])
        raise CardError(f"{Path(directory) / RECIPE_FILE}: the card names code outside mmadapt ({listed}). Nothing was "
                        "imported. If you trust this card, pass --trust-card-code (trust_code=True in Python).")


def check_card_fits(model: AssembledModel, meta: dict[str, Any], directory: Path) -> None:
    """Compare the card's bases and widths with the graph's; raise one error listing every difference."""
    differences = []
    for name, base in meta["bases"].items():
        if name not in model.nodes:
            differences.append(f"graph.{name}: the card was trained with this node; the graph has none")
            continue
        here = model.nodes[name].describe()
        weights = model.nodes[name].weights_fingerprint()
        if here.get("config_hash") != base.get("config_hash"):
            differences.append(
                f"graph.{name}: the card was trained on {base.get('source')} (config {base.get('config_hash')}), "
                f"this graph has {here.get('source')} (config {here.get('config_hash')})"
            )
        elif not same_base(base, here, weights):
            differences.append(
                f"graph.{name}: same config, other weights: the card was trained on {base.get('source')} with weights "
                f"{base.get('weights')}, this graph's {here.get('source')} has weights {weights} (another seed, a fine-tune "
                "or another dtype of the same model)"
            )
    if isinstance(meta.get("adapters"), dict):  # cards written before adapters were recorded carry none
        here_adapters = adapter_settings(model)
        for key in sorted(set(meta["adapters"]) | set(here_adapters)):
            theirs, ours = meta["adapters"].get(key), here_adapters.get(key)
            if theirs != ours:
                changed = sorted(k for k in set(theirs or {}) | set(ours or {}) if (theirs or {}).get(k) != (ours or {}).get(k))
                differences.append(f"graph.{key}: adapter settings differ from the card's ({', '.join(changed) or 'presence'}: "
                                   f"{ {k: (theirs or {}).get(k) for k in changed} } in the card, "
                                   f"{ {k: (ours or {}).get(k) for k in changed} } here)")
    for name, widths in meta["widths"].items():
        # every port the card recorded must have its width; a port added to the node since (a newer mmadapt's, such as
        # the diffusion generator's ip_tokens) is not a difference: the card's tensors never touched it
        if name not in model.nodes:
            continue
        here = model.nodes[name].widths()
        if {port: here.get(port) for port in widths} != widths:
            differences.append(f"graph.{name}: widths {here} here, {widths} in the card")
    if differences:
        raise CardError(f"{directory} does not fit this graph:\n  - " + "\n  - ".join(differences))


def load_card_weights(model: AssembledModel, directory: str | Path, check_bases: bool = True) -> None:
    """Load a card's trainable tensors onto a graph; every key and shape must match."""
    directory = Path(directory)
    _, meta = read_card(directory)
    if check_bases:
        check_card_fits(model, meta, directory)
    tensors = read_safetensors(directory / WEIGHTS_FILE)
    own = model.trainable_parameters()
    problems = [f"{k}: missing from the card" for k in own if k not in tensors]
    problems += [f"{k}: in the card but not trainable in this graph" for k in tensors if k not in own]
    problems += [f"{k}: shape {tuple(tensors[k].shape)} in the card, {tuple(p.shape)} here" for k, p in own.items() if k in tensors and tensors[k].shape != p.shape]
    if problems:
        raise CardError(f"{directory} does not fit this graph:\n  - " + "\n  - ".join(problems[:10]))
    for key, param in own.items():
        param.data.copy_(tensors[key].to(param.dtype))
