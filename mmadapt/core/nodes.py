"""The contract every graph node keeps: its role, default inputs, and how its widths are known (the generator's own
contract is in mmadapt.core.generator)."""
from __future__ import annotations

import copy
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Iterator

import torch
from torch import nn

from mmadapt.errors import DataError

if TYPE_CHECKING:
    from mmadapt.core.semantics import Finding, NodeContext


def each_or_error(function: Callable[[Any], Any], samples: list[Any]) -> list[Any]:
    """`function` of each sample, a sample it refuses (DataError) returned as that error so the others go on."""
    results: list[Any] = []
    for sample in samples:
        try:
            results.append(function(sample))
        except DataError as exc:
            results.append(exc)
    return results


@contextmanager
def adapters_off(module: nn.Module) -> Iterator[None]:
    """Run `module` as its frozen base: every peft adapter layer inside it is switched off, then restored as it was.

    A text_alignment teacher must be the base model. With adapters on in the teacher too, the adapters could meet the
    alignment by making the model ignore the tokens it is given, the bridge's and the spelled text's alike.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in module.modules() if isinstance(m, BaseTunerLayer)]
    enabled = [not layer.disable_adapters for layer in layers]
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer, was_enabled in zip(layers, enabled):
            layer.enable_adapters(was_enabled)


def merged(module: nn.Module) -> nn.Module:
    """A copy of `module` with every peft adapter layer merged into its base layer and unwrapped, so its state dict
    has the base model's own key names; the original keeps its adapters. peft's merge is used, not a hand-written one."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    copied = copy.deepcopy(module)
    for name, layer in list(copied.named_modules()):
        if isinstance(layer, BaseTunerLayer):
            layer.merge()
            parent_name, _, child = name.rpartition(".")
            parent = copied.get_submodule(parent_name) if parent_name else copied
            setattr(parent, child, layer.get_base_layer())
    return copied


def peft_config_of(module: Any) -> Any | None:
    """The peft config injected into a module under the default adapter name, if any."""
    configs = getattr(module, "peft_config", None)
    return configs.get("default") if configs else None


class WidthUnknown(Exception):
    """A base model's config cannot be read without loading (e.g. a hub id offline)."""


class Node(nn.Module):
    """Base of encoders, bridges and generators. A node's constructor signature is its recipe schema."""

    role: ClassVar[str] = "bridge"
    # The attribute holding the inner model that adapters such as LoRA are injected into.
    adapter_target: ClassVar[str] = "model"
    # Per inner model, the modules an adapter targets when the recipe names none (None: peft's default for the model).
    adapter_modules: ClassVar[dict[str, list[str]]] = {}
    # Inputs a node gets without the recipe naming them, e.g. an image encoder reads `data.image`.
    default_inputs: ClassVar[dict[str, str]] = {}

    # Arguments naming a checkpoint (zoo:NAME, a local path or a hub id) -> a file every such hub repository holds,
    # or None for arguments that load local files only. `validate` checks each before anything loads.
    source_params: ClassVar[dict[str, str | None]] = {}

    @classmethod
    def config_widths(cls, params: dict[str, Any]) -> dict[str, int]:
        """Widths known from config alone: {'output': D} for producers, {port: D} for consumer ports."""
        return {}

    @classmethod
    def param_problems(cls, params: dict[str, Any], context: NodeContext) -> list[Finding]:
        """What is wrong across this node's recipe arguments, found without weights (reading a config is fine).

        Single values (types, enums, bounds) are checked from the constructor's annotations; this hook is for what
        they cannot say: one argument against another, against the base's config, or against the graph.
        """
        return []

    @classmethod
    def adapter_bases(cls, params: dict[str, Any]) -> dict[str, nn.Module] | None:
        """The inner models an adapter may go into, by attribute name, built on the meta device from their configs
        (no weights); None when no config is readable here. `validate` checks adapter target_modules against them."""
        return None

    @classmethod
    def adapter_export_problem(cls, inner: str, peft_config: Any) -> str | None:
        """Why this node's card export could not carry an adapter of this config on inner model `inner` (the stock
        library has no loader for it), or None. `validate` reports it, so a run never trains what it cannot export."""
        return None

    def widths(self) -> dict[str, int]:
        """Widths of the built node, in the same keys as `config_widths`."""
        return {}

    def trained_parts(self) -> list[nn.Module]:
        """Modules of a frozen node that train with the bridges because they sit in the base's own layout, where its
        stock library loads them (IP-Adapter's key/value projections in a U-Net's cross-attention); keyed in the card
        by their place in the node, as every trainable tensor is."""
        return []

    def describe(self) -> dict[str, Any]:
        """Identity of the node's base model for card metadata (id or path, config hash)."""
        return {}

    def weights_fingerprint(self) -> str:
        """Hash of the frozen base's weights (what a card records beside the config hash, so a base with the same
        config and other weights, e.g. another seed or a fine-tune, is told apart); computed once per node."""
        from mmadapt.core.identity import base_weights_hash

        if getattr(self, "_base_fingerprint", None) is None:
            self._base_fingerprint = base_weights_hash(self)
        return self._base_fingerprint


class RowTokens:
    """Bridge tokens for a batch whose rows carry different modalities: per row, (source node, tokens (P, D)) pieces.

    A row may have no piece (its modality's bridge is not in the graph) or several (a sample with two modalities).
    """

    def __init__(self, rows: list[list[tuple[str, torch.Tensor]]]) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)


class Encoder(Node):
    """A frozen unimodal encoder: data in, tokens `(B, N, D)` out."""

    role = "encoder"
    modality: ClassVar[str] = "image"

    def preprocess(self, sample: Any) -> torch.Tensor:
        """Turn one raw sample (e.g. a PIL image) into the model's input tensor."""
        raise NotImplementedError

    def preprocess_batch(self, samples: list[Any]) -> list[torch.Tensor | DataError]:
        """`preprocess` for each sample, a bad one returned as its DataError so the others go on; encoders whose
        preprocessing is cheaper per batch (an image processor) override it."""
        return each_or_error(self.preprocess, samples)

    def cache_identity(self) -> dict[str, Any]:
        """Everything that changes this encoder's output for a given input: model, weights, layer, transform."""
        raise NotImplementedError

    def diffusers_image_encoder(self) -> nn.Module | None:
        """The model whose projected embedding (`image_embeds`) stock diffusers' `encode_image` computes from a picture
        for a plain IP-Adapter, when that is this encoder's output; None when it is not."""
        return None


class Bridge(Node):
    """A trainable module between nodes. `in_dim`/`out_dim` constructor args are inferred from neighbours."""

    role = "bridge"
    # The forward argument whose upstream width becomes `in_dim`; None for bridges without inputs.
    width_input: ClassVar[str | None] = "x"

    def widths(self) -> dict[str, int]:
        found = {"output": getattr(self, "out_dim", None), "input": getattr(self, "in_dim", None)}
        return {k: v for k, v in found.items() if v is not None}


class Adapter:
    """An in-place bridge (e.g. LoRA) applied to a node's inner model; its parameters are the trainable ones."""

    def __init__(self, **kwargs: Any) -> None:
        self.kwargs = kwargs  # the recipe arguments, kept for the card

    target: str | None = None  # the node's inner model to adapt; None = the node's `adapter_target`

    def peft_config(self, default_modules: list[str] | None = None) -> Any:
        raise NotImplementedError

    def apply(self, target: nn.Module, default_modules: list[str] | None = None) -> None:
        """Inject the peft config; diffusers models take it through their own add_adapter, which also readies
        their save_lora_adapter / load_lora_adapter."""
        import sys

        from peft import inject_adapter_in_model

        diffusers_model = getattr(sys.modules.get("diffusers"), "ModelMixin", None)
        if diffusers_model is not None and isinstance(target, diffusers_model):
            target.add_adapter(self.peft_config(default_modules))
        else:
            inject_adapter_in_model(self.peft_config(default_modules), target)
