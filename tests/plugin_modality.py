"""An outside modality: scikit-learn's 8x8 digits as 64-value pixel vectors ("tabular"), read by a small frozen linear
encoder that carries its own Modality, and a dataset that gives the field. Nothing here is registered in mmadapt's
tables or its MODALITIES: a recipe names them by dotted path (plugin_modality.TabularEncoder, plugin_modality.DigitsTable).
"""
from __future__ import annotations

import csv
import hashlib
import inspect
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from mmadapt.core.identity import config_hash, weights_hash
from mmadapt.core.nodes import Encoder
from mmadapt.core.params import PositiveInt
from mmadapt.data.digits import WORDS, load_digits_arrays, split_indices
from mmadapt.data.modalities import Modality
from mmadapt.errors import DataError

FEATURES = 64  # 8x8 pixels, 0..16 (ink high)
PIXEL_MAX = 16.0


def read_vector(source: Any) -> np.ndarray:
    """A vector of 64 pixel values in 0..16, from an array (or list), a .npy file, or a one-row .csv file; a bad one
    raises DataError naming it."""
    name = str(source) if isinstance(source, (str, Path)) else "the pixel vector"
    if isinstance(source, (str, Path)):
        path = Path(source)
        try:
            if path.suffix == ".npy":
                values = np.asarray(np.load(path, allow_pickle=False), dtype=np.float32)
            elif path.suffix == ".csv":
                with path.open(newline="") as handle:
                    values = np.array([float(v) for row in csv.reader(handle) for v in row if v.strip()])
            else:
                raise DataError(f"{name}: expected a .npy or .csv file of {FEATURES} pixel values")
        except (OSError, ValueError, TypeError) as exc:
            raise DataError(f"{name}: not a readable pixel vector ({type(exc).__name__})") from None
    else:
        try:
            values = np.asarray(source, dtype=np.float32)
        except (TypeError, ValueError) as exc:
            raise DataError(f"{name}: not numbers ({type(exc).__name__})") from None
    if np.size(values) == FEATURES:
        values = np.asarray(values, dtype=np.float32).reshape(FEATURES)  # an (8, 8) scan reads as its 64 pixels
    if np.shape(values) != (FEATURES,):
        raise DataError(f"{name}: expected {FEATURES} pixel values, got shape {tuple(np.shape(values))}")
    if not np.isfinite(values).all() or values.min() < 0 or values.max() > PIXEL_MAX:
        raise DataError(f"{name}: pixel values must be finite and in 0..{PIXEL_MAX:g}")
    return values


TABULAR = Modality(
    name="tabular",
    field="pixels",
    read=read_vector,
    flag="--pixels",
    widget="file",
    example=lambda: np.linspace(0.0, PIXEL_MAX, FEATURES, dtype=np.float32),
    files="a .npy/.csv vector of 64 pixel values",
)


def defaults(cls: type, params: dict[str, Any]) -> dict[str, Any]:
    """The constructor's arguments as it will see them: the recipe's, over the signature's defaults."""
    signature = inspect.signature(cls.__init__)
    found = {n: p.default for n, p in signature.parameters.items() if p.default is not p.empty}
    return {**found, **params}


class TabularEncoder(Encoder):
    """64 pixels -> `tokens` tokens of width `width`: one frozen random linear map (seeded, so a card rebuilds it)."""

    modality = TABULAR  # its own Modality, not a name in mmadapt's MODALITIES
    default_inputs = {"pixels": "data.pixels"}

    def __init__(
        self,
        width: PositiveInt = 24,  # token width D
        tokens: PositiveInt = 4,  # tokens N per sample
        seed: int = 0,  # init seed of the random projection
    ) -> None:
        super().__init__()
        self.width, self.tokens, self.seed = width, tokens, seed
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            self.model = nn.Linear(FEATURES, tokens * width)
        self._weights_hash: str | None = None

    @classmethod
    def config_widths(cls, params: dict[str, Any]) -> dict[str, int]:
        return {"output": int(defaults(cls, params)["width"])}

    def widths(self) -> dict[str, int]:
        return {"output": self.width}

    def describe(self) -> dict[str, Any]:
        return {"source": "inline-config", "config_hash": config_hash({"class": "TabularEncoder", "width": self.width,
                                                                      "tokens": self.tokens, "seed": self.seed})}

    def preprocess(self, sample: Any) -> torch.Tensor:
        return torch.from_numpy(self.modality.read(sample) / PIXEL_MAX)  # (64,) in 0..1

    def cache_identity(self) -> dict[str, Any]:
        if self._weights_hash is None:
            self._weights_hash = weights_hash(self)
        return {"class": type(self).__qualname__, "base": self.describe(), "weights": self._weights_hash, "transform": "/16"}

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        weight = self.model.weight
        return torch.tanh(self.model(pixels.to(weight.dtype))).reshape(pixels.shape[0], self.tokens, self.width)  # (B, N, D)


class DigitsTable(Dataset):
    """The stored digits split as pixel vectors: each sample a `pixels` vector (64,), its `label` and its class name as
    text (prompt empty), so a caption generator and a classifier can both train on it."""

    fields: ClassVar[frozenset[str]] = frozenset({"pixels", "label", "prompt", "target", "text", "key", "id"})

    def __init__(self, split: Literal["train", "val", "test"] = "train", limit: PositiveInt | None = None) -> None:
        self.indices = split_indices(split)[:limit]

    def __len__(self) -> int:
        return len(self.indices)

    def label(self, position: int) -> int:
        return int(load_digits_arrays()[1][self.indices[position]])

    def __getitem__(self, position: int) -> dict[str, Any]:
        images, labels = load_digits_arrays()
        index = self.indices[position]
        pixels = images[index].reshape(FEATURES).copy()
        word = WORDS[int(labels[index])]
        return {"pixels": pixels, "label": int(labels[index]), "prompt": "", "target": word, "text": word,
                "key": hashlib.sha1(b"digits-table" + pixels.tobytes()).hexdigest(), "id": position}
