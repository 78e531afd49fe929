"""What every audio encoder shares: reading a clip (any rate, any channels) with explicit length and silence rules."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np
import torch

from mmadapt.errors import DataError, MMAdaptError
from mmadapt.core.identity import weights_hash
from mmadapt.core.nodes import Encoder
from mmadapt.core.params import Feature
from mmadapt.data.modalities import content_key

FEATURES = get_args(Feature)
SUPPORTED_RATES = (4_000, 192_000)  # outside this a file is almost surely mislabelled, not real audio
Mono = Literal["mix", "first"]  # mix: average the channels; first: keep channel 0
TooLong = Literal["crop", "error"]
MONO_RULES = get_args(Mono)
TOO_LONG_RULES = get_args(TooLong)


@dataclass(frozen=True)
class AudioRules:
    """How a clip becomes a mono waveform at the encoder's rate; every choice is explicit and part of the cache key."""

    rate: int  # the encoder's sample rate; clips at other rates are resampled (soxr)
    mono: str = "mix"  # mix: average the channels; first: keep channel 0
    max_seconds: float = 10.0  # longer clips are cropped or refused, per `too_long`
    too_long: str = "crop"  # crop | error
    silence_dbfs: float = -60.0  # a clip whose peak is below this level is refused as silent

    def __post_init__(self) -> None:
        if self.mono not in MONO_RULES:
            raise MMAdaptError(f"mono must be one of {', '.join(MONO_RULES)}, got {self.mono!r}")
        if self.too_long not in TOO_LONG_RULES:
            raise MMAdaptError(f"too_long must be one of {', '.join(TOO_LONG_RULES)}, got {self.too_long!r}")
        if self.max_seconds <= 0:
            raise MMAdaptError(f"max_seconds must be positive, got {self.max_seconds}")


def read_audio(source: str | Path | tuple[int, np.ndarray], rules: AudioRules) -> np.ndarray:
    """A clip as a float32 mono waveform at `rules.rate`; a bad clip raises DataError naming it.

    `source` is a WAV/FLAC/OGG/MP3 path (libsndfile through soundfile) or a (rate, samples) pair such as a
    microphone recording from a web UI.
    """
    import soundfile

    name = str(source) if not isinstance(source, tuple) else "the recording"
    if isinstance(source, tuple):
        rate, samples = int(source[0]), np.asarray(source[1])
        if samples.dtype.kind == "i":  # integer PCM from a browser: scale to [-1, 1]
            samples = samples.astype(np.float32) / float(np.iinfo(samples.dtype).max)
    else:
        try:
            samples, rate = soundfile.read(str(source), dtype="float32", always_2d=True)
        except (soundfile.LibsndfileError, RuntimeError, TypeError) as exc:
            raise DataError(f"{name}: not a readable audio file ({exc})") from None
        except OSError as exc:
            raise DataError(f"{name}: cannot read ({exc.strerror or exc})") from None
        declared = wav_declared_frames(Path(source))
        if declared is not None and declared > len(samples):
            raise DataError(f"{name}: truncated WAV (its header promises {declared} frames, the file holds {len(samples)})")
    samples = np.asarray(samples, dtype=np.float32)
    if samples.ndim == 1:
        samples = samples[:, None]  # (T, C)
    if samples.shape[0] == 0:
        raise DataError(f"{name}: the clip is empty (zero samples)")
    if not np.isfinite(samples).all():
        raise DataError(f"{name}: the clip holds NaN or infinite samples")
    if not SUPPORTED_RATES[0] <= rate <= SUPPORTED_RATES[1]:
        raise DataError(f"{name}: sample rate {rate} Hz is not supported (expected {SUPPORTED_RATES[0]}-{SUPPORTED_RATES[1]} Hz)")
    wave = samples.mean(axis=1) if rules.mono == "mix" else samples[:, 0]  # (T,)
    seconds = len(wave) / rate
    if seconds > rules.max_seconds:
        if rules.too_long == "error":
            raise DataError(f"{name}: {seconds:.1f} s is longer than the limit of {rules.max_seconds:g} s")
        wave = wave[: int(rules.max_seconds * rate)]
    peak = float(np.abs(wave).max())
    if peak <= 0 or 20 * np.log10(peak) < rules.silence_dbfs:
        level = "-inf" if peak <= 0 else f"{20 * np.log10(peak):.0f}"
        raise DataError(f"{name}: the clip is silent (peak {level} dBFS, below the {rules.silence_dbfs:g} dBFS threshold)")
    if rate != rules.rate:
        import soxr

        wave = soxr.resample(wave, rate, rules.rate)
    return np.ascontiguousarray(wave, dtype=np.float32)


def wav_declared_frames(path: Path) -> int | None:
    """The frame count a PCM WAV header declares; None for other files. libsndfile reads a cut-off WAV without
    complaint (it counts what is there), so this is how a truncated download is told from a short clip."""
    import wave

    if path.suffix.lower() != ".wav":
        return None
    try:
        with wave.open(str(path), "rb") as handle:
            return handle.getnframes()
    except (wave.Error, EOFError, OSError):
        return None  # float or extensible WAVs, which the stdlib reader does not parse; libsndfile checked the rest


audio_key = content_key  # the cache key of a clip: its bytes


class AudioEncoder(Encoder):
    """An audio tower: a clip in, patch/frame tokens `(B, N, D)` or the pooled embedding `(B, 1, D)` out."""

    modality = "audio"
    default_inputs = {"input_values": "data.audio"}

    def _init_audio(self, rules: AudioRules, feature: str, layer: int) -> None:
        if feature not in FEATURES:
            raise MMAdaptError(f"feature must be one of {', '.join(FEATURES)}, got {feature!r}")
        self.rules, self.feature, self.layer = rules, feature, layer
        self._weights_hash: str | None = None

    def features(self, wave: np.ndarray) -> torch.Tensor:
        """The model's input for one mono waveform at `self.rules.rate` (a spectrogram, log-mel frames)."""
        raise NotImplementedError

    def preprocess(self, sample: Any) -> torch.Tensor:
        return self.features(read_audio(sample, self.rules))

    def front_end(self) -> dict[str, Any]:
        """The feature extractor's settings, for the cache key."""
        raise NotImplementedError

    def cache_identity(self) -> dict[str, Any]:
        if self._weights_hash is None:
            self._weights_hash = weights_hash(self)
        return {
            "class": type(self).__qualname__,
            "base": self.describe(),
            "weights": self._weights_hash,
            "layer": self.layer,
            "feature": self.feature,
            "rules": asdict(self.rules),
            "front_end": self.front_end(),
        }
