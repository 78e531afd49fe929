"""Data: image-caption files (JSONL or CSV), prompt templates, and the collator that feeds the graph."""
from __future__ import annotations

import csv
import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from mmadapt.errors import DataError, MMAdaptError
from mmadapt.nodes import Encoder

log = logging.getLogger(__name__)

# name -> (prompt format, target format). `{prompt}` is the sample's question, `{text}` its answer/caption.
TEMPLATES: dict[str, tuple[str, str]] = {
    "caption": ("", "{text}"),
    "instruction": ("Question: {prompt} Answer:", " {text}"),
    "raw": ("{prompt}", " {text}"),  # the prompt as written, e.g. with a modality marker: "<audio>Question: … Answer:"
}
TOKEN_FIELDS = ("input_ids", "attention_mask", "labels")


def format_sample(template: str, text: str, prompt: str = "") -> tuple[str, str]:
    if template not in TEMPLATES:
        raise MMAdaptError(f"unknown template '{template}'; known: {', '.join(TEMPLATES)}")
    prompt_format, target_format = TEMPLATES[template]
    return prompt_format.format(prompt=prompt), target_format.format(text=text)


def file_key(path: Path) -> str:
    """Content hash of a file: the cache entry changes when the file's bytes do, whatever its name."""
    return hashlib.sha1(path.read_bytes()).hexdigest()


class ImageCaptionDataset(Dataset):
    """Rows of (image path, text[, prompt]) from a JSONL or CSV file; image paths are relative to the file."""

    field = "image"  # the row's file column, and the sample field the encoder reads

    def __init__(
        self,
        path: str,  # a .jsonl (one {"image", "text"[, "prompt"]} per line) or .csv with those columns
        image_root: str | None = None,  # where relative image paths start; default: the file's folder
        template: str = "caption",  # a name in mmadapt.data.TEMPLATES
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

    def __init__(self, path: str, audio_root: str | None = None, template: str = "caption", prompt: str = "") -> None:
        super().__init__(path, audio_root, template, prompt)


def sample_source(sample: dict[str, Any]) -> str:
    """The file a sample came from, for messages; in-memory samples (the digits) are named by their key."""
    for field in ("image", "audio", "points"):
        if isinstance(sample.get(field), (str, Path)):
            return str(sample[field])
    return f"key {sample.get('key', '?')}"


class Collator:
    """Turns samples into a batch: each node's data inputs, preprocessed by that node, and token tensors."""

    def __init__(self, model: Any, max_tokens: int, skip_bad_samples: bool = True, cache: Any | None = None) -> None:
        self.model = model
        self.max_tokens = max_tokens
        self.skip_bad_samples = skip_bad_samples
        self.cache = cache  # a FeatureCache; its nodes' inputs are read from disk instead of preprocessed
        self.bad_samples: list[str] = []

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, Any] | None:
        prepared: dict[tuple[str, str], dict[int, torch.Tensor]] = {}
        bad: set[int] = set()
        if self.cache is not None:
            for sample in samples:
                if not self.cache.has(sample["key"], self.carried_nodes(self.cache.nodes, sample)):
                    self._skip(DataError(f"sample {sample['id']} ({sample_source(sample)}): no cache entry; it failed to encode"))
                    bad.add(sample["id"])
        for name, port, field in self._encoder_data_ports():
            node = self.model.nodes[name]
            carrying = []
            for sample in samples:
                if sample["id"] in bad:
                    continue
                if field not in sample:
                    if field in sample.get("fields_absent", ()):
                        continue  # a sample of another modality (a mixture): this encoder skips it
                    raise MMAdaptError(f"graph.{name}.inputs.{port}: the data has no field '{field}'; it has: {', '.join(sorted(sample))}")
                carrying.append(sample)
            values: dict[int, torch.Tensor] = {}
            for sample, value in zip(carrying, node.preprocess_batch([s[field] for s in carrying])):
                if isinstance(value, DataError):
                    self._skip(value)
                    bad.add(sample["id"])
                else:
                    values[sample["id"]] = value
            prepared[(name, port)] = values
        decoder_rows: dict[int, Any] = {}
        for sample in samples:
            if sample["id"] in bad:
                continue
            try:
                decoder_rows[sample["id"]] = self.model.decoder.prepare(sample, self.max_tokens)
            except DataError as exc:
                self._skip(exc)
                bad.add(sample["id"])
        kept = [s for s in samples if s["id"] not in bad]
        if not kept:
            return None
        node_inputs: dict[str, dict[str, torch.Tensor]] = {}
        rows: dict[str, list[int]] = {}  # encoders that run on some rows only: samples of a mixture carry one modality each
        for (name, port), values in prepared.items():
            present = [i for i, s in enumerate(kept) if s["id"] in values]
            if present:
                node_inputs.setdefault(name, {})[port] = torch.stack([values[kept[i]["id"]] for i in present])  # (B_node, ...)
            if len(present) < len(kept):
                rows[name] = present
        if self.cache is not None:
            for name in self.cache.nodes:
                present = [i for i, s in enumerate(kept) if name in self.carried_nodes([name], s)]
                if len(present) < len(kept):
                    rows[name] = present
        node_inputs[self.model.decoder_name] = self.model.decoder.collate([decoder_rows[s["id"]] for s in kept])
        batch: dict[str, Any] = {
            "size": len(kept),
            "ids": [s["id"] for s in kept],
            "keys": [s["key"] for s in kept],
            "prompts": [s["prompt"] for s in kept],
            "targets": [s["target"] for s in kept],
            "texts": [s["text"] for s in kept],
            "node_inputs": node_inputs,
        }
        if rows:
            batch["rows"] = rows
        if self.cache is not None:
            batch["precomputed"] = self.cache.load_batch(batch["keys"], rows)
        return batch

    def carried_nodes(self, nodes: list[str], sample: dict[str, Any]) -> list[str]:
        """The encoders among `nodes` whose data fields this sample carries (all of them, outside a mixture)."""
        absent = set(sample.get("fields_absent", ()))
        fields = {name: [r.key for refs in self.model.plan.inputs[name].values() for r in refs if r.is_data] for name in nodes}
        return [name for name in nodes if not absent.intersection(fields[name])]

    def _encoder_data_ports(self) -> list[tuple[str, str, str]]:
        """(node, port, data field) for every encoder input read from data and not served by the cache."""
        found = []
        for name, ports in self.model.plan.inputs.items():
            if not isinstance(self.model.nodes[name], Encoder) or (self.cache is not None and name in self.cache.nodes):
                continue
            for port, refs in ports.items():
                found += [(name, port, r.key) for r in refs if r.is_data]
        return found

    def _skip(self, exc: DataError) -> None:
        if not self.skip_bad_samples:
            raise exc
        log.warning("skipping a bad sample: %s", exc)
        self.bad_samples.append(str(exc))


def batch_to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """A copy of a collated batch with its tensors on `device` (the collator works on the CPU)."""
    moved = dict(batch)
    moved["node_inputs"] = {n: {p: t if t is None else t.to(device) for p, t in ports.items()} for n, ports in batch["node_inputs"].items()}
    if "precomputed" in batch:
        moved["precomputed"] = {n: t.to(device) for n, t in batch["precomputed"].items()}
    return moved


def build_dataset(section: dict[str, Any]) -> Dataset:
    """Instantiate a `data:` section through the DATA_TYPES table or a dotted path."""
    from mmadapt.registry import DATA_TYPES, resolve

    cls = resolve(str(section.get("type", "")), DATA_TYPES)
    return cls(**{k: v for k, v in section.items() if k != "type"})
