"""What the Gradio demos share: which card fits which demo, input checks, errors as UI messages, and launching."""
from __future__ import annotations

import functools
import importlib
import inspect
import json
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from mmadapt.errors import CardError, DataError, MMAdaptError

log = logging.getLogger("mmadapt.serve.demo")
REPO_ROOT = Path(__file__).resolve().parents[2]
DEMOS_DIR = REPO_ROOT / "demos"
CARDS_DIR = DEMOS_DIR / "cards"  # the shipped default cards (trainable tensors only); demos/cards/README.md says how each was made
EXAMPLES_DIR = DEMOS_DIR / "examples"
DEFAULT_HOST = "127.0.0.1"  # never all interfaces unless the user says so
# name -> module whose build_demo(...) returns the gr.Blocks and whose main(...) starts it
DEMOS: dict[str, str] = {"vlm": "demos.vlm", "audio2image": "demos.audio2image", "personalize": "demos.personalize"}
MODEL_QUEUE = "model"  # the concurrency_id of every event that runs a model: one queue, one model call at a time


@dataclass(frozen=True)
class Limits:
    """What an upload may be; each limit is a CLI flag of `mmadapt demo`."""

    max_image_pixels: int = 4096 * 4096  # larger pictures are refused before decoding (a decompression bomb guard)
    max_audio_seconds: float = 10.0  # the mini zoo's spoken digits last about 0.5 s; real clips a few seconds
    min_audio_rms: float = 1e-3  # below this (full scale = 1) a clip counts as silent
    max_personalize_images: int = 5  # the 3-5; more slows training without helping a few-shot subject
    max_text_chars: int = 500  # any typed text (question, prompt, word): a sentence; 100,000 characters took the LM 14 s
    max_chat_messages: int = 40  # the chat a question sends back; the page keeps no more, so only a hand-made request does
    max_chat_pictures: int = 4  # pictures in one conversation: the mini chat card's template names up to four


TRUST_CARD_CODE = {"allowed": False}  # `mmadapt demo --trust-card-code` sets it: cards may name code outside mmadapt


def card_summary(directory: str | Path, trust_code: bool | None = None) -> dict[str, Any]:
    """What a card reads and writes, from its recipe alone (no weights): {'inputs': {node: modality}, 'output': kind}.
    A dotted `type:` is refused before import unless trusted (`trust_code`, by default the demo's setting)."""
    from mmadapt.core.card import read_card, refuse_card_code
    from mmadapt.core.generator import Generator
    from mmadapt.core.nodes import Encoder
    from mmadapt.core.registry import NODE_TYPES, UnknownType, resolve

    raw, _ = read_card(directory)
    refuse_card_code(raw, directory, TRUST_CARD_CODE["allowed"] if trust_code is None else trust_code)
    inputs: dict[str, str] = {}
    output = None
    graph = raw.get("graph")
    for name, spec in (graph.items() if isinstance(graph, dict) else ()):
        try:
            cls = resolve(str(spec.get("type", "") if isinstance(spec, dict) else ""), NODE_TYPES)
        except UnknownType as exc:
            raise CardError(f"{directory}: graph.{name}.type: {exc}") from None
        if isinstance(cls, type) and issubclass(cls, Encoder):
            inputs[name] = cls.modality
        elif isinstance(cls, type) and issubclass(cls, Generator):
            output = cls.output
    return {"inputs": inputs, "output": output}


def check_card_fits_demo(directory: str | Path, demo: str, output: str, modalities: tuple[str, ...]) -> dict[str, Any]:
    """Raise CardError naming the card and what the demo needs, unless its generator writes `output` and every
    encoder reads one of `modalities`; return the card summary."""
    summary = card_summary(directory)
    problems = []
    if summary["output"] != output:
        problems.append(f"its generator makes {summary['output'] or 'nothing (no generator)'}; the {demo} demo shows {output}")
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
    from mmadapt.serve.inference import load_card

    check_card_fits_demo(directory, demo, output, modalities)
    started = time.perf_counter()
    model = load_card(directory, trust_code=TRUST_CARD_CODE["allowed"])
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


def kind_of(value: Any) -> str:
    return "None" if value is None else type(value).__name__


def check_text(value: Any, limits: Limits, field: str) -> str:
    """Typed text within --max-text-chars, checked before any tokenization; else DataError naming the limit and length."""
    if not isinstance(value, str):
        raise DataError(f"{field}: expected text, got {kind_of(value)}")
    if len(value) > limits.max_text_chars:
        raise DataError(f"{field}: {len(value):,} characters; the limit is {limits.max_text_chars:,} (--max-text-chars)")
    return value


def check_number(value: Any, field: str, minimum: float | None, maximum: float | None) -> float:
    """A finite number within the widget's range (a client can send any number, whatever the slider allows)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise DataError(f"{field}: expected a number, got {kind_of(value)}")
    if (isinstance(value, float) and not math.isfinite(value)) or (minimum is not None and value < minimum) \
            or (maximum is not None and value > maximum):
        shown = str(value) if len(str(value)) <= 24 else str(value)[:24] + "..."
        raise DataError(f"{field}: {shown} is not between {minimum if minimum is not None else '-inf'} and "
                        f"{maximum if maximum is not None else 'inf'}")
    return value


def field_name(block: Any) -> str:
    """How messages name a widget: its label without the parenthesised hint, e.g. 'max new tokens'."""
    return str(getattr(block, "label", None) or getattr(block, "elem_id", None) or type(block).__name__).split(" (")[0].lower()


def check_request_value(block: Any, value: Any, limits: Limits) -> None:
    """One input of a request, checked by its widget's kind before Gradio reads it (a client may send anything)."""
    import gradio as gr

    field = field_name(block)
    if isinstance(block, gr.Textbox):
        check_text(value, limits, field)
    elif isinstance(block, (gr.Slider, gr.Number)):
        check_number(value, field, block.minimum, block.maximum)
    elif isinstance(block, (gr.Radio, gr.Dropdown)):
        choices = [str(c[1] if isinstance(c, tuple) else c) for c in block.choices or []]
        if not isinstance(value, str) or value not in choices:
            shown = repr(value[:80]) if isinstance(value, str) else kind_of(value)
            raise DataError(f"{field}: expected one of {', '.join(choices)}, got {shown}")
    elif isinstance(block, (gr.Image, gr.Audio, gr.File)) and value is not None:
        files = value if isinstance(value, list) and getattr(block, "file_count", "single") != "single" else [value]
        if not all(isinstance(f, dict) and isinstance(f.get("path"), str) for f in files):
            raise DataError(f"{field}: expected an uploaded file (gradio_client: handle_file(path)), got {kind_of(value)}")
    elif isinstance(block, gr.MultimodalTextbox):
        if not isinstance(value, dict) or not isinstance(value.get("files", []), list):
            raise DataError(f"{field}: expected {{'text': ..., 'files': [...]}}, got {kind_of(value)}")
        check_text(value.get("text", ""), limits, field)
        files = value.get("files") or []
        if not all(isinstance(f, dict) and isinstance(f.get("path"), str) for f in files):
            raise DataError(f"{field}: expected uploaded files (gradio_client: handle_file(path)), got {kind_of(files)}")
        if len(files) > limits.max_chat_pictures:
            raise DataError(f"{field}: {len(files)} files; a conversation holds at most {limits.max_chat_pictures} pictures")
    elif isinstance(block, gr.Chatbot) and value is not None:
        if not isinstance(value, list) or not all(isinstance(m, dict) for m in value):
            raise DataError(f"{field}: expected a list of messages, got {kind_of(value)}")
        if len(value) > limits.max_chat_messages:
            raise DataError(f"{field}: {len(value)} messages; the limit is {limits.max_chat_messages}")
        size, most = len(json.dumps(value, default=str)), 2 * limits.max_text_chars * limits.max_chat_messages
        if size > most:
            raise DataError(f"{field}: {size:,} characters of history; the limit is {most:,}")


def refusal(where: str, message: str) -> Any:
    """A refused request: one log line, and the page's message as a gr.Error that Gradio prints no traceback for."""
    import gradio as gr

    line = " ".join(message.split())
    log.warning("refused %s: %s", where, line if len(line) <= 300 else line[:300] + " ...")
    return gr.Error(message, print_exception=False)


def guard_requests(blocks: Any, limits: Limits) -> Any:
    """Check every request's inputs by kind (check_request_value) before Gradio reads them, and make any refusal on
    the way (Gradio's own, e.g. a value outside a dropdown, or a payload that does not fit) one log line and a message.

    Wraps the Blocks' preprocess_data on the instance: Gradio validates and converts a payload there before any handler
    runs (a Textbox turns a number into text), and prints a traceback for anything but a gr.Error with print_exception off.
    """
    import gradio as gr

    stock = blocks.preprocess_data

    async def preprocess_data(block_fn: Any, inputs: list[Any], *args: Any, **kwargs: Any) -> Any:
        where = block_fn.api_name if isinstance(block_fn.api_name, str) else block_fn.name
        try:
            for block, value in zip(block_fn.inputs, inputs):
                if not getattr(block, "stateful", False):
                    check_request_value(block, value, limits)
            return await stock(block_fn, inputs, *args, **kwargs)
        except gr.Error as exc:
            raise refusal(where, str(exc.message)) from None
        except MMAdaptError as exc:
            raise refusal(where, str(exc)) from None
        except Exception as exc:  # noqa: BLE001 - Gradio's or pydantic's: the payload does not fit the page's widgets
            first = (str(exc).strip().splitlines() or [""])[0][:200]
            raise refusal(where, f"the request does not fit this page ({type(exc).__name__}: {first})") from None

    blocks.preprocess_data = preprocess_data
    return blocks


def as_ui_errors(handler: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap an event handler so every failure reaches the page as a message (gr.Error), never a traceback.

    Written here because Gradio shows only a bare "Error" for exceptions other than gr.Error unless show_error is on,
    and show_error would print any exception's text, including internal ones, to every visitor.
    """
    import gradio as gr

    def translate(exc: Exception) -> gr.Error:
        if isinstance(exc, gr.Error):
            return refusal(handler.__name__, str(exc.message))
        if isinstance(exc, MMAdaptError):
            return refusal(handler.__name__, str(exc))
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
    blocks.queue(default_concurrency_limit=1)  # model events also share MODEL_QUEUE: CPU-bound work gains nothing from more
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
    from mmadapt.data.digits import WORDS, digit_image, load_digits_arrays, split_indices

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
