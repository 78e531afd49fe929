"""`digits-points`: a tiny Point-BERT pretrained self-supervised on 3D digits (masked groups + two-pose agreement), and its probe."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mmadapt.data.digits import load_digits_arrays, split_indices
from mmadapt.encoders.point_cloud import PointBERTBackbone, PointBERTConfig, prepare_cloud, save_backbone
from mmadapt.data.points import DigitsPoints, augment_points, digit_points

MODEL_CFG: dict[str, Any] = dict(
    trans_dim=96, depth=4, num_heads=4, mlp_ratio=2.0,
    num_group=16, group_size=16, num_points=128,  # 16 tokens of 16 points (like digits-clip's 16 patches); groups overlap 2x
    encoder_dims=64, pointnet_widths=(32, 64, 64), pos_hidden=64,
)
MASK_RATIO = 0.6  # Point-MAE's: the encoder sees 40% of the groups and the decoder rebuilds the rest
DECODER_DEPTH = 2
# Point-BERT pairs masked point modelling with a contrastive loss on the class token (MoCo there; SimCLR's in-batch
# form here, needing no momentum encoder): two poses of one digit should agree. Still no label is ever read.
CONTRASTIVE_WEIGHT = 1.0
TEMPERATURE = 0.1
CHAMFER_WEIGHT = 10.0  # Chamfer distances of unit-sphere groups are ~1e-2: scaled towards the contrastive loss's order


def train_clouds(indices: list[int], rng: np.random.Generator) -> torch.Tensor:
    """Fresh points and a fresh random pose for every digit, normalized as the encoder's preprocess does: (N, P, 3)."""
    clouds = torch.from_numpy(augment_points(digit_points(load_digits_arrays()[0][indices], rng, MODEL_CFG["num_points"]), rng))
    centred = clouds - clouds.mean(dim=1, keepdim=True)
    return centred / centred.norm(dim=-1).amax(dim=1)[:, None, None]  # normalize_unit_sphere, for the whole batch at once


class MaskedGroupDecoder(nn.Module):
    """Point-MAE's decoder: visible tokens plus mask tokens at every center, then K points per masked group."""

    def __init__(self, config: PointBERTConfig, depth: int) -> None:
        super().__init__()
        from timm.models.vision_transformer import Block

        width = config.trans_dim
        self.group_size = config.group_size
        self.mask_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embed = nn.Sequential(nn.Linear(3, config.pos_hidden), nn.GELU(), nn.Linear(config.pos_hidden, width))
        self.blocks = nn.ModuleList(Block(width, config.num_heads, mlp_ratio=config.mlp_ratio, norm_layer=nn.LayerNorm) for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, 3 * config.group_size)

    def forward(self, visible: torch.Tensor, visible_centers: torch.Tensor, masked_centers: torch.Tensor) -> torch.Tensor:
        batch, masked = masked_centers.shape[:2]
        x = torch.cat([visible, self.mask_token.expand(batch, masked, -1)], dim=1)  # (B, V + M, D)
        pos = self.pos_embed(torch.cat([visible_centers, masked_centers], dim=1))
        for block in self.blocks:
            x = block(x + pos)
        return self.head(self.norm(x[:, -masked:])).reshape(batch, masked, self.group_size, 3)  # (B, M, K, 3)


def chamfer_l2(predicted: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Symmetric Chamfer distance (mean squared nearest-neighbour distance both ways) over (..., K, 3) point sets."""
    distances = torch.cdist(predicted.reshape(-1, *predicted.shape[-2:]), target.reshape(-1, *target.shape[-2:])) ** 2  # (BM, K, K)
    return distances.min(dim=2).values.mean() + distances.min(dim=1).values.mean()


def view_losses(backbone: PointBERTBackbone, decoder: MaskedGroupDecoder, clouds: torch.Tensor,
                generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """One pose of a batch: (Chamfer loss of the masked groups rebuilt from the visible ones, the pooled feature of all groups)."""
    neighbourhoods, centers = backbone.group(clouds)  # (B, G, K, 3), (B, G, 3)
    tokens = backbone.embed_groups(neighbourhoods)  # (B, G, D)
    whole = backbone.encode(tokens, centers)  # (B, 1 + G, D)
    pooled = torch.cat([whole[:, 0], whole[:, 1:].max(dim=1).values], dim=-1)  # Point-BERT's [class, max] feature
    batch, groups = centers.shape[:2]
    masked_count = int(round(MASK_RATIO * groups))
    order = torch.rand(batch, groups, generator=generator).argsort(dim=1)  # a random mask per cloud
    visible_idx, masked_idx = order[:, masked_count:], order[:, :masked_count]
    pick = lambda t, idx: torch.gather(t, 1, idx.reshape(*idx.shape, *([1] * (t.dim() - 2))).expand(-1, -1, *t.shape[2:]))  # noqa: E731
    visible_centers, masked_centers = pick(centers, visible_idx), pick(centers, masked_idx)
    encoded = backbone.encode(pick(tokens, visible_idx), visible_centers)[:, 1:]  # (B, V, D): the masked groups unseen
    predicted = decoder(encoded, visible_centers, masked_centers)
    return chamfer_l2(predicted, pick(neighbourhoods, masked_idx)), pooled


def info_nce(first: torch.Tensor, second: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR's NT-Xent: each view's partner is the other pose of the same digit; every other view is a negative."""
    z = F.normalize(torch.cat([first, second]), dim=-1)  # (2B, E)
    logits = z @ z.T / temperature
    logits.fill_diagonal_(float("-inf"))
    batch = first.shape[0]
    partners = torch.cat([torch.arange(batch, 2 * batch), torch.arange(batch)])
    return F.cross_entropy(logits, partners)


@torch.no_grad()
def pooled_features(backbone: PointBERTBackbone, split: str, batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Point-BERT's pooled feature [class token, max over groups] of the `digits_points` split (its fixed poses), and labels."""
    dataset = DigitsPoints(split=split, style="fixed")
    clouds = torch.stack([prepare_cloud(dataset.cloud(i), backbone.config) for i in range(len(dataset))])  # as a recipe's node does
    backbone.eval()
    rows = []
    for offset in range(0, len(clouds), batch_size):
        tokens = backbone(clouds[offset: offset + batch_size])  # (B, 1 + G, D)
        rows.append(torch.cat([tokens[:, 0], tokens[:, 1:].max(dim=1).values], dim=-1))
    return torch.cat(rows).numpy(), np.array([dataset.label(i) for i in range(len(dataset))])


def linear_probe(backbone: PointBERTBackbone) -> dict[str, float]:
    """Logistic regression on standardized pooled features: fit on train, score val and test."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    train_x, train_y = pooled_features(backbone, "train")
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=3000, C=0.5))
    probe.fit(train_x, train_y)
    figures = {}
    for split in ("val", "test"):
        x, y = pooled_features(backbone, split)
        figures[f"linear_probe_{split}"] = float((probe.predict(x) == y).mean())
    return figures


def load(folder: Path) -> PointBERTBackbone:
    """The saved member through the `point_bert` node's own loader."""
    from mmadapt.encoders.point_cloud import PointBERT

    return PointBERT(checkpoint=str(folder)).model.eval()


def train(out_dir: Path, seed: int = 0, epochs: int = 60, batch_size: int = 64, lr: float = 1e-3, threads: int = 1,
          contrastive_weight: float = CONTRASTIVE_WEIGHT, chamfer_weight: float = CHAMFER_WEIGHT) -> dict[str, Any]:
    """Self-supervised from scratch on the train split (no labels), save, then measure the linear probe."""
    from transformers import get_cosine_schedule_with_warmup

    previous_threads = torch.get_num_threads()
    # One thread: these ops are small, and on the shared 2-core machine two threads measured 3.5x slower per step.
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    generator = torch.Generator().manual_seed(seed)
    config = PointBERTConfig.build(MODEL_CFG, "digits-points")
    random_probe = linear_probe(PointBERTBackbone(config))  # the control: the same architecture, untrained
    backbone, decoder = PointBERTBackbone(config), MaskedGroupDecoder(config, DECODER_DEPTH)
    projection = nn.Sequential(nn.Linear(2 * config.trans_dim, config.trans_dim), nn.GELU(), nn.Linear(config.trans_dim, 64))  # SimCLR's head
    parameters = list(backbone.parameters()) + list(decoder.parameters()) + list(projection.parameters())
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=0.05)
    train_idx = split_indices("train")
    per_epoch = len(train_idx) // batch_size
    schedule = get_cosine_schedule_with_warmup(optimizer, per_epoch * 5, per_epoch * epochs)
    start = time.perf_counter()
    for epoch in range(epochs):
        backbone.train(), decoder.train()
        views = train_clouds(train_idx, rng), train_clouds(train_idx, rng)  # two new poses and point sets per digit every epoch
        order = torch.randperm(len(train_idx), generator=generator)
        total = contrast = 0.0
        for offset in range(0, per_epoch * batch_size, batch_size):
            batch = order[offset: offset + batch_size]
            both = torch.cat([views[0][batch], views[1][batch]])  # one pass over both poses: half the per-op overhead
            chamfer, pooled = view_losses(backbone, decoder, both, generator)
            first, second = projection(pooled).chunk(2)
            agreement = info_nce(first, second, TEMPERATURE)
            loss = chamfer_weight * chamfer + contrastive_weight * agreement
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            total += chamfer.item()
            contrast += agreement.item()
        if epoch % 10 == 0 or epoch == epochs - 1:
            print(f"epoch {epoch}: chamfer {total / per_epoch:.5f}, contrastive {contrast / per_epoch:.3f} "
                  f"({time.perf_counter() - start:.0f} s)", flush=True)
    seconds = time.perf_counter() - start
    backbone.eval()
    save_backbone(backbone, out_dir)
    figures: dict[str, Any] = linear_probe(load(out_dir))
    figures["linear_probe_test_random_init"] = random_probe["linear_probe_test"]
    figures["final_chamfer"] = round(total / per_epoch, 6)
    figures["final_contrastive"] = round(contrast / per_epoch, 4)
    figures["train_seconds"] = round(seconds, 1)
    torch.set_num_threads(previous_threads)
    return figures
