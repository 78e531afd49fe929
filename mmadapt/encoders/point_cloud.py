"""A frozen Point-BERT-style point-cloud encoder: FPS centers, kNN groups, a mini-PointNet token each, a transformer."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from mmadapt.core.checkpoint_io import read_safetensors, read_torch_state
from mmadapt.encoders.image import FEATURES
from mmadapt.errors import DataError, MMAdaptError
from mmadapt.core.identity import config_hash, weights_hash
from mmadapt.core.nodes import Encoder
from mmadapt.core.params import Feature
from mmadapt.data.points import check_cloud, load_point_cloud, normalize_unit_sphere, resample
from mmadapt.core.semantics import meta_built, readable_config, refuse_unknown_keys
from mmadapt.zoo import resolve_checkpoint

CONFIG_FILE = "point_bert_config.json"
WEIGHTS_FILE = "model.safetensors"
RESAMPLE_SEED = 0  # fixed, so a file always yields the same points (and the same cache entry)


@dataclasses.dataclass(frozen=True)
class PointBERTConfig:
    """Architecture and input size; the defaults are Point-BERT's ModelNet-1k transformer."""

    trans_dim: int = 384  # transformer width, the width of the output tokens
    depth: int = 12  # transformer blocks
    num_heads: int = 6  # attention heads (not readable from a checkpoint's shapes, so it is stated)
    mlp_ratio: float = 4.0  # block MLP width / trans_dim
    num_group: int = 64  # G: farthest-point centers, one token each (PointLLM: 512)
    group_size: int = 32  # K: nearest neighbours per center
    encoder_dims: int = 256  # mini-PointNet output width, before reduce_dim
    point_dims: int = 3  # 3: xyz; 6: xyz + RGB in 0..1 (ULIP-2 / PointLLM v1.2)
    pointnet_widths: tuple[int, int, int] = (128, 256, 512)  # mini-PointNet's hidden widths: Point-BERT's 128, 256, 512
    pos_hidden: int = 128  # hidden width of the center -> position embedding MLP
    num_points: int = 1024  # points per cloud after resampling (PointLLM: 8192)

    @classmethod
    def build(cls, values: dict[str, Any], where: str) -> PointBERTConfig:
        refuse_unknown_keys(values, cls, where)
        values = dict(values)
        if "pointnet_widths" in values:
            values["pointnet_widths"] = tuple(int(w) for w in values["pointnet_widths"])
        config = cls(**values)
        if not config.group_size <= config.num_points or not config.num_group <= config.num_points:
            raise MMAdaptError(f"{where}: num_group ({config.num_group}) and group_size ({config.group_size}) must not exceed num_points ({config.num_points})")
        if config.trans_dim % config.num_heads:
            raise MMAdaptError(f"{where}: trans_dim {config.trans_dim} is not divisible by num_heads {config.num_heads}")
        if config.point_dims < 3:
            raise MMAdaptError(f"{where}: point_dims must be at least 3 (xyz), got {config.point_dims}")
        return config


def read_config(checkpoint: str | None, config: dict[str, Any] | None) -> PointBERTConfig:
    """Point-BERT's defaults, then a checkpoint folder's point_bert_config.json, then the recipe's inline `config`."""
    values: dict[str, Any] = {}
    refuse_unknown_keys(config if isinstance(config, dict) else {}, PointBERTConfig, "config")  # a typo is the recipe's
    if checkpoint is not None:
        folder = Path(resolve_checkpoint(checkpoint))
        if folder.is_dir():
            path = folder / CONFIG_FILE
            if not path.is_file():
                raise MMAdaptError(f"checkpoint '{checkpoint}': no {CONFIG_FILE} in {folder}")
            values.update(json.loads(path.read_text()))
    values.update(config or {})
    return PointBERTConfig.build(values, f"point_bert checkpoint '{checkpoint}'" if checkpoint else "point_bert config")


# ---------------------------------------------------------------------------------------------------------------
# Sampling and grouping. Written in plain torch: torch-cluster's fps/knn builds from source (~13 min here) and
# torch_geometric's fps needs pyg-lib, which has no wheel for this torch; both are vectorized over the batch.


def farthest_point_sample(xyz: torch.Tensor, count: int) -> torch.Tensor:
    """Indices (B, count) of farthest-point sampling, starting at point 0 as Point-BERT's CUDA kernel does."""
    batch, points, _ = xyz.shape
    if count > points:
        raise MMAdaptError(f"cannot pick {count} centers from {points} points")
    chosen = torch.zeros(batch, count, dtype=torch.long, device=xyz.device)
    nearest = torch.full((batch, points), float("inf"), device=xyz.device, dtype=xyz.dtype)  # squared distance to the chosen set
    farthest = torch.zeros(batch, dtype=torch.long, device=xyz.device)
    rows = torch.arange(batch, device=xyz.device)
    for step in range(count):  # inherently sequential in the centers; each step is one vectorized pass
        chosen[:, step] = farthest
        newest = xyz[rows, farthest].unsqueeze(1)  # (B, 1, 3)
        nearest = torch.minimum(nearest, ((xyz - newest) ** 2).sum(-1))
        farthest = nearest.argmax(-1)  # ties: the first index
    return chosen


def knn_indices(xyz: torch.Tensor, centers: torch.Tensor, k: int) -> torch.Tensor:
    """Indices (B, G, k) of each center's k nearest points, nearest first."""
    distances = torch.cdist(centers, xyz, compute_mode="donot_use_mm_for_euclid_dist")  # (B, G, N), exact
    return distances.topk(k, dim=-1, largest=False, sorted=True).indices


def group_points(points: torch.Tensor, num_group: int, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Neighbourhoods (B, G, K, C) with xyz relative to their center, and the centers (B, G, 3)."""
    xyz = points[..., :3]
    centers = torch.gather(xyz, 1, farthest_point_sample(xyz, num_group).unsqueeze(-1).expand(-1, -1, 3))  # (B, G, 3)
    index = knn_indices(xyz, centers, group_size)  # (B, G, K)
    batch, groups, k = index.shape
    gathered = torch.gather(points, 1, index.reshape(batch, groups * k, 1).expand(-1, -1, points.shape[-1]))
    neighbourhoods = gathered.reshape(batch, groups, k, points.shape[-1])  # (B, G, K, C)
    relative = neighbourhoods[..., :3] - centers.unsqueeze(2)
    return torch.cat([relative, neighbourhoods[..., 3:]], dim=-1), centers


# ---------------------------------------------------------------------------------------------------------------
# The network. Module names follow Point-BERT's so its checkpoints map by renaming only `blocks.blocks.N` -> `blocks.N`.


class MiniPointNet(nn.Module):
    """Point-BERT's group tokenizer: shared point MLP, max-pool, concat the pooled feature back, MLP, max-pool."""

    def __init__(self, point_dims: int, widths: tuple[int, int, int], out_dim: int) -> None:
        super().__init__()
        first, second, third = widths
        # Conv1d with kernel 1 (not Linear) and BatchNorm1d keep Point-BERT's parameter names and shapes.
        self.first_conv = nn.Sequential(nn.Conv1d(point_dims, first, 1), nn.BatchNorm1d(first), nn.ReLU(inplace=True), nn.Conv1d(first, second, 1))
        self.second_conv = nn.Sequential(nn.Conv1d(2 * second, third, 1), nn.BatchNorm1d(third), nn.ReLU(inplace=True), nn.Conv1d(third, out_dim, 1))

    def forward(self, groups: torch.Tensor) -> torch.Tensor:
        batch, count, k, channels = groups.shape
        feature = self.first_conv(groups.reshape(batch * count, k, channels).transpose(1, 2))  # (BG, second, K)
        pooled = feature.max(dim=2, keepdim=True).values  # (BG, second, 1)
        feature = self.second_conv(torch.cat([pooled.expand(-1, -1, k), feature], dim=1))  # (BG, out, K)
        return feature.max(dim=2).values.reshape(batch, count, -1)  # (B, G, out)


class PointBERTBackbone(nn.Module):
    """Group tokens plus a class token through timm ViT blocks, with the centers' position embedding added before every block."""

    def __init__(self, config: PointBERTConfig) -> None:
        super().__init__()
        from timm.layers import trunc_normal_
        from timm.models.vision_transformer import Block

        self.config = config
        width = config.trans_dim
        self.encoder = MiniPointNet(config.point_dims, config.pointnet_widths, config.encoder_dims)
        self.reduce_dim = nn.Linear(config.encoder_dims, width)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.cls_pos = nn.Parameter(trunc_normal_(torch.empty(1, 1, width), std=0.02))
        self.pos_embed = nn.Sequential(nn.Linear(3, config.pos_hidden), nn.GELU(), nn.Linear(config.pos_hidden, width))
        # Point-BERT's blocks: qkv without bias, torch LayerNorm (eps 1e-5), exact GELU; timm's Block has the same names.
        self.blocks = nn.ModuleList(
            Block(width, config.num_heads, mlp_ratio=config.mlp_ratio, qkv_bias=False, norm_layer=nn.LayerNorm) for _ in range(config.depth)
        )
        self.norm = nn.LayerNorm(width)

    def group(self, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return group_points(points, self.config.num_group, self.config.group_size)

    def embed_groups(self, neighbourhoods: torch.Tensor) -> torch.Tensor:
        return self.reduce_dim(self.encoder(neighbourhoods))  # (B, G, D)

    def encode(self, tokens: torch.Tensor, centers: torch.Tensor) -> torch.Tensor:
        """Tokens (B, G', D) at centers (B, G', 3) -> (B, 1 + G', D), class token first."""
        batch = tokens.shape[0]
        x = torch.cat([self.cls_token.expand(batch, -1, -1), tokens], dim=1)
        pos = torch.cat([self.cls_pos.expand(batch, -1, -1), self.pos_embed(centers)], dim=1)
        for block in self.blocks:
            x = block(x + pos)
        return self.norm(x)

    def forward(self, points: torch.Tensor) -> torch.Tensor:
        neighbourhoods, centers = self.group(points)
        return self.encode(self.embed_groups(neighbourhoods), centers)  # (B, 1 + G, D)


# ---------------------------------------------------------------------------------------------------------------
# Checkpoint layouts

# Where the transformer sits in each layout, most specific first; the first under which a tokenizer weight exists wins.
KEY_PREFIXES = (
    "module.transformer_q.",  # Point-BERT pretraining (Point-BERT.pth: MoCo query branch; the key branch is ignored)
    "transformer_q.",
    "module.point_encoder.",  # ULIP / ULIP-2 (and PointLLM's point_bert_v1.2.pt): the 3D tower of the CLIP-style model
    "point_encoder.",
    "model.point_backbone.",  # a PointLLM model's own weights
    "module.",  # Point-BERT fine-tuned (ModelNet / ScanObjectNN), saved from DataParallel
    "",  # this package's own folder layout
)
STATE_CONTAINERS = ("base_model", "state_dict", "model")  # Point-BERT keeps tensors under base_model, ULIP under state_dict
DROPPED_HEADS = ("cls_head_finetune.", "cls_head.", "lm_head.", "mask_token")  # task/pretext heads, not the encoder
RENAMED = (("blocks.blocks.", "blocks."),)


def map_point_bert_keys(state: dict[str, Any], source: str) -> dict[str, torch.Tensor]:
    """A Point-BERT / ULIP / PointLLM state dict -> this backbone's keys; raises naming the source if none fits."""
    for container in STATE_CONTAINERS:
        if isinstance(state.get(container), dict):
            state = state[container]
            break
    prefix = next((p for p in KEY_PREFIXES if f"{p}encoder.first_conv.0.weight" in state), None)
    if prefix is None:
        sample = ", ".join(list(state)[:5])
        raise MMAdaptError(f"{source}: not a Point-BERT/ULIP checkpoint (no '*encoder.first_conv.0.weight'; keys start: {sample})")
    mapped: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if not key.startswith(prefix) or not isinstance(value, torch.Tensor):
            continue
        name = key[len(prefix):]
        if name.startswith(DROPPED_HEADS):
            continue
        for old, new in RENAMED:
            if name.startswith(old):
                name = new + name[len(old):]
        mapped[name] = value
    return mapped


def read_state(path: Path) -> dict[str, Any]:
    """Tensors of a .safetensors file or of a torch checkpoint, loaded without unpickling code."""
    if path.suffix == ".safetensors":
        return read_safetensors(path, MMAdaptError)
    return read_torch_state(path, MMAdaptError, "torch checkpoint")


def load_backbone_weights(backbone: PointBERTBackbone, state: dict[str, Any], source: str) -> None:
    """Load mapped tensors; every missing, unexpected or mis-shaped key is an error that names it."""
    mapped = map_point_bert_keys(state, source)
    own = backbone.state_dict()
    missing = sorted(set(own) - set(mapped))
    unexpected = sorted(set(mapped) - set(own))
    wrong = [f"{k} {tuple(mapped[k].shape)} vs {tuple(own[k].shape)}" for k in sorted(set(own) & set(mapped)) if mapped[k].shape != own[k].shape]
    problems = ([f"missing {', '.join(missing[:6])}{' …' if len(missing) > 6 else ''}"] if missing else []) + \
        ([f"unexpected {', '.join(unexpected[:6])}{' …' if len(unexpected) > 6 else ''}"] if unexpected else []) + \
        ([f"shape (checkpoint vs config) {'; '.join(wrong[:4])}"] if wrong else [])
    if problems:
        raise MMAdaptError(f"{source}: checkpoint does not fit the point_bert config ({'; '.join(problems)}); "
                           "set `config:` (trans_dim, depth, encoder_dims, point_dims, pointnet_widths) to the checkpoint's")
    backbone.load_state_dict({k: v.to(own[k].dtype) for k, v in mapped.items()})


def save_backbone(backbone: PointBERTBackbone, folder: Path) -> None:
    """The folder layout `checkpoint:` reads: point_bert_config.json + model.safetensors."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    (folder / CONFIG_FILE).write_text(json.dumps(dataclasses.asdict(backbone.config), indent=2) + "\n")
    save_file({k: v.contiguous() for k, v in backbone.state_dict().items()}, str(folder / WEIGHTS_FILE))


def prepare_cloud(sample: Any, config: PointBERTConfig) -> torch.Tensor:
    """A file path or an (N, C) array -> (num_points, point_dims): xyz on the unit sphere, a fixed number of points."""
    if isinstance(sample, (str, Path)):
        name, cloud = str(sample), load_point_cloud(sample)
    else:
        name = f"point cloud array of shape {tuple(getattr(sample, 'shape', ()))}"
        cloud = check_cloud(sample, name)
    dims = config.point_dims
    if cloud.shape[1] < dims:
        raise DataError(f"{name}: has {cloud.shape[1]} columns; this encoder reads {dims} (xyz{' + RGB' if dims >= 6 else ''})")
    cloud = cloud[:, :dims]
    if dims >= 6 and cloud[:, 3:6].max() > 1.0:
        cloud = np.concatenate([cloud[:, :3], cloud[:, 3:6] / 255.0, cloud[:, 6:]], axis=1)  # 0..255 colours -> 0..1
    return torch.from_numpy(resample(normalize_unit_sphere(cloud, name), config.num_points, seed=RESAMPLE_SEED))


# ---------------------------------------------------------------------------------------------------------------
# The graph node


class PointBERT(Encoder):
    """Point clouds (files or arrays) -> group tokens (B, G, D), or Point-BERT's pooled [class, max] feature."""

    modality = "points"
    default_inputs = {"points": "data.points"}

    def __init__(
        self,
        checkpoint: str | None = None,  # folder with point_bert_config.json + model.safetensors, zoo:NAME, or a Point-BERT/ULIP .pth
        config: dict[str, Any] | None = None,  # architecture keys over the checkpoint's (a .pth states none); alone: random weights
        feature: Feature = "patch",  # patch: group tokens (B, G, trans_dim); pooled: [class, max over groups] as (B, 1, 2 x trans_dim)
        keep_cls: bool = False,  # patch only: the class token in front, (B, 1 + G, D), as PointLLM feeds its projector
        seed: int = 0,  # init seed for random weights, so a card can rebuild them
        load_weights: bool = True,  # false: the checkpoint's architecture with random weights (a control run)
    ) -> None:
        super().__init__()
        if feature not in FEATURES:
            raise MMAdaptError(f"feature must be one of {', '.join(FEATURES)}, got {feature!r}")
        self.feature, self.keep_cls = feature, keep_cls
        self.config = read_config(checkpoint, config)
        self.source = (checkpoint or "inline-config") + ("" if load_weights or checkpoint is None else " (random weights)")
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            self.model = PointBERTBackbone(self.config)
        if checkpoint is not None and load_weights:
            self._load(checkpoint)
        self.out_dim = self.config.trans_dim * (2 if feature == "pooled" else 1)
        self._weights_hash: str | None = None

    def _load(self, checkpoint: str) -> None:
        path = Path(resolve_checkpoint(checkpoint))
        if path.is_dir():
            path = path / WEIGHTS_FILE
        if not path.is_file():
            raise MMAdaptError(f"point_bert checkpoint '{checkpoint}': {path} not found")
        load_backbone_weights(self.model, read_state(path), str(path))

    @classmethod
    def config_widths(cls, params: dict[str, Any]) -> dict[str, int]:
        config = read_config(params.get("checkpoint"), params.get("config"))
        return {"output": config.trans_dim * (2 if params.get("feature", "patch") == "pooled" else 1)}

    source_params = {"checkpoint": None}  # a saved folder, zoo:NAME or a Point-BERT/ULIP .pth: local files only

    @classmethod
    def adapter_bases(cls, params: dict[str, Any]) -> dict[str, torch.nn.Module] | None:
        config = readable_config(lambda: read_config(params.get("checkpoint"), params.get("config")))
        return None if config is None else {"model": meta_built(lambda: PointBERTBackbone(config))}

    def widths(self) -> dict[str, int]:
        return {"output": self.out_dim}

    def describe(self) -> dict[str, Any]:
        return {"source": self.source, "config_hash": config_hash(dataclasses.asdict(self.config))}

    def preprocess(self, sample: Any) -> torch.Tensor:
        return prepare_cloud(sample, self.config)  # (num_points, point_dims)

    def transform_description(self) -> str:
        return f"unit-sphere, resample to {self.config.num_points} (seed {RESAMPLE_SEED}), {self.config.point_dims} dims"

    def cache_identity(self) -> dict[str, Any]:
        if self._weights_hash is None:
            self._weights_hash = weights_hash(self)
        return {"class": type(self).__qualname__, "base": self.describe(), "weights": self._weights_hash,
                "feature": self.feature, "keep_cls": self.keep_cls, "transform": self.transform_description()}

    def forward(self, points: torch.Tensor) -> torch.Tensor:
        tokens = self.model(points)  # (B, 1 + G, D)
        if self.feature == "pooled":
            return torch.cat([tokens[:, 0], tokens[:, 1:].max(dim=1).values], dim=-1).unsqueeze(1)  # (B, 1, 2D)
        return tokens if self.keep_cls else tokens[:, 1:]  # (B, [1 +] G, D)
