"""transformers audio encoders: the Whisper encoder, AST, and CLAP's audio tower, each with its own feature extractor."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from mmadapt.encoders.audio import AudioEncoder, AudioRules, Mono, TooLong
from mmadapt.core.semantics import read_config
from mmadapt.encoders.hf_vision import hidden_states_finding
from mmadapt.errors import MMAdaptError
from mmadapt.core.identity import config_hash
from mmadapt.core.nodes import WidthUnknown
from mmadapt.core.params import Feature, PositiveFloat
from mmadapt.core.semantics import Finding, NodeContext, argument, inline_config_findings, meta_built, readable_config
from mmadapt.zoo import resolve_checkpoint


@dataclass(frozen=True)
class AudioTower:
    """How one transformers model family yields an audio encoder."""

    model_class: str  # the transformers class that loads the checkpoint
    part: str | None  # the attribute holding the audio encoder, None when the model is the encoder
    config_part: str | None  # the sub-config with the encoder's width
    extractor_class: str  # the family's feature extractor
    input_name: str  # the encoder's forward argument for the features


# transformers has no encoder-only loader for Whisper or CLAP checkpoints, so the full model loads and keeps its audio part.
AUDIO_TOWERS: dict[str, AudioTower] = {
    "whisper": AudioTower("WhisperModel", "encoder", None, "WhisperFeatureExtractor", "input_features"),
    "audio-spectrogram-transformer": AudioTower("ASTModel", None, None, "ASTFeatureExtractor", "input_values"),
    "clap": AudioTower("ClapModel", "audio_model", "audio_config", "ClapFeatureExtractor", "input_features"),
}


def tower_for(config: Any, source: str) -> AudioTower:
    tower = AUDIO_TOWERS.get(config.model_type)
    if tower is None:
        raise MMAdaptError(f"{source}: model_type '{config.model_type}' is not an audio tower hf_audio knows; known: {', '.join(AUDIO_TOWERS)}")
    return tower


def default_extractor(config: Any, tower: AudioTower) -> Any:
    """A config-built tower's extractor, shaped to its config (a saved checkpoint brings its own)."""
    import transformers

    cls = getattr(transformers, tower.extractor_class)
    if config.model_type == "whisper":
        # Whisper's encoder takes exactly 2 x max_source_positions frames at 100 frames/s.
        return cls(feature_size=config.num_mel_bins, chunk_length=max(1, config.max_source_positions * 2 // 100))
    if config.model_type == "audio-spectrogram-transformer":
        return cls(num_mel_bins=config.num_mel_bins, max_length=config.max_length)
    fusion = bool(getattr(config.audio_config, "enable_fusion", False))
    return cls(feature_size=config.audio_config.num_mel_bins, truncation="fusion" if fusion else "rand_trunc")


def extractor_seconds(extractor: Any) -> float:
    """How much audio the extractor's fixed-size input holds; clips are cropped to it first, deterministically,
    so CLAP's random crop of long clips never runs and a clip's cached features never change."""
    for name in ("chunk_length", "max_length_s"):
        if getattr(extractor, name, None):
            return float(getattr(extractor, name))
    return float(extractor.max_length) / 100.0  # AST: frames at a 10 ms hop


class HFAudioEncoder(AudioEncoder):
    """A frozen transformers audio encoder: `hidden_states[layer]` tokens `(B, N, D)`, or the pooled embedding `(B, 1, D)`."""

    def __init__(
        self,
        checkpoint: str | None = None,  # folder or hub id: openai/whisper-*, MIT/ast-*, laion/clap-*
        config: dict[str, Any] | None = None,  # inline config with model_type: random weights, for tests
        layer: int = -1,  # index into hidden_states
        feature: Feature = "patch",  # frame/patch tokens, or pooled (pooler_output where the model has one, else the mean)
        max_seconds: PositiveFloat | None = None,  # longer clips are cropped or refused; default: what the extractor's input holds
        too_long: TooLong = "crop",  # crop | error
        mono: Mono = "mix",  # mix the channels down, or keep the first
        silence_dbfs: float = -60.0,  # clips quieter than this peak are refused as silent
        seed: int = 0,  # init seed for config-built random weights, so a card can rebuild them
    ) -> None:
        super().__init__()
        import transformers

        self.source = checkpoint or "inline-config"
        self.config = read_config(checkpoint, config)
        self.tower = tower_for(self.config, self.source)
        model_cls = getattr(transformers, self.tower.model_class)
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            if checkpoint is not None:
                model = model_cls.from_pretrained(resolve_checkpoint(checkpoint))
            else:
                model = model_cls._from_config(self.config)
        self.model = getattr(model, self.tower.part) if self.tower.part else model
        self.extractor = self._extractor(checkpoint)
        seconds = max_seconds if max_seconds is not None else extractor_seconds(self.extractor)
        self._init_audio(AudioRules(int(self.extractor.sampling_rate), mono, seconds, too_long, silence_dbfs), feature, layer)
        self.out_dim = int(self.encoder_config(self.config).hidden_size)

    @staticmethod
    def encoder_config(config: Any) -> Any:
        part = AUDIO_TOWERS[config.model_type].config_part if config.model_type in AUDIO_TOWERS else None
        return getattr(config, part) if part else config

    def _extractor(self, checkpoint: str | None) -> Any:
        from transformers import AutoFeatureExtractor

        if checkpoint is not None:
            try:
                return AutoFeatureExtractor.from_pretrained(resolve_checkpoint(checkpoint))
            except (OSError, ValueError):
                pass  # a bare model folder: build the family's extractor from the config
        return default_extractor(self.config, self.tower)

    @classmethod
    def config_widths(cls, params: dict[str, Any]) -> dict[str, int]:
        config = read_config(params.get("checkpoint"), params.get("config"))
        if config.model_type not in AUDIO_TOWERS:
            raise WidthUnknown(f"model_type '{config.model_type}' is not an audio tower; known: {', '.join(AUDIO_TOWERS)}")
        return {"output": int(cls.encoder_config(config).hidden_size)}

    source_params = {"checkpoint": "config.json"}

    @classmethod
    def param_problems(cls, params: dict[str, Any], context: NodeContext) -> list[Finding]:
        findings = inline_config_findings(params.get("config"))
        config = readable_config(lambda: read_config(params.get("checkpoint"), params.get("config")))
        if config is not None and config.model_type in AUDIO_TOWERS and argument(cls, params, "feature") == "patch":
            finding = hidden_states_finding(argument(cls, params, "layer"), cls.encoder_config(config))
            findings += [finding] if finding else []
        return findings

    @classmethod
    def adapter_bases(cls, params: dict[str, Any]) -> dict[str, torch.nn.Module] | None:
        import transformers

        config = readable_config(lambda: read_config(params.get("checkpoint"), params.get("config")))
        if config is None or config.model_type not in AUDIO_TOWERS:
            return None
        tower = AUDIO_TOWERS[config.model_type]
        model = meta_built(lambda: getattr(transformers, tower.model_class)._from_config(config))
        return {"model": getattr(model, tower.part) if tower.part else model}

    def widths(self) -> dict[str, int]:
        return {"output": self.out_dim}

    def describe(self) -> dict[str, Any]:
        return {"source": self.source, "config_hash": config_hash(self.config.to_dict())}

    def features(self, wave: np.ndarray) -> torch.Tensor:
        values = self.extractor(wave, sampling_rate=self.rules.rate, return_tensors="pt")
        return values[self.tower.input_name][0]

    def front_end(self) -> dict[str, Any]:
        return self.extractor.to_dict()

    def forward(self, input_values: torch.Tensor) -> torch.Tensor:
        outputs = self.model(**{self.tower.input_name: input_values}, output_hidden_states=True)
        if self.feature == "pooled":
            pooled = getattr(outputs, "pooler_output", None)
            if pooled is None:
                pooled = outputs.last_hidden_state.mean(dim=1)  # Whisper has no pooler: the mean over frames
            return pooled.reshape(pooled.shape[0], 1, -1)  # (B, 1, D)
        tokens = outputs.hidden_states[self.layer]
        if tokens.dim() == 4:  # CLAP's Swin stages keep a (B, H, W, D) grid
            tokens = tokens.flatten(1, 2)
        return tokens  # (B, N, D)
