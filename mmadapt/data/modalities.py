"""The modality table: for each kind of input, its sample field, how a file of it is read and checked, its CLI flag,
its demo widget, and a small example sample (what `mmadapt info` feeds)."""
from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from mmadapt.errors import DataError


def open_image(source: str | Path | Image.Image) -> Image.Image:
    """Open an image as RGB; an unreadable file raises DataError naming it."""
    if isinstance(source, Image.Image):
        return source.convert("RGB")
    try:
        with Image.open(source) as image:
            return image.convert("RGB")
    except (OSError, UnidentifiedImageError) as exc:
        raise DataError(f"{source}: not a readable image ({exc})") from None


def checked_audio(source: str | Path | tuple[int, Any]) -> str | Path | tuple[int, Any]:
    """A clip as the audio encoders take it (a path or a (rate, samples) pair), once its header reads as audio; the
    encoder decodes and resamples it under its own rules (mmadapt.encoders.audio.read_audio)."""
    if isinstance(source, tuple):
        return source
    import soundfile

    try:
        soundfile.info(str(source))
    except (soundfile.LibsndfileError, RuntimeError, OSError) as exc:
        raise DataError(f"{source}: not a readable audio file ({type(exc).__name__})") from None
    return source


def checked_points(source: str | Path | np.ndarray) -> np.ndarray:
    """A point cloud (.npy, .ply, .xyz/.txt, or an (N, 3+) array) as a checked float array."""
    from mmadapt.data.points import check_cloud, load_point_cloud

    if isinstance(source, np.ndarray):
        return check_cloud(source, "the point cloud")
    return load_point_cloud(source)


def content_key(path: str | Path) -> str:
    """Content hash of a file, the cache key of its features; an unreadable file gets a key that fails later."""
    try:
        return hashlib.sha1(Path(path).read_bytes()).hexdigest()
    except OSError as exc:
        return f"unreadable:{path}:{exc.strerror}"


@dataclass(frozen=True)
class Modality:
    """One kind of input. An encoder names its modality (`modality = "image"`), or carries a Modality of its own."""

    name: str
    field: str  # the sample field its encoders read, e.g. data.image
    read: Callable[[Any], Any]  # a file (or value) -> what the encoder preprocesses; DataError names a bad one
    flag: str  # the `mmadapt generate` option that gives files of it, e.g. --image
    widget: str  # the Gradio component the demos show for it: "image", "audio" or "file"
    example: Callable[[], Any]  # a small valid value, for `mmadapt info`'s dummy forward pass
    files: str = "a file"  # what the CLI flag takes, for its help


MODALITIES: dict[str, Modality] = {
    "image": Modality("image", "image", open_image, "--image", "image", lambda: Image.new("RGB", (64, 64), "white"),
                      "an image file"),
    "audio": Modality("audio", "audio", checked_audio, "--audio", "audio",
                      lambda: (16_000, (0.1 * np.sin(np.linspace(0, 880 * np.pi, 16_000))).astype(np.float32)),
                      "a WAV/FLAC/OGG/MP3 file"),
    "points": Modality("points", "points", checked_points, "--points", "file",
                       lambda: np.random.default_rng(0).normal(size=(256, 3)).astype(np.float32), "a .npy/.ply/.xyz point cloud"),
}


def modality_of(encoder: Any) -> Modality:
    """The Modality of an encoder class or instance: its own, or its name's row in MODALITIES."""
    own = getattr(encoder, "modality", None)
    if isinstance(own, Modality):
        return own
    if own not in MODALITIES:
        raise DataError(f"{getattr(encoder, '__name__', type(encoder).__name__)}: modality {own!r} is not in the modality "
                        f"table ({', '.join(MODALITIES)}); give the encoder a Modality of its own")
    return MODALITIES[own]


def modality_fields() -> tuple[str, ...]:
    """The sample fields of the table's modalities: what an encoder may read."""
    return tuple(m.field for m in MODALITIES.values())
