"""The contract every graph node keeps: its role, default inputs, and how its widths are known."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, ClassVar, Iterator

import torch
from torch import nn

from mmadapt.errors import DataError


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


class WidthUnknown(Exception):
    """A base model's config cannot be read without loading (e.g. a hub id offline)."""


class Node(nn.Module):
    """Base of encoders, bridges and decoders. A node's constructor signature is its recipe schema."""

    role: ClassVar[str] = "bridge"
    # The attribute holding the inner model that adapters such as LoRA are injected into.
    adapter_target: ClassVar[str] = "model"
    # Per inner model, the modules an adapter targets when the recipe names none (None: peft's default for the model).
    adapter_modules: ClassVar[dict[str, list[str]]] = {}
    # Inputs a node gets without the recipe naming them, e.g. an image encoder reads `data.image`.
    default_inputs: ClassVar[dict[str, str]] = {}

    @classmethod
    def config_widths(cls, params: dict[str, Any]) -> dict[str, int]:
        """Widths known from config alone: {'output': D} for producers, {port: D} for consumer ports."""
        return {}

    def widths(self) -> dict[str, int]:
        """Widths of the built node, in the same keys as `config_widths`."""
        return {}

    def describe(self) -> dict[str, Any]:
        """Identity of the node's base model for card metadata (id or path, config hash)."""
        return {}


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


class Bridge(Node):
    """A trainable module between nodes. `in_dim`/`out_dim` constructor args are inferred from neighbours."""

    role = "bridge"
    # The forward argument whose upstream width becomes `in_dim`; None for bridges without inputs.
    width_input: ClassVar[str | None] = "x"

    def widths(self) -> dict[str, int]:
        found = {"output": getattr(self, "out_dim", None), "input": getattr(self, "in_dim", None)}
        return {k: v for k, v in found.items() if v is not None}


class Decoder(Node):
    """A frozen generator that turns bridge outputs plus data into a loss, and can generate."""

    role = "decoder"
    output: ClassVar[str] = "text"  # what generate returns: "text" (strings) or "image" (PIL images)

    def prepare(self, sample: dict[str, Any], max_tokens: int) -> Any:
        """One sample's decoder data (token ids, a target image); a bad sample raises DataError and is skipped."""
        raise NotImplementedError

    def collate(self, rows: list[Any]) -> dict[str, torch.Tensor]:
        """Prepared rows -> the decoder's data inputs for the batch, keyed by forward argument."""
        raise NotImplementedError

    def generate(self, prompts: list[str], **inputs: Any) -> list[Any]:
        """Outputs for prompts, conditioned on the bridges' outputs keyed by the decoder's ports."""
        raise NotImplementedError


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
