"""Linear and MLP projectors (LLaVA, MAPL): map each encoder token into the generator's embedding space."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mmadapt.core.checkpoint_io import load_prefixed_tensors, read_card_file, read_torch_state
from mmadapt.core.nodes import Bridge
from mmadapt.core.params import PositiveInt
from mmadapt.core.semantics import Finding, NodeContext, argument, looks_local
from mmadapt.errors import MMAdaptError
from mmadapt.zoo import resolve_checkpoint

# Where LLaVA checkpoints keep the projector, in the order looked for: transformers' LlavaForConditionalGeneration
# (`linear_1`, `linear_2`; under `model.` since transformers 5), then the original LLaVA repo (`mm_projector.0`, `.2`,
# ...: nn.Sequential indices, GELUs between; a bare `mm_projector.weight` is LLaVA-1.0's linear one).
LLAVA_PREFIXES = ("model.multi_modal_projector.", "multi_modal_projector.", "model.mm_projector.", "mm_projector.")
# A full model's weights first (its projector is the fine-tuned one), then stage 1's projector-only mm_projector.bin.
LLAVA_WEIGHT_FILES = ("model.safetensors.index.json", "model.safetensors", "pytorch_model.bin.index.json",
                      "pytorch_model.bin", "mm_projector.bin")
LLAVA_LAYER = re.compile(r"(?:linear_(?P<hf>[1-9]\d*)\.|(?P<seq>\d*[02468])\.)?(?P<kind>weight|bias)")


def _fetch(source: str, folder: Path, name: str, failures: list[str]) -> Path | None:
    """`name` in a local checkpoint folder, or downloaded from the hub repository `source`; None when it has none."""
    if folder.is_dir():
        return folder / name if (folder / name).is_file() else None
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(source, name))
    except Exception as exc:  # noqa: BLE001 - missing file, offline, no such repo: the caller names what it looked for
        failures.append(str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__)
        return None


def _bin_tensors(path: Path) -> dict[str, torch.Tensor]:
    """The projector tensors of a torch.save file (read as tensors only, never unpickling code)."""
    state = read_torch_state(path, MMAdaptError, "checkpoint")
    if not isinstance(state, dict):
        raise MMAdaptError(f"{path}: not a state dict (found {type(state).__name__})")
    return {k: v for k, v in state.items() if isinstance(k, str) and k.startswith(LLAVA_PREFIXES) and isinstance(v, torch.Tensor)}


def read_llava_projector(source: str) -> dict[str, torch.Tensor]:
    """The projector tensors of a LLaVA checkpoint (folder, zoo:NAME or hub id), in either layout."""
    folder, failures = Path(resolve_checkpoint(source)).expanduser(), []
    if looks_local(source) and not folder.is_dir():
        raise MMAdaptError(f"init_from '{source}': no such folder")
    for name in LLAVA_WEIGHT_FILES:
        path = _fetch(source, folder, name, failures)
        if path is None:
            continue
        if name.startswith("model.safetensors"):
            # raises naming the folder and the prefixes when it holds none
            return load_prefixed_tensors(str(folder) if folder.is_dir() else source, LLAVA_PREFIXES)
        tensors: dict[str, torch.Tensor] = {}
        if name.endswith(".index.json"):  # only the shards that hold the projector are read
            weight_map = read_card_file(path, "JSON").get("weight_map")
            if not isinstance(weight_map, dict):
                raise MMAdaptError(f"{path}: no 'weight_map' mapping")
            for shard in sorted({str(f) for k, f in weight_map.items() if str(k).startswith(LLAVA_PREFIXES)}):
                shard_path = _fetch(source, folder, shard, failures)
                if shard_path is None:
                    raise MMAdaptError(f"'{source}': {shard}, named in {name}, is missing")
                tensors.update(_bin_tensors(shard_path))
        else:
            tensors = _bin_tensors(path)
        if not tensors:
            raise MMAdaptError(f"'{source}' has no tensors starting with {', '.join(LLAVA_PREFIXES)}")
        return tensors
    hub = f" (the hub said: {failures[0]})" if failures and not folder.is_dir() else ""
    raise MMAdaptError(f"'{source}': no {', '.join(LLAVA_WEIGHT_FILES)} to read a LLaVA projector from{hub}")


def llava_layers(source: str, tensors: dict[str, torch.Tensor]) -> list[dict[str, tuple[str, torch.Tensor]]]:
    """The checkpoint's linear layers in order, each {"weight"|"bias": (checkpoint name, tensor)}."""
    prefix = next(p for p in LLAVA_PREFIXES if any(k.startswith(p) for k in tensors))
    layers: dict[int, dict[str, tuple[str, torch.Tensor]]] = {}
    for key in sorted(k for k in tensors if k.startswith(prefix)):
        found = LLAVA_LAYER.fullmatch(key[len(prefix):])
        if found is None:
            raise MMAdaptError(f"init_from '{source}': {key} is not a layer of a linear or GELU-MLP projector; "
                               "this LLaVA variant's projector does not fit linear_projector or mlp_projector")
        index = int(found["hf"]) - 1 if found["hf"] else int(found["seq"]) // 2 if found["seq"] else 0
        layers.setdefault(index, {})[found["kind"]] = (key, tensors[key])
    if sorted(layers) != list(range(len(layers))):
        raise MMAdaptError(f"init_from '{source}': its projector layers under {prefix} are not consecutive "
                           f"({', '.join(sorted(k for k in tensors if k.startswith(prefix)))})")
    return [layers[i] for i in range(len(layers))]


def copy_llava_projector(bridge: str, source: str, linears: list[tuple[str, nn.Linear]]) -> None:
    """Copy a LLaVA checkpoint's projector into `linears` (the bridge's nn.Linear layers, by state-dict name)."""
    layers = llava_layers(source, read_llava_projector(source))
    if len(layers) != len(linears):
        held = f"a {len(layers)}-layer projector ({layers[0].get('weight', next(iter(layers[0].values())))[0]}, ...)"
        fix = (f"use type: mlp_projector with num_layers: {len(layers)}" if bridge == "linear_projector"
               else f"set num_layers: {len(layers)}" + (" (or use type: linear_projector)" if len(layers) == 1 else ""))
        raise MMAdaptError(f"init_from '{source}' holds {held}; this {bridge} has {len(linears)}: {fix}")
    wrong = []
    for layer, (name, linear) in zip(layers, linears):
        for kind, own in (("weight", linear.weight), ("bias", linear.bias)):
            if kind not in layer:
                wrong.append(f"missing the {kind} of {name}")
            elif layer[kind][1].shape != own.shape:
                held_shape = tuple(layer[kind][1].shape)
                wrong.append(f"{layer[kind][0]} -> {name}.{kind}: checkpoint {held_shape} vs bridge {tuple(own.shape)}")
    if wrong:
        shapes = [layer["weight"][1].shape for layer in layers if "weight" in layer]
        sizes = (f"; the checkpoint maps width {shapes[0][1]} (in_dim) to {shapes[-1][0]} (out_dim)"
                 + (f" through hidden_dim {shapes[0][0]}" if len(shapes) > 1 else "")) if len(shapes) == len(layers) else ""
        raise MMAdaptError(f"init_from '{source}' does not fit this {bridge} ({'; '.join(wrong[:3])}){sizes}; "
                           "match its sizes in the recipe")
    with torch.no_grad():
        for layer, (_, linear) in zip(layers, linears):
            linear.weight.copy_(layer["weight"][1])
            linear.bias.copy_(layer["bias"][1])


def llava_config_layers(source: Any) -> int | None:
    """How many linear layers a local LLaVA checkpoint's config.json says its projector has; None when it does not say."""
    if not isinstance(source, str) or not source or not (source.startswith("zoo:") or looks_local(source)):
        return None
    try:
        path = Path(resolve_checkpoint(source)).expanduser() / "config.json"
        config = read_card_file(path, "JSON") if path.is_file() else {}
    except MMAdaptError:
        return None  # an unknown zoo member or a broken config: source_params and load report it
    if "mm_hidden_size" in config or "mm_projector_type" in config:  # the original LLaVA repo's builder; LLaVA-1.0 has no type
        kind = config.get("mm_projector_type", "linear")
        found = re.fullmatch(r"mlp(\d+)x_gelu", str(kind))
        return 1 if kind == "linear" else int(found[1]) if found else None
    if str(config.get("model_type", "")).startswith("llava") and "text_config" in config:
        return 2  # transformers' LLaVA projectors are linear_1, GELU, linear_2
    return None


def layer_findings(bridge: str, layers: int, params: dict[str, Any]) -> list[Finding]:
    """init_from's config against the bridge's layer count, before any weights load."""
    held = llava_config_layers(params.get("init_from"))
    if held is None or held == layers:
        return []
    if bridge == "linear_projector":
        return [Finding("init_from", f"{params['init_from']} holds a {held}-layer projector; linear_projector is one "
                                     f"layer: use type: mlp_projector with num_layers: {held}")]
    return [Finding("num_layers", f"{layers}, but init_from {params['init_from']} holds a {held}-layer projector: "
                                  f"set num_layers: {held}")]


class LinearProjector(Bridge):
    """One linear map per token, as LLaVA-1.0."""

    source_params = {"init_from": "config.json"}

    @classmethod
    def param_problems(cls, params: dict[str, Any], context: NodeContext) -> list[Finding]:
        """init_from's projector is one linear layer."""
        return layer_findings("linear_projector", 1, params)

    def __init__(
        self,
        in_dim: PositiveInt,
        out_dim: PositiveInt,
        init_from: str | None = None,  # folder or hub id of a LLaVA-1.0 checkpoint (a one-layer projector) to start from
    ) -> None:
        super().__init__()
        self.in_dim, self.out_dim = in_dim, out_dim
        self.proj = nn.Linear(in_dim, out_dim)
        if init_from is not None:
            copy_llava_projector("linear_projector", init_from, [("proj", self.proj)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)  # (B, N, in_dim) -> (B, N, out_dim)


class MLPProjector(Bridge):
    """LLaVA-1.5's GELU MLP; `num_layers: 2` is its mlp2x_gelu.

    Layer i is `mlp.{2i}` as in LLaVA's own nn.Sequential, so `init_from` copies a LLaVA checkpoint's projector.
    """

    source_params = {"init_from": "config.json"}

    @classmethod
    def param_problems(cls, params: dict[str, Any], context: NodeContext) -> list[Finding]:
        """init_from's projector has num_layers linear layers."""
        layers = argument(cls, params, "num_layers")
        if not isinstance(layers, int) or isinstance(layers, bool) or layers < 1:
            return []  # a value of the wrong type or sign is reported from the annotations
        return layer_findings("mlp_projector", layers, params)

    def __init__(
        self,
        in_dim: PositiveInt,
        out_dim: PositiveInt,
        hidden_dim: PositiveInt | None = None,  # defaults to out_dim, as LLaVA's
        num_layers: PositiveInt = 2,
        init_from: str | None = None,  # folder or hub id of a LLaVA checkpoint (transformers' or LLaVA's layout) to start from
    ) -> None:
        super().__init__()
        self.in_dim, self.out_dim = in_dim, out_dim
        hidden = hidden_dim or out_dim
        dims = [in_dim] + [hidden] * (num_layers - 1) + [out_dim]
        layers: list[nn.Module] = []
        for index, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
            if index:
                layers.append(nn.GELU())
            layers.append(nn.Linear(a, b))
        self.mlp = nn.Sequential(*layers)
        if init_from is not None:
            linears = [(f"mlp.{i}", m) for i, m in enumerate(self.mlp) if isinstance(m, nn.Linear)]
            copy_llava_projector("mlp_projector", init_from, linears)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x)  # (B, N, in_dim) -> (B, N, out_dim)
