"""What the Gradio demos share: which card fits which demo, input checks, errors as UI messages, and launching."""
from __future__ import annotations

import functools
import importlib
import inspect
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from mmadapt.errors import CardError, DataError, MMAdaptError

log = logging.getLogger("mmadapt.demo")
REPO_ROOT = Path(__file__).resolve().parent.parent
DEMOS_DIR = REPO_ROOT / "demos"
CARDS_DIR = DEMOS_DIR / "cards"  # the shipped default cards (trainable tensors only); demos/cards/README.md says how each was made
EXAMPLES_DIR = DEMOS_DIR / "examples"
DEFAULT_HOST = "127.0.0.1"  # never all interfaces unless the user says so
# name -> module whose build_demo(...) returns the gr.Blocks and whose main(...) starts it
DEMOS: dict[str, str] = {"vlm": "demos.vlm", "audio2image": "demos.audio2image", "personalize": "demos.personalize"}


@dataclass(frozen=True)
class Limits:
    """What an upload may be; each limit is a CLI flag of `mmadapt demo`."""

    max_image_pixels: int = 4096 * 4096  # larger pictures are refused before decoding (a decompression bomb guard)
    max_audio_seconds: float = 10.0  # the mini zoo's spoken digits last about 0.5 s; real clips a few seconds
    min_audio_rms: float = 1e-3  # below this (full scale = 1) a clip counts as silent
    max_personalize_images: int = 5  # the 3-5; more slows training without helping a few-shot subject


def card_summary(directory: str | Path) -> dict[str, Any]:
    """What a card reads and writes, from its recipe alone (no weights): {'inputs': {node: modality}, 'output': kind}."""
    from mmadapt.card import read_card
    from mmadapt.nodes import Decoder, Encoder
    from mmadapt.registry import NODE_TYPES, UnknownType, resolve

    raw, _ = read_card(directory)
    inputs: dict[str, str] = {}
    output = None
    for name, spec in (raw.get("graph") or {}).items():
        try:
            cls = resolve(str((spec or {}).get("type", "")), NODE_TYPES)
        except UnknownType as exc:
            raise CardError(f"{directory}: graph.{name}.type: {exc}") from None
        if isinstance(cls, type) and issubclass(cls, Encoder):
            inputs[name] = cls.modality
        elif isinstance(cls, type) and issubclass(cls, Decoder):
            output = cls.output
    return {"inputs": inputs, "output": output}


def check_card_fits_demo(directory: str | Path, demo: str, output: str, modalities: tuple[str, ...]) -> dict[str, Any]:
    """Raise CardError naming the card and what the demo needs, unless its generator writes `output` and every
    encoder reads one of `modalities`; return the card summary."""
    summary = card_summary(directory)
    problems = []
    if summary["output"] != output:
        problems.append(f"its generator makes {summary['output'] or 'nothing (no decoder)'}; the {demo} demo shows {output}")
    unsupported = {n: m for n, m in summary["inputs"].items() if m not in modalities}
    if unsupported:
        problems.append("it reads " + ", ".join(f"{m} (graph.{n})" for n, m in unsupported.items())
                        + f"; the {demo} demo takes {' or '.join(modalities)}")
    if not summary["inputs"]:
        problems.append(f"it has no encoder; the {demo} demo needs one that reads {' or '.join(modalities)}")
    if problems:
        raise CardError(f"card {directory} does not fit the {demo} demo: " + "; ".join(problems))
    return summary


def load_demo_card(directory: str | Path, demo: str, output: str, modalities: tuple[str, ...]) -> Any:
    """Check the card against the demo from its recipe, then load it (at start, so no request waits for it)."""
    from mmadapt.inference import load_card

    check_card_fits_demo(directory, demo, output, modalities)
    started = time.perf_counter()
    model = load_card(directory)
    log.info("%s demo: loaded card %s in %.1f s (%s)", demo, directory, time.perf_counter() - started,
             ", ".join(f"{n}: {type(m).__name__}" for n, m in model.nodes.items()))
    return model


def upload_name(path: str | Path) -> str:
    """The file's own name as the user knows it (Gradio keeps it as the last part of the upload path)."""
    return Path(path).name


def check_image(path: str | Path | None, limits: Limits, field: str = "image") -> Image.Image:
    """The upload as an RGB picture; not a picture, or more pixels than the limit, raises DataError naming the file."""
    if path is None:
        raise DataError(f"{field}: no image given; upload one or click an example")
    try:
        with Image.open(path) as image:  # reads the header only: the size is checked before any decoding
            width, height = image.size
            if width * height > limits.max_image_pixels:
                raise DataError(f"{field}: {upload_name(path)} is {width}x{height} = {width * height:,} pixels; "
                                f"the limit is {limits.max_image_pixels:,} (--max-image-pixels)")
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as exc:
        raise DataError(f"{field}: {upload_name(path)} is not an image this demo can read ({type(exc).__name__})") from None


def check_audio(path: str | Path | None, limits: Limits, field: str = "audio") -> tuple[Any, int]:
    """The upload as (mono float32 waveform, sample rate); unreadable, too long or silent raises DataError."""
    import numpy as np
    import soundfile

    if path is None:
        raise DataError(f"{field}: no audio given; record, upload or click an example")
    try:
        info = soundfile.info(str(path))
    except (soundfile.LibsndfileError, RuntimeError, OSError) as exc:
        raise DataError(f"{field}: {upload_name(path)} is not an audio file this demo can read ({type(exc).__name__})") from None
    if info.duration > limits.max_audio_seconds:
        raise DataError(f"{field}: {upload_name(path)} lasts {info.duration:.1f} s; the limit is "
                        f"{limits.max_audio_seconds:g} s (--max-audio-seconds)")
    wave, rate = soundfile.read(str(path), dtype="float32", always_2d=True)  # (T, C)
    mono = wave.mean(axis=1)  # (T,)
    rms = float(np.sqrt(np.mean(mono**2))) if mono.size else 0.0
    if rms < limits.min_audio_rms:
        raise DataError(f"{field}: {upload_name(path)} is silent (RMS {rms:.1e}, below {limits.min_audio_rms:g})")
    return mono, int(rate)


def as_ui_errors(handler: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap an event handler so every failure reaches the page as a message (gr.Error), never a traceback.

    Written here because Gradio shows only a bare "Error" for exceptions other than gr.Error unless show_error is on,
    and show_error would print any exception's text, including internal ones, to every visitor.
    """
    import gradio as gr

    def translate(exc: Exception) -> gr.Error:
        if isinstance(exc, gr.Error):
            return exc
        if isinstance(exc, MMAdaptError):
            return gr.Error(str(exc), print_exception=False)
        log.exception("unexpected error in %s", handler.__name__)  # the traceback goes to the server log only
        return gr.Error(f"unexpected {type(exc).__name__}: {exc}", print_exception=False)

    if inspect.isgeneratorfunction(handler):
        @functools.wraps(handler)
        def generator(*args: Any, **kwargs: Any) -> Any:
            try:
                yield from handler(*args, **kwargs)
            except Exception as exc:  # noqa: BLE001 - every failure becomes a UI message
                raise translate(exc) from None
        return generator

    @functools.wraps(handler)
    def plain(*args: Any, **kwargs: Any) -> Any:
        try:
            return handler(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - every failure becomes a UI message
            raise translate(exc) from None
    return plain


def image_input(**kwargs: Any) -> Any:
    """A stock gr.Image widget whose unreadable upload becomes a message naming the file, not a bare "Error"."""
    import gradio as gr

    widget = gr.Image(type="filepath", image_mode=None, **kwargs)  # the file as uploaded: check_image reads it
    stock = widget.preprocess

    # Wrapped on the instance: a gr.Image subclass would make Gradio write a .pyi stub beside this module.
    def preprocess(payload: Any) -> Any:
        try:
            return stock(payload)
        except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
            name = getattr(payload, "orig_name", None) or upload_name(getattr(payload, "path", "") or "the upload")
            raise gr.Error(f"{widget.label or 'image'}: {name} is not an image this demo can read "
                           f"({type(exc).__name__})", print_exception=False) from None

    widget.preprocess = preprocess
    return widget


def launch(blocks: Any, host: str = DEFAULT_HOST, port: int | None = None, share: bool = False,
           block: bool = True) -> Any:
    """Queue and start a demo; `block=False` returns at once with the running server (tests, notebooks).

    A demo's build_demo may set `demo_css` and `demo_allowed_paths` (folders its outputs live in) on the Blocks;
    an app that mounts it instead passes those to its own launch.
    """
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    blocks.queue(default_concurrency_limit=1)  # one model call at a time: CPU-bound work gains nothing from more
    blocks.launch(server_name=host, server_port=port, share=share, prevent_thread_lock=not block, quiet=not block,
                  allowed_paths=[str(EXAMPLES_DIR), *getattr(blocks, "demo_allowed_paths", [])], footer_links=["api"],
                  css=getattr(blocks, "demo_css", None))
    log.info("demo at %s", blocks.local_url)
    return blocks


def demo_module(name: str) -> Any:
    if name not in DEMOS:
        raise MMAdaptError(f"unknown demo '{name}'; demos: {', '.join(DEMOS)}")
    return importlib.import_module(DEMOS[name])


def write_digit_examples(folder: str | Path = EXAMPLES_DIR / "digits") -> list[Path]:
    """The vlm demo's examples: the first test-split scan of each digit, as 8x8 PNGs named by their label."""
    from mmadapt.digits import WORDS, digit_image, load_digits_arrays, split_indices

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    images, labels = load_digits_arrays()
    paths = []
    for digit, word in enumerate(WORDS):
        index = next(i for i in split_indices("test") if labels[i] == digit)
        path = folder / f"{digit}-{word}-sklearn{index}.png"
        digit_image(images[index]).save(path)
        paths.append(path)
    return paths
