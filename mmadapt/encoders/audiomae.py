"""AudioMAE: a timm ViT over Kaldi log-mel filterbanks, from a saved folder or the official checkpoint layout."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmadapt.core.checkpoint_io import read_safetensors, read_torch_state
from mmadapt.encoders.audio import AudioEncoder, AudioRules, Mono, TooLong
from mmadapt.errors import MMAdaptError
from mmadapt.core.identity import config_hash
from mmadapt.core.params import Feature, PositiveFloat
from mmadapt.core.semantics import Finding, NodeContext, argument, layer_finding, meta_built, readable_config, refuse_unknown_keys
from mmadapt.zoo import resolve_checkpoint

CONFIG_FILE = "audiomae_config.json"
WEIGHTS_FILE = "model.safetensors"
# Official checkpoints carry the MAE decoder and the classifier beside the encoder; the encoder needs neither.
DROPPED_PREFIXES = ("decoder_", "mask_token", "head.")


@dataclass
class AudioMAEConfig:
    """The encoder's shape and front end; the defaults are the official AudioMAE ViT-B on AudioSet."""

    target_length: int = 1024  # frames (10 ms hop): clips are padded or cropped to this, as AudioMAE does
    num_mel_bins: int = 128  # Kaldi fbank bins
    sampling_rate: int = 16_000  # AudioMAE's rate; other clips are resampled
    patch_size: int = 16  # 16x16 patches over (time, mel)
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    mean: float = -4.2677393  # dataset statistics of the fbank, AudioSet's by default
    std: float = 4.5689974
    fc_norm: bool = False  # a fine-tuned checkpoint norms the pooled vector (fc_norm); a pretrained one norms each token

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str) -> AudioMAEConfig:
        refuse_unknown_keys(values, cls, source)
        return cls(**values)


def read_audiomae_config(checkpoint: str | None, config: Any) -> AudioMAEConfig:
    """The encoder's config without its weights: a saved folder's file under the recipe's keys, else the recipe's keys
    over the defaults (an official .pth states none; whether it norms per token is read off its weights at load)."""
    values = dict(config) if isinstance(config, dict) else {}
    refuse_unknown_keys(values, AudioMAEConfig, "config")  # a typo is the recipe's, whatever file it goes over
    folder = Path(resolve_checkpoint(checkpoint)) if checkpoint is not None else None
    if folder is not None and folder.is_dir():
        path = folder / CONFIG_FILE
        if not path.is_file():
            raise MMAdaptError(f"checkpoint '{checkpoint}': no {CONFIG_FILE} in {folder}")
        return AudioMAEConfig.from_dict({**json.loads(path.read_text()), **values}, str(path))
    return AudioMAEConfig.from_dict(values, "graph config")


def map_official_state_dict(raw: dict[str, Any], source: str) -> tuple[dict[str, torch.Tensor], bool]:
    """The official AudioMAE (timm-named) checkpoint -> encoder tensors, and whether it is the fine-tuned layout.

    The layout: `{"model": state_dict}` (sometimes with a `module.` prefix from DDP); encoder keys are timm's
    (`patch_embed.proj`, `blocks.N.*`, `cls_token`, `pos_embed`, `norm` or `fc_norm`).
    """
    state = raw.get("model", raw.get("state_dict", raw)) if isinstance(raw, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise MMAdaptError(f"{source}: not an AudioMAE checkpoint (expected a state dict, optionally under 'model')")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    kept = {k: v for k, v in state.items() if not k.startswith(DROPPED_PREFIXES)}
    fine_tuned = "fc_norm.weight" in kept and "norm.weight" not in kept
    if "norm.weight" in kept and "fc_norm.weight" in kept:
        kept = {k: v for k, v in kept.items() if not k.startswith("fc_norm.")}  # the per-token norm is the encoder's
    return kept, fine_tuned


def _load_source(checkpoint: str, config: dict[str, Any] | None) -> tuple[AudioMAEConfig, dict[str, torch.Tensor] | None, str]:
    """Config and tensors from a saved folder (config + safetensors) or an official .pth file."""
    path = Path(resolve_checkpoint(checkpoint))
    if path.is_dir():
        cfg = read_audiomae_config(checkpoint, config)
        return cfg, read_safetensors(path / WEIGHTS_FILE, MMAdaptError), checkpoint  # as given (zoo:NAME), not this machine's path
    if path.is_file():
        raw = read_torch_state(path, MMAdaptError, "torch checkpoint")
        state, fine_tuned = map_official_state_dict(raw, checkpoint)
        cfg = AudioMAEConfig.from_dict({"fc_norm": fine_tuned, **(config or {})}, f"graph config for {checkpoint}")
        return cfg, state, checkpoint
    raise MMAdaptError(f"checkpoint '{checkpoint}': no such folder or file (AudioMAE loads a saved folder or an official .pth)")


def build_vit(cfg: AudioMAEConfig) -> torch.nn.Module:
    """The timm VisionTransformer in AudioMAE's layout: one input channel, a (time, mel) image, mean pooling."""
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(
        img_size=(cfg.target_length, cfg.num_mel_bins), patch_size=cfg.patch_size, in_chans=1,
        embed_dim=cfg.embed_dim, depth=cfg.depth, num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_ratio,
        qkv_bias=True, num_classes=0, global_pool="avg", fc_norm=cfg.fc_norm,
    )


class AudioMAE(AudioEncoder):
    """A frozen AudioMAE encoder: patch tokens of one block `(B, N, D)`, or the mean-pooled embedding `(B, 1, D)`."""

    def __init__(
        self,
        checkpoint: str | None = None,  # a saved folder (zoo:fsdd-audiomae) or an official AudioMAE .pth
        config: dict[str, Any] | None = None,  # AudioMAEConfig fields; alone: random weights (tests); with a .pth: its shape
        layer: int = -1,  # which block's patch tokens; -1 is the last, after the encoder's norm
        feature: Feature = "patch",  # patch tokens or the pooled embedding
        max_seconds: PositiveFloat = 10.24,  # AudioMAE's 1024 frames; longer clips are cropped or refused per too_long
        too_long: TooLong = "crop",  # crop | error
        mono: Mono = "mix",  # mix the channels down, or keep the first
        silence_dbfs: float = -60.0,  # clips quieter than this peak are refused as silent
        seed: int = 0,  # init seed for config-built random weights, so a card can rebuild them
        load_weights: bool = True,  # false: the checkpoint's architecture with random weights (a control run)
    ) -> None:
        super().__init__()
        from transformers import ASTFeatureExtractor

        if checkpoint is None and config is None:
            raise MMAdaptError("give checkpoint (a folder, zoo:NAME or an official .pth) or config (random weights)")
        if checkpoint is not None:
            self.cfg, state, self.source = _load_source(checkpoint, config)
        else:
            self.cfg, state, self.source = AudioMAEConfig.from_dict(config or {}, "graph config"), None, "inline-config"
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            self.model = build_vit(self.cfg)
        if state is not None and load_weights:
            self._load(state)
        elif not load_weights:
            self.source += " (random weights)"
        self._init_audio(AudioRules(self.cfg.sampling_rate, mono, max_seconds, too_long, silence_dbfs), feature, layer)
        # The front end is transformers' AST extractor: the same Kaldi fbank and (x - mean) / (2 std) as AudioMAE's.
        self.extractor = ASTFeatureExtractor(
            feature_size=1, sampling_rate=self.cfg.sampling_rate, num_mel_bins=self.cfg.num_mel_bins,
            max_length=self.cfg.target_length, mean=self.cfg.mean, std=self.cfg.std, do_normalize=True,
        )
        self.out_dim = self.cfg.embed_dim

    def _load(self, state: dict[str, torch.Tensor]) -> None:
        expected = self.model.state_dict()
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        if missing or unexpected:
            raise MMAdaptError(f"{self.source}: checkpoint does not match the AudioMAE layout; missing {missing[:6]}, unexpected {unexpected[:6]}")
        for key, tensor in state.items():
            if tensor.shape != expected[key].shape:
                raise MMAdaptError(
                    f"{self.source}: '{key}' has shape {tuple(tensor.shape)}, the config expects {tuple(expected[key].shape)} "
                    f"(target_length={self.cfg.target_length}, num_mel_bins={self.cfg.num_mel_bins}, embed_dim={self.cfg.embed_dim})"
                )
        self.model.load_state_dict(state)

    @classmethod
    def config_widths(cls, params: dict[str, Any]) -> dict[str, int]:
        return {"output": int(read_audiomae_config(params.get("checkpoint"), params.get("config")).embed_dim)}

    source_params = {"checkpoint": None}  # a saved folder, zoo:NAME or an official .pth: local files only

    @classmethod
    def param_problems(cls, params: dict[str, Any], context: NodeContext) -> list[Finding]:
        """`layer` picks one of the encoder's blocks (timm's forward_intermediates indices)."""
        cfg = readable_config(lambda: read_audiomae_config(params.get("checkpoint"), params.get("config")))
        if cfg is None or argument(cls, params, "feature") != "patch":
            return []
        finding = layer_finding(argument(cls, params, "layer"), -cfg.depth, cfg.depth - 1, f"the {cfg.depth} blocks of the encoder")
        return [finding] if finding else []

    @classmethod
    def adapter_bases(cls, params: dict[str, Any]) -> dict[str, torch.nn.Module] | None:
        cfg = readable_config(lambda: read_audiomae_config(params.get("checkpoint"), params.get("config")))
        return None if cfg is None else {"model": meta_built(lambda: build_vit(cfg))}

    def widths(self) -> dict[str, int]:
        return {"output": self.out_dim}

    def describe(self) -> dict[str, Any]:
        return {"source": self.source, "config_hash": config_hash(asdict(self.cfg))}

    def features(self, wave: np.ndarray) -> torch.Tensor:
        values = self.extractor(wave, sampling_rate=self.cfg.sampling_rate, return_tensors="pt")["input_values"]
        return values[0]  # (target_length, num_mel_bins)

    def front_end(self) -> dict[str, Any]:
        return self.extractor.to_dict()

    def save(self, folder: str | Path) -> None:
        """Write the folder layout this class loads: config JSON and safetensors weights."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / CONFIG_FILE).write_text(json.dumps(asdict(self.cfg), indent=2))
        save_file({k: v.contiguous() for k, v in self.model.state_dict().items()}, str(folder / WEIGHTS_FILE))

    def forward(self, input_values: torch.Tensor) -> torch.Tensor:
        image = input_values.unsqueeze(1)  # (B, 1, T, F): time is the image's height, as in AudioMAE
        if self.feature == "pooled":
            return self.model.forward_head(self.model.forward_features(image), pre_logits=True).unsqueeze(1)  # (B, 1, D)
        return self.model.forward_intermediates(image, indices=[self.layer], output_fmt="NLC", intermediates_only=True, norm=True)[0]  # (B, N, D)
