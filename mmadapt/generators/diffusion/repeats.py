"""In-memory caches of a diffusion generator's frozen per-sample work (VAE posteriors, text-encoder states), for
training data that repeats every epoch, as DreamBooth's few pictures and prompts do."""
from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable

import torch

log = logging.getLogger(__name__)

# What the caches of one generator may hold; past it, new rows are computed each time (and the log says so once).
# DreamBooth's pictures are a few megabytes of posteriors; a large captioned set should not be held in RAM this way.
CACHE_LIMIT_BYTES = 4 * 2**30


def row_key(row: torch.Tensor) -> str:
    """The content of one sample's tensor (any dtype), as a digest: equal tensors share an entry."""
    return hashlib.sha1(row.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()


class RowCache:
    """Per-row results of a frozen function of a batch: rows seen before are read back, the others computed together
    (one call on the missing rows) and kept. A result is a dict of tensors with the batch as their first dimension."""

    def __init__(self, what: str) -> None:
        self.what = what  # for the log: "VAE posteriors", "text-encoder states"
        self.rows: dict[str, dict[str, torch.Tensor]] = {}
        self.held = 0  # bytes
        self.full = False
        self.layout = torch.contiguous_format  # the memory layout of what the cached function gave (posterior_sample)

    def __call__(self, batch: torch.Tensor, compute: Callable[[torch.Tensor], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        keys = [row_key(row) for row in batch]
        missing = list(dict.fromkeys(k for k in keys if k not in self.rows))  # each new content once, in batch order
        fresh: dict[str, dict[str, torch.Tensor]] = {}
        if missing:
            computed = compute(batch[[keys.index(k) for k in missing]])
            for j, key in enumerate(missing):
                fresh[key] = {name: value[j].detach().clone() for name, value in computed.items()}
                self._keep(key, fresh[key])
        rows = [self.rows.get(k) or fresh[k] for k in keys]
        return {name: torch.stack([row[name] for row in rows]) for name in rows[0]}

    def _keep(self, key: str, entry: dict[str, torch.Tensor]) -> None:
        size = sum(t.numel() * t.element_size() for t in entry.values())
        if self.held + size > CACHE_LIMIT_BYTES:
            if not self.full:
                log.warning("the in-memory cache of %s is full (%d rows, %.1f GiB): further rows are computed every step",
                            self.what, len(self.rows), self.held / 2**30)
            self.full = True
            return
        self.rows[key] = entry
        self.held += size


def posterior_sample(cache: RowCache, vae: torch.nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """A draw (B, C, h, w) from each picture's VAE posterior, the posteriors (mean, std) kept in `cache`: the draw
    DiagonalGaussianDistribution.sample makes, in the memory layout its sample has (channels-last on CPU), which the
    noise the generator then draws like the latents (randn_like) follows."""

    def encoded(rows: torch.Tensor) -> dict[str, torch.Tensor]:
        posterior = vae.encode(rows).latent_dist
        probe = posterior.mean + posterior.std  # laid out as the uncached sample
        channels_last = probe.is_contiguous(memory_format=torch.channels_last) and not probe.is_contiguous()
        cache.layout = torch.channels_last if channels_last else torch.contiguous_format
        return {"mean": posterior.mean, "std": posterior.std}

    kept = cache(pixels, encoded)
    drawn = kept["mean"] + kept["std"] * torch.randn(kept["mean"].shape, device=pixels.device, dtype=kept["mean"].dtype)
    return drawn.contiguous(memory_format=cache.layout)
