"""On-disk cache of frozen encoder outputs, keyed by encoder identity and input content."""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch.utils.data import Dataset

from mmadapt.core.checkpoint_io import read_safetensors
from mmadapt.data.collate import BadReport, batch_to_device
from mmadapt.errors import MMAdaptError
from mmadapt.core.model import AssembledModel


@dataclass
class CacheStats:
    """What a cache pass did, for the log and for the benchmarks' break-even figure."""

    built: int
    reused: int
    skipped: int
    seconds: float
    bytes_per_sample: float
    bad: list[BadReport] = field(default_factory=list)  # the skipped samples, for the run's bad-sample count


def identity_digest(identity: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:24]


class FeatureCache:
    """One safetensors file per (encoder identity, sample content). A changed key is a different file."""

    def __init__(self, root: str | Path, model: AssembledModel, nodes: list[str]) -> None:
        self.root = Path(root)
        self.model = model
        self.nodes = list(nodes)
        # The identity covers the encoder's class, base, weights hash, layer, feature choice and transform.
        self.dirs = {n: self.root / identity_digest(model.nodes[n].cache_identity()) for n in self.nodes}
        for node, folder in self.dirs.items():
            folder.mkdir(parents=True, exist_ok=True)
            identity_file = folder / "identity.json"
            if not identity_file.exists():
                identity_file.write_text(json.dumps(model.nodes[node].cache_identity(), indent=2, default=str))

    def entry(self, node: str, key: str) -> Path:
        return self.dirs[node] / key[:2] / f"{key}.safetensors"

    def has(self, key: str, nodes: list[str] | None = None) -> bool:
        """Whether the entries of `nodes` (default: every cached encoder) exist for this sample."""
        return all(self.entry(n, key).is_file() for n in (self.nodes if nodes is None else nodes))

    def load_batch(self, keys: list[str], rows: dict[str, list[int]] | None = None) -> dict[str, torch.Tensor]:
        """Each cached encoder's features (B, N, D) for the batch; in a mixed batch only for the rows it covers."""
        rows = rows or {}
        return {n: torch.stack([self.read(self.entry(n, keys[i])) for i in rows.get(n, range(len(keys)))])
                for n in self.nodes if rows.get(n) != []}

    @staticmethod
    def read(path: Path) -> torch.Tensor:
        """One entry's features; a damaged entry (a disk filled mid-write) is an error naming it and the remedy."""
        try:
            return read_safetensors(path, MMAdaptError)["features"]
        except (MMAdaptError, KeyError) as exc:
            raise MMAdaptError(f"feature cache: {exc if isinstance(exc, MMAdaptError) else f'{path}: no features tensor'}; "
                               "delete that file (or the cache folder) and it is rebuilt") from None

    @torch.no_grad()
    def build(self, dataset: Dataset, collator: Any, batch_size: int, rank: int = 0, world: int = 1) -> CacheStats:
        """Encode the samples whose entries are missing (this rank's share); bad samples are skipped and counted."""
        start = time.perf_counter()
        keys, carried = {}, {}
        for i in range(rank, len(dataset), world):  # read (and hash) each input once
            sample = dataset[i]
            keys[i], carried[i] = sample["key"], collator.carried_nodes(self.nodes, sample)
        missing = [i for i, key in keys.items() if not self.has(key, carried[i])]
        reused = len(keys) - len(missing)
        built, bad = 0, []
        self.model.eval()
        for offset in range(0, len(missing), batch_size):
            samples = [dataset[i] for i in missing[offset: offset + batch_size]]
            batch = collator(samples)
            bad += batch["bad"]
            if not batch["size"]:
                continue
            batch = batch_to_device(batch, next(self.model.parameters()).device)
            rows = batch.get("rows", {})
            for node in self.nodes:
                if rows.get(node) == []:
                    continue  # no sample of this batch carries the node's modality
                if node in rows and len(set(rows[node])) < len(rows[node]):  # one entry per sample holds one input's features
                    raise MMAdaptError(f"graph.{node}: samples with several inputs each (a list of images) cannot use the "
                                       "feature cache yet; set train.cache_frozen_features: false")
                features = self.model.nodes[node](**self.model.node_kwargs(node, batch, {})).cpu()  # (B_node, N, D)
                node_keys = [batch["keys"][i] for i in rows[node]] if node in rows else batch["keys"]
                for key, row in zip(node_keys, features):
                    self._write(self.entry(node, key), row)
            built += batch["size"]
        measured = [i for i in list(keys)[:8] if self.has(keys[i], carried[i])]
        per_sample = sum(self.entry(n, keys[i]).stat().st_size for i in measured for n in carried[i]) / max(1, len(measured))
        return CacheStats(built, reused, len(bad), time.perf_counter() - start, per_sample, bad)

    @staticmethod
    def _write(path: Path, features: torch.Tensor) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        save_file({"features": features.contiguous()}, str(tmp))
        os.replace(tmp, path)  # atomic: a reader never sees half a file
