"""What every image encoder shares: image loading, the feature choice and the cache identity."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, get_args

import torch
from PIL import Image

from mmadapt.errors import DataError, MMAdaptError
from mmadapt.core.identity import weights_hash
from mmadapt.core.nodes import Encoder, each_or_error
from mmadapt.core.params import Feature
from mmadapt.data.modalities import open_image

FEATURES = get_args(Feature)


@dataclass(frozen=True)
class TransformersTower:
    """An image encoder as a transformers vision model giving the same tokens: what stock VLM exports are built from."""

    model: torch.nn.Module  # e.g. CLIPVisionModel, adapters merged
    processor: Any  # a transformers image processor giving the encoder's own pixel values
    layer: int  # the index into the model's hidden_states that the encoder's tokens are
    has_cls: bool  # the model's tokens lead with a class token
    keep_cls: bool  # the encoder keeps it
    # max |pixel| difference between the processor and the encoder's own transform, per test picture ("8x8", ...); empty:
    # the processor is the encoder's own
    pixel_gap: dict[str, float] = field(default_factory=dict)


class ImageEncoder(Encoder):
    """An image tower whose output is patch tokens of one layer, or the pooled embedding as one token."""

    modality = "image"
    default_inputs = {"pixel_values": "data.image"}

    def _init_features(self, layer: int, feature: str) -> None:
        if feature not in FEATURES:
            raise MMAdaptError(f"feature must be one of {', '.join(FEATURES)}, got {feature!r}")
        self.layer = layer
        self.feature = feature
        self.transform: Callable[[Image.Image], torch.Tensor] | None = None
        self._weights_hash: str | None = None

    def preprocess(self, sample: Any) -> torch.Tensor:
        assert self.transform is not None
        return self.transform(open_image(sample))  # (3, H, W)

    def preprocess_batch(self, samples: list[Any]) -> list[torch.Tensor | DataError]:
        """Each sample opened on its own (a bad file fails alone, as its DataError), the good ones transformed together."""
        opened: list[Image.Image | DataError] = each_or_error(open_image, samples)
        good = [image for image in opened if isinstance(image, Image.Image)]
        tensors = iter(self.transform_images(good) if good else [])
        return [item if isinstance(item, DataError) else next(tensors) for item in opened]

    def transform_images(self, images: list[Image.Image]) -> list[torch.Tensor]:
        """(3, H, W) per image; a transform that takes a list (an image processor) overrides this with one call."""
        assert self.transform is not None
        return [self.transform(image) for image in images]

    def transform_description(self) -> str:
        return repr(self.transform)

    def transformers_tower(self) -> TransformersTower | None:
        """This tower as a transformers vision model with the same patch tokens, for stock exports; None where there is
        none (a pooled feature, a family transformers does not have)."""
        return None

    def cache_identity(self) -> dict[str, Any]:
        if self._weights_hash is None:  # hashing a big tower takes seconds: do it once
            self._weights_hash = weights_hash(self)
        return {
            "class": type(self).__qualname__,
            "base": self.describe(),
            "weights": self._weights_hash,
            "layer": self.layer,
            "feature": self.feature,
            "keep_cls": getattr(self, "keep_cls", None),
            "transform": self.transform_description(),
        }
