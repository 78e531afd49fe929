"""Build `fsdd-audiomae`: a tiny AudioMAE pretrained on FSDD's train recordings, self-supervised: masked-spectrogram
reconstruction plus agreement of two augmented views."""
from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mmadapt.encoders.audio import AudioRules, read_audio
from mmadapt.encoders.audiomae import AudioMAE, AudioMAEConfig
from mmadapt.data.fsdd import FSDDCaptions
from mmadapt.zoo.build.digits_points import info_nce

# AudioMAE's front end (16 kHz, 128 Kaldi mel bins, 16x16 patches) over 0.96 s, which holds 99% of FSDD clips whole
# (median 0.43 s, max 1.31 s): a longer window would be mostly padding, tokens that say nothing about the digit.
MODEL_CFG = {"target_length": 96, "num_mel_bins": 128, "patch_size": 16, "embed_dim": 128, "depth": 4, "num_heads": 4}
MASK_RATIO = 0.8  # AudioMAE's: the encoder sees a fifth of the patches
DECODER_WIDTH, DECODER_DEPTH = 96, 2
MAX_SHIFT_FRAMES = 16  # a clip slides within its padded 0.96 s window, so the encoder does not learn where speech starts
# Vocal-tract-length and tempo perturbation: two views of a clip differ the way two speakers saying the same word do,
# so agreement rewards what is said over who says it (no labels: each clip is only its own positive).
MEL_WARP, TIME_WARP = (0.8, 1.2), (0.8, 1.25)
MEL_MASK, TIME_MASK = 16, 12  # SpecAugment widths for the two-view agreement
CONTRASTIVE_WEIGHT, TEMPERATURE = 0.5, 0.1


def raw_fbanks(split: str, root: str | None, cfg: AudioMAEConfig) -> tuple[torch.Tensor, np.ndarray, list[str]]:
    """Unnormalized, padded Kaldi fbanks (N, T, F) of an FSDD split, its digits and speakers."""
    from transformers import ASTFeatureExtractor

    dataset = FSDDCaptions(split=split, root=root, style="fixed")
    extractor = ASTFeatureExtractor(num_mel_bins=cfg.num_mel_bins, max_length=cfg.target_length, do_normalize=False)
    rules = AudioRules(cfg.sampling_rate)
    banks = [extractor(read_audio(row[0], rules), sampling_rate=cfg.sampling_rate, return_tensors="pt")["input_values"][0]
             for row in dataset.rows]
    return torch.stack(banks), np.array([row[1] for row in dataset.rows]), [row[2] for row in dataset.rows]


class SpectrogramDecoder(nn.Module):
    """MAE's light decoder: visible tokens plus mask tokens in patch order, then each patch's 256 fbank values.

    Written here because timm ships the ViT encoder but no MAE decoder or masking.
    """

    def __init__(self, width: int, patches: int, patch_values: int) -> None:
        super().__init__()
        from timm.models.vision_transformer import Block

        self.embed = nn.Linear(width, DECODER_WIDTH)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, DECODER_WIDTH))
        self.pos_embed = nn.Parameter(torch.randn(1, patches, DECODER_WIDTH) * 0.02)
        self.blocks = nn.Sequential(*(Block(DECODER_WIDTH, 4, mlp_ratio=4.0) for _ in range(DECODER_DEPTH)))
        self.norm = nn.LayerNorm(DECODER_WIDTH)
        self.head = nn.Linear(DECODER_WIDTH, patch_values)

    def forward(self, visible: torch.Tensor, keep: torch.Tensor, patches: int) -> torch.Tensor:
        batch = visible.shape[0]
        full = self.mask_token.expand(batch, patches, -1).clone()  # (B, P, Dd)
        full.scatter_(1, keep[..., None].expand(-1, -1, DECODER_WIDTH), self.embed(visible))
        return self.head(self.norm(self.blocks(full + self.pos_embed)))  # (B, P, 256)


def patchify(images: torch.Tensor, size: int) -> torch.Tensor:
    """(B, T, F) -> (B, P, size*size) in the patch embedding's row-major order."""
    batch, frames, bins = images.shape
    grid = images.reshape(batch, frames // size, size, bins // size, size)
    return grid.permute(0, 1, 3, 2, 4).reshape(batch, (frames // size) * (bins // size), size * size)


def masked_loss(vit: nn.Module, decoder: SpectrogramDecoder, images: torch.Tensor, generator: torch.Generator,
                pad_value: float) -> torch.Tensor:
    """MAE: encode a random fifth of the patches, rebuild the rest; MSE on per-patch-normalized targets of the masked
    patches that hold sound (a patch of pure padding is constant, so rebuilding it teaches nothing)."""
    tokens = vit.patch_embed(images[:, None]) + vit.pos_embed[:, 1:]  # (B, P, D); position 0 is the class token's
    batch, patches, width = tokens.shape
    kept = int(patches * (1 - MASK_RATIO))
    order = torch.rand(batch, patches, generator=generator).argsort(dim=1)
    keep = order[:, :kept]  # (B, V)
    visible = tokens.gather(1, keep[..., None].expand(-1, -1, width))
    cls = (vit.cls_token + vit.pos_embed[:, :1]).expand(batch, -1, -1)
    encoded = vit.norm(vit.blocks(torch.cat([cls, visible], dim=1)))[:, 1:]  # (B, V, D)
    predicted = decoder(encoded, keep, patches)
    pieces = patchify(images, vit.patch_embed.patch_size[0])  # (B, P, size * size)
    target = (pieces - pieces.mean(-1, keepdim=True)) / (pieces.var(-1, keepdim=True) + 1e-6).sqrt()
    sound = (pieces != pad_value).any(-1)  # (B, P)
    masked = torch.ones(batch, patches, dtype=torch.bool).scatter_(1, keep, False) & sound
    return F.mse_loss(predicted[masked], target[masked])


def shifted(images: torch.Tensor, generator: torch.Generator, pad_value: float) -> torch.Tensor:
    """Each clip slid later in its window by its own 0..MAX_SHIFT_FRAMES frames, padding in front."""
    out = torch.full_like(images, pad_value)
    for row, shift in enumerate(torch.randint(0, MAX_SHIFT_FRAMES + 1, (len(images),), generator=generator).tolist()):
        out[row, shift:] = images[row, : images.shape[1] - shift]
    return out


def warped(images: torch.Tensor, generator: torch.Generator, pad_value: float) -> torch.Tensor:
    """Each clip's mel axis and time axis stretched by its own random factors, anchored at 0 Hz and the clip's start."""
    batch = len(images)
    mel = torch.empty(batch).uniform_(*MEL_WARP, generator=generator)
    tempo = torch.empty(batch).uniform_(*TIME_WARP, generator=generator)
    theta = torch.zeros(batch, 2, 3)  # grid_sample's x is the mel axis (width), y is time (height)
    theta[:, 0, 0], theta[:, 0, 2] = 1 / mel, 1 / mel - 1  # x_src = (x + 1) / factor - 1 keeps x = -1 fixed
    theta[:, 1, 1], theta[:, 1, 2] = 1 / tempo, 1 / tempo - 1
    grid = F.affine_grid(theta, (batch, 1, *images.shape[1:]), align_corners=False)
    moved = F.grid_sample((images - pad_value)[:, None], grid, align_corners=False, padding_mode="zeros")[:, 0]
    return moved + pad_value  # what falls outside the clip becomes padding


def spec_augment(images: torch.Tensor, generator: torch.Generator, pad_value: float) -> torch.Tensor:
    """One random band of mel bins and one span of frames per clip set to the padding value (SpecAugment)."""
    out = images.clone()
    frames, bins = images.shape[1:]
    for row in range(len(images)):
        mel = int(torch.randint(0, bins - MEL_MASK, (1,), generator=generator))
        start = int(torch.randint(0, frames - TIME_MASK, (1,), generator=generator))
        out[row, :, mel: mel + MEL_MASK] = pad_value
        out[row, start: start + TIME_MASK] = pad_value
    return out


@torch.no_grad()
def pooled(encoder: AudioMAE, images: torch.Tensor) -> np.ndarray:
    """The mean-pooled embedding of each normalized fbank, as the `audiomae` node's pooled feature gives it."""
    encoder.eval()
    return torch.cat([encoder(images[i: i + 256])[:, 0] for i in range(0, len(images), 256)]).numpy()


def linear_probe(encoder: AudioMAE, banks: dict[str, torch.Tensor], labels: dict[str, np.ndarray]) -> dict[str, float]:
    """Logistic regression on standardized pooled features: fit on train_all (5-49), score the test split (0-4)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=3000, C=0.5))
    probe.fit(pooled(encoder, banks["train_all"]), labels["train_all"])
    return {"linear_probe_test": float((probe.predict(pooled(encoder, banks["test"])) == labels["test"]).mean())}


def train(out_dir: Path, seed: int = 0, epochs: int = 40, batch_size: int = 64, lr: float = 1.5e-3, threads: int = 2,
          root: str | None = None) -> dict[str, Any]:
    """Self-supervised from scratch on FSDD's train recordings (no labels), save, then measure the linear probe."""
    from transformers import get_cosine_schedule_with_warmup

    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    raw, labels, speakers = {}, {}, {}
    for split in ("train_all", "test"):
        raw[split], labels[split], speakers[split] = raw_fbanks(split, root, AudioMAEConfig(**MODEL_CFG))
    # AudioMAE normalizes by the dataset's fbank mean and std (AudioSet's for the official weights): FSDD's train ones here.
    cfg = AudioMAEConfig(**MODEL_CFG, mean=float(raw["train_all"].mean()), std=float(raw["train_all"].std()))
    banks = {split: (values - cfg.mean) / (2 * cfg.std) for split, values in raw.items()}  # the extractor's normalization

    random_init = linear_probe(AudioMAE(config=asdict(cfg), feature="pooled", seed=seed), banks, labels)
    encoder = AudioMAE(config=asdict(cfg), feature="pooled", seed=seed)
    vit = encoder.model
    patches = vit.patch_embed.num_patches
    decoder = SpectrogramDecoder(cfg.embed_dim, patches, cfg.patch_size ** 2)
    projection = nn.Sequential(nn.Linear(cfg.embed_dim, cfg.embed_dim), nn.GELU(), nn.Linear(cfg.embed_dim, 64))  # SimCLR's head
    parameters = list(vit.parameters()) + list(decoder.parameters()) + list(projection.parameters())
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=0.05, betas=(0.9, 0.95))
    train_banks = banks["train_all"]
    per_epoch = len(train_banks) // batch_size
    schedule = get_cosine_schedule_with_warmup(optimizer, per_epoch * 5, per_epoch * epochs)
    pad_value = (0.0 - cfg.mean) / (2 * cfg.std)  # what the extractor's zero padding becomes after normalization
    start = time.perf_counter()
    for epoch in range(epochs):
        vit.train(), decoder.train()
        order = torch.randperm(len(train_banks), generator=generator)
        total = contrast = 0.0
        for offset in range(0, per_epoch * batch_size, batch_size):
            clips = train_banks[order[offset: offset + batch_size]]
            reconstruction = masked_loss(vit, decoder, shifted(clips, generator, pad_value), generator, pad_value)
            views = spec_augment(shifted(warped(torch.cat([clips, clips]), generator, pad_value), generator, pad_value),
                                 generator, pad_value)
            # The pooled feature (mean of all tokens, as the node pools) of two augmented views should agree. MAE alone
            # gave tokens that a linear probe on their mean reads worse than a random network's (29% vs 50% on the
            # test split), and a Q-Former trained on them never learned the digit: every token must carry the clip.
            first, second = projection(encoder(views)[:, 0]).chunk(2)  # (B, E) each
            agreement = info_nce(first, second, TEMPERATURE)
            loss = reconstruction + CONTRASTIVE_WEIGHT * agreement
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(parameters, 1.0)
            optimizer.step()
            schedule.step()
            total += reconstruction.item()
            contrast += agreement.item()
        if epoch % 10 == 0 or epoch == epochs - 1:
            print(f"epoch {epoch}: masked mse {total / per_epoch:.4f}, contrastive {contrast / per_epoch:.3f} "
                  f"({time.perf_counter() - start:.0f} s)", flush=True)
    seconds = time.perf_counter() - start
    encoder.save(out_dir)
    reloaded = AudioMAE(checkpoint=str(out_dir), feature="pooled")  # measured through the node's own loader
    figures: dict[str, Any] = linear_probe(reloaded, banks, labels)
    figures["linear_probe_test_random_init"] = random_init["linear_probe_test"]
    figures["final_masked_mse"] = round(total / per_epoch, 4)
    figures["final_contrastive"] = round(contrast / per_epoch, 4)
    figures["train_seconds"] = round(seconds, 1)
    torch.set_num_threads(previous_threads)
    return figures
