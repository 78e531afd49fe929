"""Image- and audio-caption files (JSONL or CSV) and the prompt templates."""
from __future__ import annotations

import csv
import hashlib
import json
import logging
from pathlib import Path
from typing import Annotated, Any, ClassVar

from torch.utils.data import Dataset

from mmadapt.core.params import OneOf
from mmadapt.core.semantics import Finding, file_and_root_findings
from mmadapt.errors import DataError, MMAdaptError

log = logging.getLogger(__name__)

# name -> (prompt format, target format). `{prompt}` is the sample's question, `{text}` its answer/caption.
TEMPLATES: dict[str, tuple[str, str]] = {
    "caption": ("", "{text}"),
    "instruction": ("Question: {prompt} Answer:", " {text}"),
    "raw": ("{prompt}", " {text}"),  # the prompt as written, e.g. with a modality marker: "<audio>Question: … Answer:"
}
Template = Annotated[str, OneOf(tuple(TEMPLATES))]  # a name in TEMPLATES
TOKEN_FIELDS = ("input_ids", "attention_mask", "labels")
CAPTION_FIELDS = frozenset({"prompt", "target", "text", "key", "id"})  # what every captioned sample carries beside its modality


def format_sample(template: str, text: str, prompt: str = "") -> tuple[str, str]:
    if template not in TEMPLATES:
        raise MMAdaptError(f"unknown template '{template}'; known: {', '.join(TEMPLATES)}")
    prompt_format, target_format = TEMPLATES[template]
    return prompt_format.format(prompt=prompt), target_format.format(text=text)


def prompt_for(section: dict[str, Any], question: str | None = None) -> str:
    """The prompt for a section: with no question, the one it trained with (its caption prompt); a question goes into
    its template, and a raw template (a prompt as written, no question slot) is asked in eval's instruction form."""
    template = section.get("template", "caption")
    if not question:
        return format_sample(template, "", section.get("prompt", ""))[0]
    return format_sample("instruction" if template == "raw" else template, "", question)[0]


def file_key(path: Path) -> str:
    """Content hash of a file: the cache entry changes when the file's bytes do, whatever its name."""
    return hashlib.sha1(path.read_bytes()).hexdigest()


class ImageCaptionDataset(Dataset):
    """Rows of (image path, text[, prompt]) from a JSONL or CSV file; image paths are relative to the file."""

    field = "image"  # the row's file column, and the sample field the encoder reads
    fields: ClassVar[frozenset[str]] = CAPTION_FIELDS | {field}  # every sample's keys: what `data.FIELD` inputs may name

    @classmethod
    def param_problems(cls, params: dict[str, Any]) -> list[Finding]:
        """The file and its root folder exist; relative paths start at the current folder, as the dataset opens them."""
        return file_and_root_findings(params, f"{cls.field}_root")  # image_root, audio_root

    def __init__(
        self,
        path: str,  # a .jsonl (one {"image", "text"[, "prompt"]} per line) or .csv with those columns
        image_root: str | None = None,  # where relative image paths start; default: the file's folder
        template: Template = "caption",  # a name in mmadapt.data.captions.TEMPLATES
        prompt: str = "",  # the question for every row that has none of its own
    ) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise DataError(f"{self.path}: data file not found")
        self.root = Path(image_root) if image_root else self.path.parent
        self.template = template
        format_sample(template, "", "")  # fail now on an unknown template
        self.rows = self._read_rows(prompt)

    def _read_rows(self, default_prompt: str) -> list[dict[str, str]]:
        rows: list[dict[str, str]] = []
        if self.path.suffix == ".csv":
            with self.path.open(newline="") as handle:
                records = [(i + 2, r) for i, r in enumerate(csv.DictReader(handle))]
        elif self.path.suffix in (".jsonl", ".json"):
            records = []
            for number, line in enumerate(self.path.read_text().splitlines(), start=1):
                if not line.strip():
                    continue
                try:
                    records.append((number, json.loads(line)))
                except json.JSONDecodeError as exc:
                    raise DataError(f"{self.path}:{number}: not valid JSON ({exc.msg})") from None
        else:
            raise DataError(f"{self.path}: expected a .jsonl or .csv file")
        for number, record in records:
            if not isinstance(record, dict) or not record.get(self.field) or record.get("text") is None:
                raise DataError(f"{self.path}:{number}: each row needs '{self.field}' and 'text'")
            rows.append({self.field: str(self.root / record[self.field]), "text": str(record["text"]), "prompt": str(record.get("prompt") or default_prompt)})
        if not rows:
            raise DataError(f"{self.path}: no rows")
        return rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, Any]:
        row = self.rows[index]
        prompt, target = format_sample(self.template, row["text"], row["prompt"])
        path = Path(row[self.field])
        try:
            key = file_key(path)
        except OSError as exc:
            key = f"unreadable:{path}:{exc.strerror}"  # the collator reports and skips it
        return {self.field: path, "prompt": prompt, "target": target, "text": row["text"], "key": key, "id": index}


class AudioCaptionDataset(ImageCaptionDataset):
    """Rows of (audio path, text[, prompt]) from a JSONL or CSV file: AudioCaps, Clotho or VGGSound lists, converted."""

    field = "audio"
    fields: ClassVar[frozenset[str]] = CAPTION_FIELDS | {field}

    def __init__(self, path: str, audio_root: str | None = None, template: Template = "caption", prompt: str = "") -> None:
        super().__init__(path, audio_root, template, prompt)


