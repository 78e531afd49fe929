"""The contract every graph node keeps: its role, default inputs, and how its widths are known."""
from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn


class WidthUnknown(Exception):
    """A base model's config cannot be read without loading (e.g. a hub id offline)."""


class Node(nn.Module):
    """Base of encoders, bridges and decoders. A node's constructor signature is its recipe schema."""

    role: ClassVar[str] = "bridge"
    # The attribute holding the inner model that adapters such as LoRA are injected into.
    adapter_target: ClassVar[str] = "model"
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


class Encoder(Node):
    """A frozen unimodal encoder: data in, tokens `(B, N, D)` out."""

    role = "encoder"
    modality: ClassVar[str] = "image"

    def preprocess(self, sample: Any) -> torch.Tensor:
        """Turn one raw sample (e.g. a PIL image) into the model's input tensor."""
        raise NotImplementedError

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


class Adapter:
    """An in-place bridge (e.g. LoRA) applied to a node's inner model; its parameters are the trainable ones."""

    def __init__(self, **kwargs: Any) -> None:
        self.kwargs = kwargs  # the recipe arguments, kept for the card

    def apply(self, target: nn.Module) -> None:
        raise NotImplementedError
