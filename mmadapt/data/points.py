"""Point clouds: .npy/.ply/.xyz files, unit-sphere normalization, resampling, and the digits lifted to 3D."""
from __future__ import annotations

import hashlib
import random
import warnings
from pathlib import Path
from typing import Any, Callable, ClassVar, get_args

import numpy as np
import torch
from torch.utils.data import Dataset

from mmadapt.data.captions import CAPTION_FIELDS, Template, format_sample
from mmadapt.data.digits import Split, Style, caption_for, checked_spelled_text, load_digits_arrays, spell, split_indices
from mmadapt.errors import DataError
from mmadapt.core.params import PositiveInt
from mmadapt.core.semantics import Finding, file_and_root_findings

# ---------------------------------------------------------------------------------------------------------------
# Files


def _read_npy(path: Path) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)  # never unpickle: a .npy of objects is refused, not executed
    except (ValueError, EOFError, OSError) as exc:
        raise DataError(f"{path}: not a readable .npy array ({str(exc).splitlines()[0]})") from None


def _read_ply(path: Path) -> np.ndarray:
    from plyfile import PlyData, PlyElementParseError, PlyHeaderParseError

    try:
        ply = PlyData.read(str(path))
    except (PlyHeaderParseError, PlyElementParseError, ValueError, EOFError, OSError, UnicodeDecodeError, IndexError) as exc:
        raise DataError(f"{path}: not a readable PLY file ({str(exc).splitlines()[0]})") from None
    names = [element.name for element in ply.elements]
    if "vertex" not in names:
        raise DataError(f"{path}: PLY file has no 'vertex' element (elements: {', '.join(names) or 'none'})")
    vertex = ply["vertex"].data
    fields = vertex.dtype.names or ()
    if not {"x", "y", "z"} <= set(fields):
        raise DataError(f"{path}: PLY vertices need x, y and z properties; found {', '.join(fields)}")
    columns = [vertex[c].astype(np.float32) for c in ("x", "y", "z")]
    if {"red", "green", "blue"} <= set(fields):
        columns += [vertex[c].astype(np.float32) for c in ("red", "green", "blue")]  # 0..255 as stored
    return np.stack(columns, axis=1)  # (N, 3) or (N, 6)


def _read_xyz(path: Path) -> np.ndarray:
    try:
        text = path.read_text()
    except UnicodeDecodeError:
        raise DataError(f"{path}: not a text .xyz file (binary content)") from None
    rows = [line.replace(",", " ").split() for line in text.splitlines()]
    rows = [r for r in rows if r and not r[0].startswith("#")]
    if not rows:
        return np.zeros((0, 3), dtype=np.float32)
    widths = {len(r) for r in rows}
    if len(widths) != 1:
        raise DataError(f"{path}: rows have different numbers of columns ({', '.join(map(str, sorted(widths)))}); a truncated file?")
    try:
        return np.asarray(rows, dtype=np.float32)
    except ValueError as exc:
        raise DataError(f"{path}: .xyz rows must be numbers ({exc})") from None


READERS: dict[str, Callable[[Path], np.ndarray]] = {".npy": _read_npy, ".ply": _read_ply, ".xyz": _read_xyz, ".txt": _read_xyz}


def load_point_cloud(path: str | Path) -> np.ndarray:
    """A file's points as float32 (N, C): C = 3 (xyz) or more (xyz then e.g. RGB); checked, not yet normalized."""
    path = Path(path)
    reader = READERS.get(path.suffix.lower())
    if reader is None:
        raise DataError(f"{path}: expected a point cloud file ({', '.join(READERS)}), got '{path.suffix or 'no extension'}'")
    if not path.is_file():
        raise DataError(f"{path}: point cloud file not found")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # an empty file warns; check_cloud says so with the file's name
        array = reader(path)
    return check_cloud(array, str(path))


def check_cloud(array: Any, name: str) -> np.ndarray:
    """The cloud as float32 (N, C >= 3), or DataError naming `name`: empty, NaN/inf, wrong shape."""
    if isinstance(array, torch.Tensor):
        array = array.detach().cpu().numpy()
    array = np.asarray(array)
    if array.dtype.kind not in "fiu":
        raise DataError(f"{name}: point cloud must be numbers, got dtype {array.dtype}")
    if array.ndim != 2 or array.shape[1] < 3:
        raise DataError(f"{name}: point cloud must have shape (N, 3) or (N, C > 3), got {tuple(array.shape)}")
    if array.shape[0] == 0:
        raise DataError(f"{name}: point cloud is empty (0 points)")
    array = array.astype(np.float32)
    bad = ~np.isfinite(array).all(axis=1)
    if bad.any():
        raise DataError(f"{name}: point cloud has {int(bad.sum())} of {len(array)} points with NaN or infinite values")
    return array


def save_ply(path: str | Path, points: np.ndarray, binary: bool = True) -> None:
    """Write xyz (and RGB for 6 columns) as PLY through plyfile."""
    from plyfile import PlyData, PlyElement

    fields = [("x", "f4"), ("y", "f4"), ("z", "f4")] + ([("red", "u1"), ("green", "u1"), ("blue", "u1")] if points.shape[1] >= 6 else [])
    vertex = np.empty(len(points), dtype=fields)
    for column, (field, _) in enumerate(fields):
        vertex[field] = points[:, column]
    PlyData([PlyElement.describe(vertex, "vertex")], text=not binary).write(str(path))


# ---------------------------------------------------------------------------------------------------------------
# Normalization and resampling


def normalize_unit_sphere(points: np.ndarray, name: str = "point cloud") -> np.ndarray:
    """xyz centred on the centroid and scaled so the farthest point lies on the unit sphere; other columns kept."""
    xyz = points[:, :3] - points[:, :3].mean(axis=0, keepdims=True)
    radius = float(np.sqrt((xyz ** 2).sum(axis=1)).max())
    if radius < 1e-9:
        raise DataError(f"{name}: all {len(points)} points coincide; the cloud has no extent to normalize")
    return np.concatenate([xyz / radius, points[:, 3:]], axis=1).astype(np.float32)


def resample(points: np.ndarray, count: int, seed: int = 0) -> np.ndarray:
    """Exactly `count` points: a random subset when there are more, all of them plus repeats when fewer.

    Seeded, so one file always gives the same points and the frozen-feature cache stays valid.
    """
    rng = np.random.default_rng(seed)
    if len(points) >= count:
        chosen = np.sort(rng.choice(len(points), count, replace=False))
    else:
        chosen = np.concatenate([np.arange(len(points)), rng.choice(len(points), count - len(points), replace=True)])
    return points[chosen]


# ---------------------------------------------------------------------------------------------------------------
# The digits in 3D


def digit_points(pixels: np.ndarray, rng: np.random.Generator, count: int = 128, thickness: float = 0.25) -> np.ndarray:
    """8x8 scans (B, 8, 8) as slabs of ink, (B, count, 3): points spread over inked pixels, through a depth that grows with the ink.

    Batched with numpy (an inverse-CDF draw per point) because pretraining redraws every digit every epoch.
    """
    ink = pixels.astype(np.float64).reshape(len(pixels), 64) / 16.0  # (B, 64) in 0..1
    weights = np.where(ink > 0.1, ink, 0.0)
    weights[weights.sum(1) == 0] = 1.0  # a blank scan (none in the digits) would still give a cloud
    cdf = np.cumsum(weights / weights.sum(1, keepdims=True), axis=1)  # (B, 64)
    draws = rng.random((len(pixels), count, 4))  # which pixel, x and y within it, depth
    cells = np.minimum((draws[..., :1] > cdf[:, None, :]).sum(-1), 63)  # (B, count)
    rows, cols = np.divmod(cells, 8)
    x = (cols + draws[..., 1]) / 4.0 - 1.0  # the 8 px width spans -1..1
    y = 1.0 - (rows + draws[..., 2]) / 4.0  # image rows grow downward; y grows upward
    z = (draws[..., 3] * 2 - 1) * thickness * np.take_along_axis(ink, cells, axis=1)
    return np.stack([x, y, z], axis=-1).astype(np.float32)


def rotation_matrices(angles: np.ndarray) -> np.ndarray:
    """Rotations (B, 3, 3) about x, then y, then z by the angles (B, 3), in radians."""
    cx, cy, cz = np.cos(angles).T
    sx, sy, sz = np.sin(angles).T
    one, zero = np.ones_like(cx), np.zeros_like(cx)
    rx = np.stack([one, zero, zero, zero, cx, -sx, zero, sx, cx], -1).reshape(-1, 3, 3)
    ry = np.stack([cy, zero, sy, zero, one, zero, -sy, zero, cy], -1).reshape(-1, 3, 3)
    rz = np.stack([cz, -sz, zero, sz, cz, zero, zero, zero, one], -1).reshape(-1, 3, 3)
    return rz @ ry @ rx


# Tilt out of the page and turn within it, but not so far that a 6 becomes a 9 or a 2 a mirrored 5.
MAX_TILT_DEGREES = 35.0
MAX_TURN_DEGREES = 15.0


def augment_points(points: np.ndarray, rng: np.random.Generator, jitter: float = 0.01) -> np.ndarray:
    """A random pose per cloud (B, P, 3): tilt and in-plane turn, anisotropic scaling 0.85..1.15, clipped Gaussian jitter."""
    limits = np.radians([MAX_TILT_DEGREES, MAX_TILT_DEGREES, MAX_TURN_DEGREES])
    rotation = rotation_matrices(rng.uniform(-limits, limits, size=(len(points), 3)))  # (B, 3, 3)
    scale = rng.uniform(0.85, 1.15, size=(len(points), 1, 3))
    moved = np.einsum("bpi,bji->bpj", points * scale, rotation)
    noise = np.clip(rng.normal(0.0, jitter, size=moved.shape), -3 * jitter, 3 * jitter)
    return (moved + noise).astype(np.float32)


class DigitsPoints(Dataset):
    """Each sample: a digit lifted to a 3D point cloud in a random pose, and a caption naming it."""

    digit_labels = True  # `mmadapt eval` measures cards trained on it by the digit their output names
    fields: ClassVar[frozenset[str]] = CAPTION_FIELDS | {"points", "label"}  # every sample's keys (spelled_text only when set)

    def __init__(
        self,
        split: Split = "train",  # train | val | test, from the stored digits split
        style: Style = "varied",  # varied: several caption phrasings; fixed: always "a handwritten <word>"
        template: Template = "caption",  # a name in mmadapt.data.captions.TEMPLATES
        prompt: str = "",  # the question, for the instruction template
        limit: PositiveInt | None = None,  # use only the first N samples of the split (quick tests)
        text: str | None = None,  # one text for every sample instead of a caption
        num_points: PositiveInt = 128,  # points drawn per cloud (the encoder resamples to its own count)
        augment: bool = True,  # a random pose per sample; false: the flat digit as drawn
        views: PositiveInt = 1,  # train split only: poses per digit (views x digits samples); val/test keep one pose each, so figures compare
        seed: int = 0,  # seeds every sample's points and pose, so a sample (and its cache entry) never changes
        spelled_text: str | None = None,  # what a generator's text_alignment pulls toward, e.g. "The picture shows a {word}."
    ) -> None:
        if style not in get_args(Style):
            raise DataError(f"style must be varied or fixed, got {style!r}")
        if views < 1 or num_points < 1:
            raise DataError(f"views and num_points must be at least 1, got {views} and {num_points}")
        self.indices = split_indices(split)[:limit]
        self.style, self.template, self.prompt, self.text = style, template, prompt, text
        self.num_points, self.augment, self.seed = num_points, augment, seed
        self.spelled_text = checked_spelled_text(spelled_text)
        self.views = views if split == "train" else 1  # more poses is training-time augmentation, not a bigger test
        format_sample(template, "", "")
        self.rng = random.Random()  # reseeded from the global RNG state each draw so resume repeats it
        load_digits_arrays()  # import sklearn now: its first import draws from the global RNG

    def __len__(self) -> int:
        return len(self.indices) * self.views

    def label(self, position: int) -> int:
        return int(load_digits_arrays()[1][self.indices[position % len(self.indices)]])

    def cloud(self, position: int) -> np.ndarray:
        """The points of one sample, (num_points, 3); the same every time for the same position and seed."""
        view, slot = divmod(position, len(self.indices))
        index = self.indices[slot]
        rng = np.random.default_rng([self.seed, index, view])
        points = digit_points(load_digits_arrays()[0][index][None], rng, self.num_points)  # (1, P, 3)
        return (augment_points(points, rng) if self.augment else points)[0]

    def __getitem__(self, position: int) -> dict[str, Any]:
        self.rng.seed(random.getrandbits(64))
        label = self.label(position)
        points = self.cloud(position)
        text = self.text if self.text is not None else caption_for(label, self.style, self.rng)
        prompt, target = format_sample(self.template, text, self.prompt)
        key = hashlib.sha1(b"digits-points" + points.tobytes()).hexdigest()
        sample = {"points": points, "prompt": prompt, "target": target, "text": text, "key": key, "id": position, "label": label}
        if self.spelled_text is not None:
            sample["spelled_text"] = spell(self.spelled_text, label)
        return sample


class PointCaptionDataset(Dataset):
    """Rows of {"points": file, "text"[, "prompt"]} in a JSONL file; files are relative to it (PointLLM's data, converted)."""

    fields: ClassVar[frozenset[str]] = CAPTION_FIELDS | {"points"}

    @classmethod
    def param_problems(cls, params: dict[str, Any]) -> list[Finding]:
        """The file and its root folder exist; relative paths start at the current folder, as the dataset opens them."""
        return file_and_root_findings(params, "points_root")

    def __init__(
        self,
        path: str,  # a .jsonl file, one {"points": "cloud.npy|.ply|.xyz", "text": ..., "prompt"?: ...} per line
        points_root: str | None = None,  # where relative point paths start; default: the file's folder
        template: Template = "caption",  # a name in mmadapt.data.captions.TEMPLATES
        prompt: str = "",  # the question for every row that has none of its own
    ) -> None:
        import json

        self.path = Path(path)
        if not self.path.is_file():
            raise DataError(f"{self.path}: data file not found")
        if self.path.suffix != ".jsonl":
            raise DataError(f"{self.path}: expected a .jsonl file of {{\"points\", \"text\"}} rows")
        root = Path(points_root) if points_root else self.path.parent
        self.template = template
        format_sample(template, "", "")
        self.rows: list[dict[str, str]] = []
        for number, line in enumerate(self.path.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{self.path}:{number}: not valid JSON ({exc.msg})") from None
            if not isinstance(record, dict) or not record.get("points") or record.get("text") is None:
                raise DataError(f"{self.path}:{number}: each row needs 'points' and 'text'")
            self.rows.append({"points": str(root / record["points"]), "text": str(record["text"]), "prompt": str(record.get("prompt") or prompt)})
        if not self.rows:
            raise DataError(f"{self.path}: no rows")

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, Any]:
        from mmadapt.data.captions import file_key

        row = self.rows[index]
        prompt, target = format_sample(self.template, row["text"], row["prompt"])
        path = Path(row["points"])
        try:
            key = file_key(path)
        except OSError as exc:
            key = f"unreadable:{path}:{exc.strerror}"  # the collator reports and skips it
        return {"points": path, "prompt": prompt, "target": target, "text": row["text"], "key": key, "id": index}
