"""Caption data from Hugging Face `datasets` tables on local disk: parquet, arrow, JSON lines or CSV files, webdataset
tar shards, an imagefolder, or a `save_to_disk` folder; each row one sample, its image or audio read by the graph's
encoder. Map-style: the trainer's sampler deals rows to processes and workers, and resume finds its place exactly."""
from __future__ import annotations

import hashlib
import io
from pathlib import Path
from typing import Any, ClassVar, Literal

from torch.utils.data import Dataset

from mmadapt.core.semantics import Finding, place_finding
from mmadapt.data.captions import CAPTION_FIELDS, Template, file_key, format_sample
from mmadapt.errors import DataError

Builder = Literal["parquet", "arrow", "json", "csv", "webdataset", "imagefolder", "audiofolder", "saved"]
Modality = Literal["image", "audio"]
# How a file's suffix names the `datasets` builder that reads it (a folder: imagefolder, or a save_to_disk folder)
SUFFIX_BUILDERS = {".parquet": "parquet", ".arrow": "arrow", ".jsonl": "json", ".json": "json", ".csv": "csv", ".tar": "webdataset"}


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
        builder = builder or self._builder()
        try:
            if builder == "saved":
                table = datasets.load_from_disk(str(self.path))
                table = table[split] if isinstance(table, datasets.DatasetDict) else table
            else:
                table = datasets.load_dataset(builder, split=split, **self._files(builder, split))
        except (FileNotFoundError, ValueError, KeyError, datasets.exceptions.DatasetGenerationError) as exc:
            raise DataError(f"{self.path}: not a {builder} dataset with a '{split}' split ({str(exc).splitlines()[0]})") from None
        missing = [c for c in (self.column, text_column, prompt_column) if c and c not in table.column_names]
        if missing:
            raise DataError(f"{self.path}: no column {', '.join(repr(c) for c in missing)}; its columns: {', '.join(table.column_names)}")
        feature = table.features[self.column]
        if isinstance(feature, (datasets.Image, datasets.Audio)):  # undecoded: a bad member is the collator's to count
            table = table.cast_column(self.column, type(feature)(decode=False))
        self.table = table
        self.root = self.path if self.path.is_dir() else self.path.parent  # where a column of relative paths starts

    def _files(self, builder: str, split: str) -> dict[str, Any]:
        """load_dataset's arguments for the path: a folder of tar shards is their sorted list (the LAION/CC layout)."""
        if builder == "webdataset" and self.path.is_dir():
            shards = sorted(str(p) for p in self.path.glob("*.tar"))
            if not shards:
                raise DataError(f"{self.path}: no .tar shards in this folder")
            return {"data_files": {split: shards}}
        if builder == "webdataset":
            return {"data_files": {split: [str(self.path)]}}
        return {"data_dir": str(self.path)} if self.path.is_dir() else {"data_files": str(self.path)}

    def _builder(self) -> str:
        if self.path.is_dir():
            if (self.path / "dataset_dict.json").exists() or (self.path / "state.json").exists():
                return "saved"
            if any(self.path.glob("*.tar")):
                return "webdataset"
            return "audiofolder" if self.modality == "audio" else "imagefolder"
        builder = SUFFIX_BUILDERS.get(self.path.suffix)
        if builder is None:
            raise DataError(f"{self.path}: cannot tell the datasets builder from the suffix; set builder: "
                            f"({', '.join(sorted(set(SUFFIX_BUILDERS.values())))}, imagefolder, audiofolder, saved)")
        return builder

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
