"""The collator that turns samples into a batch, the bad-sample tally, and building a `data:` section."""
from __future__ import annotations

import logging
from pathlib import Path
from collections.abc import Callable
from typing import Any

import torch
from torch.utils.data import Dataset

from mmadapt.data.modalities import modality_fields
from mmadapt.errors import DataError, MMAdaptError

log = logging.getLogger(__name__)


def sample_source(sample: dict[str, Any]) -> str:
    """The file a sample came from, for messages; in-memory samples (the digits) are named by their key."""
    for field in modality_fields():
        if isinstance(sample.get(field), (str, Path)):
            return str(sample[field])
        if getattr(sample.get(field), "source", None):  # bytes kept in a table, named by table, row and column
            return str(sample[field].source)
    return f"key {sample.get('key', '?')}"


# (encoder node, its port, the sample field it reads, the encoder's preprocess_batch): what AssembledModel.readers() gives
Reader = tuple[str, str, str, Callable[[list[Any]], list[Any]]]
BadReport = tuple[int, str, str]  # (sample id, source file, reason): one bad sample met once


def prompt_of(sample: dict[str, Any]) -> str | list[dict[str, str]]:
    """What generation continues for a sample: its prompt, or a conversation up to its last answer (so that the training
    log's examples ask the last question after its history, through the chat template, as `mmadapt eval` does)."""
    turns = sample.get("conversations")
    if isinstance(turns, list) and len(turns) > 1 and turns[-1].get("from") == "gpt":
        return turns[:-1]
    return sample["prompt"]


class BadSamples:
    """The bad samples a run met: each distinct one (by sample id) with its source and first reason, and how many
    times any was met (a bad file is met again every epoch)."""

    def __init__(self) -> None:
        self.first: dict[int, tuple[str, str]] = {}  # sample id -> (source, reason) when first met
        self.occurrences = 0

    def add(self, reports: list[BadReport]) -> None:
        for sample_id, source, reason in reports:
            self.occurrences += 1
            self.first.setdefault(sample_id, (source, reason))

    def __len__(self) -> int:
        return len(self.first)

    @property
    def files(self) -> int:
        """Distinct source files; fewer than samples when rows share a file."""
        return len({source for source, _ in self.first.values()})

    @property
    def messages(self) -> list[str]:
        """The first reason of each distinct bad sample, in the order they were met."""
        return [reason for _, reason in self.first.values()]

    def summary(self, shown: int = 3, bullets: bool = False) -> str:
        """One line for the log, e.g. "skipped 6 bad-sample occurrences from 2 distinct files; first: …"; or the first
        reasons one per line."""
        more = [f"and {len(self) - shown} more"] if len(self) > shown else []
        first = self.messages[:shown] + more
        listed = "".join(f"\n  - {m}" for m in first) if bullets else " " + "; ".join(first)
        return f"skipped {self.occurrences} bad-sample occurrences from {self.files} distinct files; first:{listed}"


class Collator:
    """Turns samples into a batch: each node's data inputs, preprocessed by that node, and token tensors.

    It keeps no state: the samples it drops are reported in the batch, under "bad", so the count is exact even when
    DataLoader workers run it in other processes. A batch with no good sample is {"size": 0, "bad": [...]}.
    """

    def __init__(self, readers: list[Reader], generator: Any, generator_name: str, max_tokens: int,
                 skip_bad_samples: bool = True, cache: Any | None = None) -> None:
        self.readers = readers  # every encoder input read from data, with the encoder's preprocess_batch
        self.generator, self.generator_name = generator, generator_name  # its prepare / collate make the generator's data
        self.max_tokens = max_tokens
        self.skip_bad_samples = skip_bad_samples
        self.cache = cache  # a FeatureCache; its nodes' inputs are read from disk instead of preprocessed

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        prepared: dict[tuple[str, str], dict[int, torch.Tensor]] = {}
        grouped: set[tuple[str, int]] = set()  # (encoder, sample) pairs that gave a list
        bad: dict[int, str] = {}  # sample id -> why it is dropped
        for sample in samples:  # a dataset's stand-in for a row it could not read (see data.conversations)
            if "problem" in sample:
                self._skip(sample, DataError(sample["problem"]), bad)
        if self.cache is not None:
            for sample in samples:
                if sample["id"] not in bad and not self.cache.has(sample["key"], self.carried_nodes(self.cache.nodes, sample)):
                    self._skip(sample, DataError(f"sample {sample['id']} ({sample_source(sample)}): no cache entry; it failed to encode"), bad)
        for name, port, field, preprocess_batch in self._encoder_data_ports():
            carrying = []
            for sample in samples:
                if sample["id"] in bad:
                    continue
                if field not in sample:
                    if field in sample.get("fields_absent", ()):
                        continue  # a sample of another modality (a mixture): this encoder skips it
                    raise MMAdaptError(f"graph.{name}.inputs.{port}: the data has no field '{field}'; it has: {', '.join(sorted(sample))}")
                carrying.append(sample)
            items = [list(s[field]) if isinstance(s[field], (list, tuple)) else [s[field]] for s in carrying]
            flat = iter(preprocess_batch([item for group in items for item in group]))  # one call for the whole batch
            values: dict[int, torch.Tensor] = {}
            for sample, group in zip(carrying, items):
                done = [next(flat) for _ in group]
                error = next((v for v in done if isinstance(v, DataError)), None if group else
                             DataError(f"sample {sample['id']} ({sample_source(sample)}): an empty list under '{field}'"))
                if error is not None:
                    self._skip(sample, error, bad)
                elif isinstance(sample[field], (list, tuple)):
                    grouped.add((name, sample["id"]))
                    values[sample["id"]] = torch.stack(done)  # (n_i, ...): the sample's inputs, in the order of its markers
                else:
                    values[sample["id"]] = done[0]
            prepared[(name, port)] = values
        generator_rows: dict[int, Any] = {}
        for sample in samples:
            if sample["id"] in bad:
                continue
            try:
                generator_rows[sample["id"]] = self.generator.prepare(sample, self.max_tokens)
            except DataError as exc:
                self._skip(sample, exc, bad)
        kept = [s for s in samples if s["id"] not in bad]
        report: list[BadReport] = [(s["id"], sample_source(s), bad[s["id"]]) for s in samples if s["id"] in bad]
        if not kept:
            return {"size": 0, "bad": report}
        node_inputs: dict[str, dict[str, torch.Tensor]] = {}
        rows: dict[str, list[int]] = {}  # encoders that run on some rows only: samples of a mixture carry one modality each
        for (name, port), values in prepared.items():
            present = [i for i, s in enumerate(kept) if s["id"] in values]
            if present and any(node == name for node, _ in grouped):  # each row's inputs one after another; `rows` says whose each one is
                groups = [values[kept[i]["id"]] if (name, kept[i]["id"]) in grouped else values[kept[i]["id"]][None] for i in present]
                node_inputs.setdefault(name, {})[port] = torch.cat(groups)  # (sum n_i, ...)
                rows[name] = [i for i, group in zip(present, groups) for _ in range(group.shape[0])]
                continue
            if present:
                node_inputs.setdefault(name, {})[port] = torch.stack([values[kept[i]["id"]] for i in present])  # (B_node, ...)
            if len(present) < len(kept):
                rows[name] = present
        if self.cache is not None:
            for name in self.cache.nodes:
                present = [i for i, s in enumerate(kept) if name in self.carried_nodes([name], s)]
                if len(present) < len(kept):
                    rows[name] = present
        node_inputs[self.generator_name] = self.generator.collate([generator_rows[s["id"]] for s in kept])
        batch: dict[str, Any] = {
            "size": len(kept),
            "ids": [s["id"] for s in kept],
            "keys": [s["key"] for s in kept],
            "prompts": [prompt_of(s) for s in kept],
            "targets": [s["target"] for s in kept],
            "texts": [s["text"] for s in kept],
            "node_inputs": node_inputs,
            "bad": report,
        }
        if rows:
            batch["rows"] = rows
        if self.cache is not None:
            batch["precomputed"] = self.cache.load_batch(batch["keys"], rows)
        return batch

    def carried_nodes(self, nodes: list[str], sample: dict[str, Any]) -> list[str]:
        """The encoders among `nodes` whose data fields this sample carries (all of them, outside a mixture)."""
        absent = set(sample.get("fields_absent", ()))
        fields: dict[str, list[str]] = {}
        for name, _, field, _ in self.readers:
            fields.setdefault(name, []).append(field)
        return [name for name in nodes if not absent.intersection(fields.get(name, []))]

    def _encoder_data_ports(self) -> list[Reader]:
        """The readers of encoders not served by the cache."""
        return [r for r in self.readers if self.cache is None or r[0] not in self.cache.nodes]

    def _skip(self, sample: dict[str, Any], exc: DataError, bad: dict[int, str]) -> None:
        if not self.skip_bad_samples:
            raise exc
        log.warning("skipping a bad sample: %s", exc)
        bad[sample["id"]] = str(exc)


def collator_for(model: Any, max_tokens: int, skip_bad_samples: bool = True, cache: Any | None = None) -> Collator:
    """The collator of an assembled model: its encoders' readers and its generator."""
    return Collator(model.readers(), model.generator, model.generator_name, max_tokens, skip_bad_samples, cache)


def batch_to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """A copy of a collated batch with its tensors on `device` (the collator works on the CPU)."""
    moved = dict(batch)
    moved["node_inputs"] = {n: {p: t if t is None else t.to(device) for p, t in ports.items()} for n, ports in batch["node_inputs"].items()}
    if "precomputed" in batch:
        moved["precomputed"] = {n: t.to(device) for n, t in batch["precomputed"].items()}
    return moved


def build_dataset(section: dict[str, Any]) -> Dataset:
    """Instantiate a `data:` section through the DATA_TYPES table or a dotted path."""
    from mmadapt.core.registry import DATA_TYPES, resolve

    cls = resolve(str(section.get("type", "")), DATA_TYPES)
    return cls(**{k: v for k, v in section.items() if k != "type"})
