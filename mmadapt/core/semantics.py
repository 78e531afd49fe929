"""Checks of what a recipe means that need no weights: places on disk, hub ids, inline config keys, adapter targets."""
from __future__ import annotations

import contextlib
import dataclasses
import difflib
import functools
import inspect
import logging
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Callable

from mmadapt.errors import MMAdaptError

if TYPE_CHECKING:
    from torch import nn

# A string starting so names a local path; `org/name` (one slash) is a hub id unless its first part exists here.
LOCAL_PREFIXES = ("/", "./", "../", "~")


@dataclass(frozen=True)
class Finding:
    """One thing a node or data class finds in its own arguments; `validate` adds where it stands in the recipe."""

    field: str  # the argument, e.g. "layer" or "config"
    message: str
    note: bool = False  # True: cannot be checked on this machine; printed beside the result, not an error


@dataclass(frozen=True)
class NodeContext:
    """What a node's checks may know of the graph around it."""

    name: str
    nodes: tuple[str, ...]  # every node of the graph
    feeders: tuple[str, ...]  # the nodes wired straight into this one
    fed_ports: tuple[str, ...] = ()  # this node's inputs that another node (not the data) feeds


def argument(cls: type, params: dict[str, Any], name: str) -> Any:
    """The recipe's value of a constructor argument, else its default (None when it has none)."""
    if name in params:
        return params[name]
    parameter = inspect.signature(cls.__init__).parameters.get(name)
    return None if parameter is None or parameter.default is parameter.empty else parameter.default


def shown(path: str) -> str:
    """A path for a message: a relative one says where relative paths start (the current folder, as datasets open them)."""
    return path if Path(path).expanduser().is_absolute() else f"{path} (relative paths start at the current folder, {Path.cwd()})"


def place_finding(value: Any, field: str, kind: str = "any") -> Finding | None:
    """A local path the recipe names, which must be a `kind` ("file", "folder" or "any") on this machine.

    Missing, it is an error either way: train would refuse it after loading the models. The message tells a typo (its
    folder exists) from data not fetched to this machine yet (its folder is missing too, as with the hub and GPU
    recipes' data/... and checkpoints/...).
    """
    if not isinstance(value, str) or not value:
        return None  # the type is checked with the constructor's annotations
    path = Path(value).expanduser()
    if path.exists():
        if kind == "file" and not path.is_file():
            return Finding(field, f"{shown(value)} is a folder; expected a file")
        if kind == "folder" and not path.is_dir():
            return Finding(field, f"{shown(value)} is a file; expected a folder")
        return None
    noun = "folder" if kind == "folder" else "file" if kind == "file" else "file or folder"
    if path.parent.is_dir():
        return Finding(field, f"no such {noun}: {shown(value)}")
    return Finding(field, f"{shown(value)} is not on this machine (nor its folder {path.parent}); make or fetch it before training")


def file_and_root_findings(params: dict[str, Any], root: str) -> list[Finding]:
    """A dataset's `path` is a file and its `root` (where the rows' relative paths start) a folder, where given."""
    found = [place_finding(params.get("path"), "path", "file"), place_finding(params.get(root), root, "folder")]
    return [f for f in found if f]


def looks_local(value: str) -> bool:
    """Whether a checkpoint/tokenizer string names a local path rather than a hub id."""
    if value.startswith(LOCAL_PREFIXES) or value.count("/") > 1 or Path(value).exists():
        return True
    return "/" in value and Path(value.split("/")[0]).exists()


def source_finding(value: Any, field: str, hub_file: str | None) -> Finding | None:
    """A checkpoint-like string: `zoo:NAME` must be a zoo member, a local path must exist, a hub id must be reachable.

    `hub_file` is a file every such hub repository holds (config.json, model_index.json); None for arguments that
    load local files only.
    """
    from mmadapt.zoo import resolve_checkpoint

    if not isinstance(value, str) or not value:
        return None
    if value.startswith("zoo:"):
        try:
            resolve_checkpoint(value)
        except MMAdaptError as exc:
            return Finding(field, str(exc))
        return None
    if hub_file is None or looks_local(value):
        return place_finding(value, field)
    return hub_finding(value, field, hub_file)


def hub_finding(value: str, field: str, hub_file: str) -> Finding | None:
    """A hub id offline and not in the local cache: a note, not a problem. The recipe is right, and it loads wherever
    the hub is reachable; only this shell's HF_HUB_OFFLINE=1 keeps it from downloading here. Online, load time decides."""
    import huggingface_hub
    from huggingface_hub.errors import HFValidationError

    try:
        cached = huggingface_hub.try_to_load_from_cache(value, hub_file)
    except HFValidationError as exc:
        return Finding(field, f"'{value}' is neither a local path nor a valid hub id ({str(exc).splitlines()[0]})")
    if isinstance(cached, str) or not huggingface_hub.is_offline_mode():
        return None
    return Finding(field, f"hub id '{value}' is not in the local cache and HF_HUB_OFFLINE=1: it loads where the hub is reachable",
                   note=True)


# --- inline config keys: config classes accept unknown keyword arguments, so a typo would pass silently ---
@functools.cache
def known_config_keys(config_cls: type) -> frozenset[str]:
    """The keys a config class understands: its constructor's, its fields', its default instance's attributes and aliases."""
    signature = inspect.signature(config_cls.__init__).parameters.values()
    keys = {p.name for p in signature if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
    if dataclasses.is_dataclass(config_cls):
        keys |= {f.name for f in dataclasses.fields(config_cls)}
        try:
            keys |= set(vars(config_cls()))
        except Exception:  # noqa: BLE001 - a config whose defaults do not build still has its fields
            pass
    keys |= set(getattr(config_cls, "attribute_map", None) or {})
    keys |= set(getattr(config_cls, "sub_configs", None) or {})
    return frozenset(keys)


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """transformers' logs silenced while a config is built: it logs a refused key at ERROR with the whole config
    printed, where mmadapt reports the problem itself, once, naming the field."""
    logger = logging.getLogger("transformers")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def consumed(config_cls: type, key: str, value: Any) -> bool:
    """Whether a transformers config class takes `key` as a legacy spelling (rope_theta into rope_parameters, torch_dtype
    into dtype) rather than keeping it as a stray attribute, which is what it does with a typo."""
    if not hasattr(config_cls, "to_dict"):
        return False  # dataclass configs refuse unknown keys themselves; open_clip's arguments are only its signature's
    try:
        with quiet_transformers():
            built = config_cls(**{key: value})
    except Exception:  # noqa: BLE001 - the class handles the key, and refuses this value: the config's reader reports that
        return True
    return key not in vars(built)


def config_key_findings(values: Any, config_cls: type, field: str = "config", sub_configs: dict[str, type] | None = None,
                        ignore: tuple[str, ...] = ("model_type",)) -> list[Finding]:
    """Each key of an inline config that `config_cls` does not know, with the nearest known one; nested sub-config
    mappings (CLIP's vision_config, open_clip's vision_cfg) are checked against their own classes."""
    if not isinstance(values, dict):
        return []
    known = known_config_keys(config_cls)
    subs = {**(getattr(config_cls, "sub_configs", None) or {}), **(sub_configs or {})}
    findings = []
    for key, value in values.items():
        if key in ignore:
            continue
        if str(key) not in known and not consumed(config_cls, str(key), value):
            close = difflib.get_close_matches(str(key), sorted(known), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            findings.append(Finding(field, f"unknown config key '{key}' for {config_cls.__name__}{hint}"))
        elif key in subs and isinstance(value, dict):
            sub = transformers_config_class(value.get("model_type")) if hasattr(subs[key], "for_model") else subs[key]
            if sub is not None:
                findings += config_key_findings(value, sub, f"{field}.{key}")
    return findings


def refuse_unknown_keys(values: dict[str, Any], config_cls: type, source: str) -> None:
    """Raise MMAdaptError naming each key of `values` that `config_cls` does not know (for config readers that refuse)."""
    unknown = config_key_findings(values, config_cls)
    if unknown:
        raise MMAdaptError(f"{source}: " + "; ".join(f.message for f in unknown))


def transformers_config_class(model_type: Any) -> type | None:
    """transformers' config class for a model_type; None for an unknown one (reported where the config is read)."""
    from transformers import CONFIG_MAPPING

    try:
        return CONFIG_MAPPING[model_type] if isinstance(model_type, str) else None
    except KeyError:
        return None


def inline_config_findings(config: Any) -> list[Finding]:
    """An inline transformers config (a mapping with model_type), checked key by key against its class."""
    if not isinstance(config, dict):
        return []
    config_cls = transformers_config_class(config.get("model_type"))
    return config_key_findings(config, config_cls) if config_cls is not None else []


def readable_config(read: Callable[[], Any]) -> Any:
    """`read()`, or None when the config cannot be read here (a hub id offline) or is wrong (reported by config_widths)."""
    from mmadapt.core.nodes import WidthUnknown

    try:
        return read()
    except (MMAdaptError, WidthUnknown):
        return None


def layer_finding(layer: Any, low: int, high: int, what: str) -> Finding | None:
    """`layer` must index within [low, high]; `what` says what it indexes, e.g. "the 13 hidden_states of a 12-layer tower"."""
    if isinstance(layer, bool) or not isinstance(layer, int) or low <= layer <= high:
        return None
    return Finding("layer", f"{layer} is out of range: it indexes {what}, so it must be in {low}..{high}")


# --- data sections ---
def data_class(section: Any) -> type | None:
    """The dataset class a data section names; None when it names none (reported by the constructor checks)."""
    from mmadapt.core.registry import DATA_TYPES, UnknownType, resolve

    if not isinstance(section, dict):
        return None
    try:
        return resolve(str(section.get("type", "")), DATA_TYPES)
    except UnknownType:
        return None


def section_fields(section: Any) -> frozenset[str] | None:
    """The fields every sample of a data section carries; None when its class does not say (a plugin dataset)."""
    cls = data_class(section)
    if cls is None:
        return None
    if hasattr(cls, "fields_for"):
        return cls.fields_for({k: v for k, v in section.items() if k != "type"})
    return getattr(cls, "fields", None)


def section_findings(section: Any) -> list[Finding]:
    """What a data section's class finds in its arguments (files and folders, mostly)."""
    cls = data_class(section)
    hook = getattr(cls, "param_problems", None)
    return hook({k: v for k, v in section.items() if k != "type"}) if hook is not None else []


# --- adapters ---
def module_suffixes(module: nn.Module, count: int = 10) -> list[str]:
    """The distinct last names of a module's leaf modules with weights, in order: what target_modules entries usually
    name (with its parent's name when the last is a number, as in to_out.0)."""
    seen: dict[str, None] = {}
    for name, child in module.named_modules():
        if name and not any(True for _ in child.children()) and any(True for _ in child.parameters(recurse=False)):
            parts = name.split(".")
            seen.setdefault(".".join(parts[-2:]) if parts[-1].isdigit() and len(parts) > 1 else parts[-1], None)
    return list(seen)[:count]


def adapter_findings(peft_config: Any, base: nn.Module, label: str) -> list[Finding]:
    """An adapter's target_modules against the base it goes into (built on the meta device): each must match a module.

    With no target_modules (the node's defaults were already filled into `peft_config`), peft's defaults for the
    base's model type are used; with none of those either, peft refuses at load, so it is refused here.
    """
    from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING
    from peft.tuners.tuners_utils import match_target_against_key

    targets = peft_config.target_modules
    model_type = getattr(getattr(base, "config", None), "model_type", None)
    names = [name for name, _ in base.named_modules() if name]
    where_from = ""
    if targets is None:
        tuner = PEFT_TYPE_TO_TUNER_MAPPING.get(peft_config.peft_type)
        targets = getattr(tuner, "target_module_mapping", {}).get(model_type) if model_type else None
        if targets is None:
            return [Finding("target_modules", f"not given, and neither the node nor peft names defaults for {label} "
                                              f"(model type {model_type or 'unknown'}); name some of its modules, e.g. "
                                              f"{', '.join(module_suffixes(base, 6))}")]
        where_from = f" (peft's default for model type {model_type})"
    if isinstance(targets, str):
        if any(match_target_against_key(targets, name) for name in names):
            return []
        return [Finding("target_modules", f"the pattern '{targets}'{where_from} matches no module of {label}; its modules "
                                          f"end in: {', '.join(module_suffixes(base))}")]
    missing = [t for t in targets if not any(name == t or name.endswith(f".{t}") for name in names)]
    return [Finding("target_modules", f"'{t}'{where_from} matches no module of {label}; its modules end in: "
                                      f"{', '.join(module_suffixes(base))}") for t in sorted(missing)]


def meta_built(build: Any) -> Any:
    """`build()` with every tensor on the meta device: a model's structure from its config, no memory, no weights."""
    import torch

    with torch.device("meta"):
        return build()


def read_config(checkpoint: str | None, config: dict[str, Any] | None) -> Any:
    """A transformers config from a folder/hub id (no weights) or from an inline dict with `model_type`."""
    from transformers import AutoConfig

    from mmadapt.core.nodes import WidthUnknown
    from mmadapt.zoo import resolve_checkpoint

    if (checkpoint is None) == (config is None):
        raise MMAdaptError("give exactly one of checkpoint (a folder, hub id or zoo:NAME) or config (with model_type)")
    if config is not None:
        config = dict(config)
        model_type = config.pop("model_type", None)
        if model_type is None:
            raise MMAdaptError("an inline config needs a model_type, e.g. clip_vision_model or llama")
        try:
            with quiet_transformers():
                return AutoConfig.for_model(model_type, **config)
        except Exception as exc:  # noqa: BLE001 - a config class raises what it likes (a read-only property: AttributeError)
            raise MMAdaptError(f"inline config ({model_type}): {type(exc).__name__}: {exc}") from None
    try:
        return AutoConfig.from_pretrained(resolve_checkpoint(checkpoint))
    except OSError as exc:
        raise WidthUnknown(f"cannot read the config of '{checkpoint}': {str(exc).splitlines()[0]}") from None
