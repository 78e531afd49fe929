"""Caption and conversation data from Hugging Face `datasets` tables on local disk: parquet, arrow, JSON lines or CSV files, webdataset
tar shards, an imagefolder, or a `save_to_disk` folder; each row one sample, its image or audio read by the graph's
encoder. Map-style: the trainer's sampler deals rows to processes and workers, and resume finds its place exactly."""
from __future__ import annotations

import hashlib
import io
from collections import Counter
from pathlib import Path
from typing import Any, ClassVar, Literal

from torch.utils.data import Dataset

from mmadapt.core.params import PositiveInt
from mmadapt.core.semantics import Finding, place_finding
from mmadapt.data.captions import CAPTION_FIELDS, Template, file_key, format_sample
from mmadapt.data.conversations import IMAGE, Conversations
from mmadapt.errors import DataError

Builder = Literal["parquet", "arrow", "json", "csv", "webdataset", "imagefolder", "audiofolder", "saved"]
Modality = Literal["image", "audio"]
# How a file's suffix names the `datasets` builder that reads it (a folder: imagefolder, or a save_to_disk folder)
SUFFIX_BUILDERS = {".parquet": "parquet", ".arrow": "arrow", ".jsonl": "json", ".json": "json", ".csv": "csv", ".tar": "webdataset"}


def load_table(path: Path, builder: str | None, split: str, modality: str = "image") -> Any:
    """The split of a `datasets` table on disk; DataError naming the path when it is not one."""
    import datasets

    builder = builder or builder_for(path, modality)
    try:
        if builder == "saved":
            table = datasets.load_from_disk(str(path))
            return table[split] if isinstance(table, datasets.DatasetDict) else table
        return datasets.load_dataset(builder, split=split, **files_for(path, builder, split))
    except (FileNotFoundError, ValueError, KeyError, datasets.exceptions.DatasetGenerationError) as exc:
        raise DataError(f"{path}: not a {builder} dataset with a '{split}' split ({str(exc).splitlines()[0]})") from None


def files_for(path: Path, builder: str, split: str) -> dict[str, Any]:
    """load_dataset's arguments for the path: a folder of tar shards is their sorted list (the LAION/CC layout)."""
    if builder == "webdataset" and path.is_dir():
        shards = sorted(str(p) for p in path.glob("*.tar"))
        if not shards:
            raise DataError(f"{path}: no .tar shards in this folder")
        return {"data_files": {split: shards}}
    if builder == "webdataset":
        return {"data_files": {split: [str(path)]}}
    return {"data_dir": str(path)} if path.is_dir() else {"data_files": str(path)}


def builder_for(path: Path, modality: str) -> str:
    """The builder a path's suffix or folder contents name."""
    if path.is_dir():
        if (path / "dataset_dict.json").exists() or (path / "state.json").exists():
            return "saved"
        if any(path.glob("*.tar")):
            return "webdataset"
        return "audiofolder" if modality == "audio" else "imagefolder"
    builder = SUFFIX_BUILDERS.get(path.suffix)
    if builder is None:
        raise DataError(f"{path}: cannot tell the datasets builder from the suffix; set builder: "
                        f"({', '.join(sorted(set(SUFFIX_BUILDERS.values())))}, imagefolder, audiofolder, saved)")
    return builder


class RowBytes(io.BytesIO):
    """An image or clip stored in the table itself, readable as a file, named by its table, row and column in messages."""

    def __init__(self, data: bytes, source: str) -> None:
        super().__init__(data)
        self.source = source

    def __str__(self) -> str:
        return self.source


class HFCaptionDataset(Dataset):
    """Rows of a `datasets` table with an image (or audio) column and a text column, as caption samples."""

    fields: ClassVar[frozenset[str]] = CAPTION_FIELDS | {"image", "audio"}

    @classmethod
    def fields_for(cls, params: dict[str, Any]) -> frozenset[str]:
        return CAPTION_FIELDS | {params.get("modality", "image")}

    @classmethod
    def param_problems(cls, params: dict[str, Any]) -> list[Finding]:
        found = place_finding(params.get("path"), "path", "any")
        return [found] if found else []

    def __init__(
        self,
        path: str,  # a .parquet/.arrow/.jsonl/.csv/.tar file, a folder of .tar shards, an image or audio folder, or a save_to_disk folder
        builder: Builder | None = None,  # the `datasets` builder; None: read off the suffix (a folder: saved, else imagefolder)
        split: str = "train",  # the split to read (an imagefolder or a saved DatasetDict has several)
        modality: Modality = "image",  # the sample field the encoder reads
        column: str | None = None,  # the table's image/audio column; None: the modality's name
        text_column: str = "text",  # the caption column
        prompt_column: str | None = None,  # a per-row question, where the table has one
        template: Template = "caption",  # a name in mmadapt.data.captions.TEMPLATES
        prompt: str = "",  # the question for rows without their own
    ) -> None:
        import datasets

        self.path, self.modality, self.template, self.prompt = Path(path), modality, template, prompt
        self.column, self.text_column, self.prompt_column = column or modality, text_column, prompt_column
        format_sample(template, "", "")  # an unknown template fails now
        table = load_table(self.path, builder, split, modality)
        missing = [c for c in (self.column, text_column, prompt_column) if c and c not in table.column_names]
        if missing:
            raise DataError(f"{self.path}: no column {', '.join(repr(c) for c in missing)}; its columns: {', '.join(table.column_names)}")
        feature = table.features[self.column]
        if isinstance(feature, (datasets.Image, datasets.Audio)):  # undecoded: a bad member is the collator's to count
            table = table.cast_column(self.column, type(feature)(decode=False))
        self.table = table
        self.root = self.path if self.path.is_dir() else self.path.parent  # where a column of relative paths starts

    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, index: int) -> dict[str, Any]:
        row = self.table[index]
        text = str(row[self.text_column])
        question = str(row[self.prompt_column] or self.prompt) if self.prompt_column else self.prompt
        prompt, target = format_sample(self.template, text, question)
        value, where = row[self.column], f"{self.path} row {index} ({self.column})"
        if isinstance(value, dict) and value.get("bytes"):  # stored in the table
            data = value["bytes"]
            member: Any = RowBytes(data, f"{where}, {value.get('path') or 'bytes'}")
            key = hashlib.sha1(data).hexdigest()
            if self.modality == "audio":
                member = self._decoded_audio(member)
        else:  # a path, relative to the table's folder
            file = value.get("path") if isinstance(value, dict) else value
            if not file:
                raise DataError(f"{where}: empty")
            member = Path(file) if Path(file).is_absolute() else self.root / file
            try:
                key = file_key(member)
            except OSError as exc:
                key = f"unreadable:{member}:{exc.strerror}"  # the collator reports and skips it
        return {self.modality: member, "prompt": prompt, "target": target, "text": text, "key": key, "id": index}

    @staticmethod
    def _decoded_audio(member: RowBytes) -> Any:
        """A clip's bytes as the (rate, samples) pair the audio encoders take; undecodable bytes stay as they are,
        for the audio check to refuse by their name."""
        import soundfile

        try:
            samples, rate = soundfile.read(member, dtype="float32")
        except (soundfile.LibsndfileError, RuntimeError, OSError):
            member.seek(0)
            return member
        return (rate, samples)


class TableRows:
    """A `datasets` table as the (where, row) pairs `Conversations` reads, one row at a time (nothing loads up front)."""

    def __init__(self, table: Any, limit: int | None = None) -> None:
        self.table, self.size = table, min(len(table), limit or len(table))

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> tuple[str, dict[str, Any]]:
        return f"row {index}", self.table[index]


class HFConversations(Conversations):
    """LLaVA-format conversations from a `datasets` table (JSON lines, parquet, arrow, a save_to_disk folder): columns
    `conversations` (turns of {"from", "value"}), `image` (a path or a list of paths, relative to image_root) and `id`.
    Each row is checked when it is read, as `type: conversations` checks its file's rows."""

    @classmethod
    def param_problems(cls, params: dict[str, Any]) -> list[Finding]:
        found = [place_finding(params.get("path"), "path", "any"), place_finding(params.get("image_root"), "image_root", "folder")]
        return [f for f in found if f]

    def __init__(
        self,
        path: str,  # a .jsonl/.json/.parquet/.arrow file or a save_to_disk folder
        builder: Builder | None = None,  # the `datasets` builder; None: read off the suffix
        split: str = "train",
        image_root: str | None = None,  # where relative image paths start; default: the table's folder
        limit: PositiveInt | None = None,  # use only the first N rows (quick tests)
        image_marker: str = IMAGE,  # the placeholder; each sample has as many as it has images
    ) -> None:
        import datasets

        self.path = Path(path)
        if not image_marker:
            raise DataError("image_marker must not be empty")
        table = load_table(self.path, builder, split)
        if "conversations" not in table.column_names:
            raise DataError(f"{self.path}: no 'conversations' column; its columns: {', '.join(table.column_names)}")
        if isinstance(table.features.get("image"), datasets.Image):
            raise DataError(f"{self.path}: its 'image' column holds the pictures themselves; conversations read image paths "
                            "(relative to image_root), as LLaVA's files give them")
        self.root = Path(image_root) if image_root else (self.path if self.path.is_dir() else self.path.parent)
        self.marker = image_marker
        counts = Counter(str(i) for i in (table["id"] if "id" in table.column_names else []) if i is not None)
        self.repeated = {i for i, n in counts.items() if n > 1}  # ids several rows share (LLaVA-665K has some)
        self.records = TableRows(table, limit)  # type: ignore[assignment]
