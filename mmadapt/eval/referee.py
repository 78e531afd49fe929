"""An independent judge of generated digits: scikit-learn's SVC fitted on the real digits' train split."""
from __future__ import annotations

import functools
from typing import Any

import numpy as np
from PIL import Image

from mmadapt.data.digits import load_digits_arrays, split_indices


@functools.cache
def referee() -> Any:
    """An RBF SVC on the 8x8, 0..16 scans: not one of the project's models, and it never sees a generated image."""
    from sklearn.svm import SVC

    images, labels = load_digits_arrays()
    train = split_indices("train")
    return SVC(gamma=0.001, C=10.0).fit(images[train].reshape(len(train), -1), labels[train])


def to_scan(image: Image.Image) -> np.ndarray:
    """A generated picture (dark ink on light paper, any size) averaged down to the digits' 8x8, 0..16 ink scale."""
    gray = np.asarray(image.convert("L").resize((8, 8), Image.Resampling.BOX), dtype=np.float32)
    return ((255.0 - gray) * (16.0 / 255.0)).clip(0, 16)  # (8, 8)


def read_digits(images: list[Image.Image]) -> list[int]:
    """The referee's reading of each image."""
    scans = np.stack([to_scan(image).reshape(-1) for image in images])  # (N, 64)
    return [int(d) for d in referee().predict(scans)]


def test_accuracy() -> float:
    """The referee's own accuracy on the real test scans, the ceiling for any generated figure."""
    images, labels = load_digits_arrays()
    test = split_indices("test")
    return float((referee().predict(images[test].reshape(len(test), -1)) == labels[test]).mean())
