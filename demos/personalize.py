"""The `personalize` demo: a studio that teaches a diffusion model a new word from 3-5 pictures, live and cancellable."""
from __future__ import annotations

import hashlib
import json
import logging
import queue
import shutil
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gradio as gr  # at module level: Gradio resolves the handler's `gr.Request` hint in this module's globals
from PIL import Image, ImageDraw, ImageFont

from mmadapt.serve.demo import MODEL_QUEUE, REPO_ROOT, Limits, as_ui_errors, check_image, guard_requests, launch, upload_name
from mmadapt.errors import DataError, MMAdaptError
from mmadapt.data.dreambooth import IMAGE_SUFFIXES, MIN_IMAGES
from mmadapt.training.trainer import Trainer

log = logging.getLogger("mmadapt.serve.demo.personalize")
BASES = {"digits-sd (U-Net, SD 1.x layout)": "zoo:digits-sd",  # the frozen model to personalize; the recipe follows its layout
         "digits-dit (transformer, SD 3 layout)": "zoo:digits-dit"}
METHODS = ("lora", "lokr")
EXAMPLE_FOLDER = REPO_ROOT / "examples" / "slanted-digits"
DEFAULT_PROMPTS = "a {token} two\na {token} seven"  # digits the examples do not show: the style must carry over
SEEDS = (0, 1)  # two pictures per prompt in the grid
TILE = 128  # grid cell size: the zoo's 16 px pictures scaled up with nearest neighbours
CSS = "#grid img {image-rendering: pixelated}"


class TrainingCancelled(MMAdaptError):
    """The user pressed Cancel; nothing was written to the card folder."""


class StudioTrainer(Trainer):
    """mmadapt's Trainer, reporting each step and stopping when asked.

    Overrides `_log` because the Trainer has no callback hook and every optimizer step passes through it.
    """

    def __init__(self, recipe: Any, plan: Any, records: "queue.Queue[dict[str, Any]]", stop: threading.Event) -> None:
        super().__init__(recipe, plan)
        self.step_records, self.stop = records, stop

    def _log(self, record: dict[str, Any]) -> None:
        super()._log(record)
        if "loss" in record:
            self.step_records.put(record)
        if self.stop.is_set():
            raise TrainingCancelled(f"cancelled at step {record.get('step')}")


def sort_uploads(files: list[Any] | None, limits: Limits, field: str = "images") -> tuple[list[Path], dict[str, str]]:
    """The uploaded pictures (each opened and size-checked) and optional captions (`<picture stem>.txt`)."""
    paths = [Path(getattr(f, "name", f)) for f in (files or [])]
    images = [p for p in paths if p.suffix.lower() in IMAGE_SUFFIXES]
    captions = {p.stem: p.read_text(errors="replace").strip() for p in paths if p.suffix.lower() == ".txt"}
    others = [upload_name(p) for p in paths if p not in images and p.suffix.lower() != ".txt"]
    if others:
        raise DataError(f"{field}: {', '.join(others)}: not a picture ({', '.join(IMAGE_SUFFIXES)}) or a caption (.txt)")
    if not MIN_IMAGES <= len(images) <= limits.max_personalize_images:
        raise DataError(f"{field}: {len(images)} picture(s); personalization needs {MIN_IMAGES} to "
                        f"{limits.max_personalize_images}")
    for path in images:
        check_image(path, limits, field)
    return images, captions


def check_word(value: str, field: str) -> str:
    word = (value or "").strip()
    if not word or len(word.split()) != 1:
        raise DataError(f"{field}: {value!r} must be one word without spaces, e.g. <sks> or digit")
    return word


def grid_image(rows: list[tuple[str, list[Image.Image]]], titles: list[str]) -> Image.Image:
    """Labelled rows of pictures, each scaled to TILE pixels (drawn here: a two-row comparison needs no plotting library)."""
    label_width, title_height, gap = 190, 20, 6
    columns = max(len(images) for _, images in rows)
    cell = TILE + gap
    grid = Image.new("RGB", (label_width + columns * cell, title_height + len(rows) * cell), "white")
    draw = ImageDraw.Draw(grid)
    font = ImageFont.load_default(size=13)
    for column, title in enumerate(titles):
        draw.text((label_width + column * cell + 2, 3), title, fill="black", font=font)
    for row, (label, images) in enumerate(rows):
        draw.text((4, title_height + row * cell + TILE // 2 - 7), label, fill="black", font=font)
        for column, image in enumerate(images):
            grid.paste(image.resize((TILE, TILE), Image.Resampling.NEAREST), (label_width + column * cell, title_height + row * cell))
    return grid


class Studio:
    """Runs and their files under `work_dir`; class images are made once per base and class prompt and reused."""

    def __init__(self, work_dir: Path, limits: Limits, overrides: list[str]) -> None:
        self.work_dir, self.limits, self.overrides = work_dir, limits, overrides
        self.stops: dict[str, threading.Event] = {}  # session -> its running training's stop flag

    def recipe_for(self, run_dir: Path, token: str, class_word: str, method: str, steps: int,
                   base: str = next(iter(BASES))) -> tuple[Any, Any]:
        """The mini personalization recipe with the studio's choices, as `mmadapt personalize` fills it in."""
        from mmadapt.cli import personalization_recipe
        from mmadapt.core.spec import load_yaml
        from mmadapt.core.validate import load_recipe

        if method not in METHODS:
            raise DataError(f"method: {method!r} is not one of {', '.join(METHODS)}")
        if base not in BASES:
            raise DataError(f"base model: {base!r} is not one of {', '.join(BASES)}")
        path, filled = personalization_recipe(BASES[base], method, token, class_word)
        raw = load_yaml(str(path))
        classes = hashlib.sha1(json.dumps([BASES[base], raw["data"].get("class_prompt"), self.overrides],
                                          sort_keys=True).encode()).hexdigest()[:12]
        overrides = [*filled, f"data.instance_dir={run_dir / 'images'}",
                     f"data.class_dir={self.work_dir / 'class-images' / classes}", f"train.output_dir={run_dir}",
                     f"train.steps={steps}", f"train.log_every={max(1, steps // 10)}"]
        return load_recipe(str(path), overrides + self.overrides)

    def warm_up(self) -> None:
        """Load the base once and make the shared class images now, so the first run starts training at once."""
        from mmadapt.core.assemble import assemble
        from mmadapt.data.collate import build_dataset

        started = time.perf_counter()
        run_dir = self.work_dir / "warm-up"
        shutil.copytree(EXAMPLE_FOLDER, run_dir / "images", dirs_exist_ok=True)
        recipe, plan = self.recipe_for(run_dir, "<sks>", "digit", "lora", 1)
        build_dataset(recipe.data).prepare(assemble(recipe, plan), run_dir)
        log.info("personalize demo: loaded %s and its class images in %.1f s", recipe.nodes["sd"].params["checkpoint"],
                 time.perf_counter() - started)

    def train(self, files: list[Any] | None, token: str, class_word: str, method: str, steps: float, prompts: str,
              before_word: str, base: str, session: str, progress: Any) -> Iterator[tuple[Any, ...]]:
        token, class_word = check_word(token, "token"), check_word(class_word, "class word")
        images, captions = sort_uploads(files, self.limits)
        prompt_list = [p.strip() for p in (prompts or "").splitlines() if p.strip()]
        if not prompt_list or any("{token}" not in p for p in prompt_list):
            raise DataError("grid prompts: one prompt per line, each with {token} where your word goes")
        steps = int(steps)
        run_dir = self.work_dir / f"run-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
        (run_dir / "images").mkdir(parents=True)
        for index, path in enumerate(images):  # the uploads under plain names, captions beside them as the data reads them
            check_image(path, self.limits).save(run_dir / "images" / f"image-{index}.png")
            if path.stem in captions:
                (run_dir / "images" / f"image-{index}.txt").write_text(captions[path.stem])
        recipe, plan = self.recipe_for(run_dir, token, class_word, method, steps, base)
        progress(0, desc="loading the base model and class images")
        yield f"Preparing {len(images)} pictures ({len(captions)} with captions) …", None, None, None
        records: queue.Queue[dict[str, Any]] = queue.Queue()
        stop = self.stops[session] = threading.Event()
        trainer = StudioTrainer(recipe, plan, records, stop)
        decoder = trainer.model.generator
        filled = [p.replace("{token}", token) for p in prompt_list]
        plain = [" ".join(p.replace("{token}", before_word or "").split()) for p in prompt_list]
        before = [image for p in plain for seed in SEEDS  # the frozen base on the prompt in its own words
                  for image in decoder.generate([p], seed=seed)]
        outcome: dict[str, Any] = {}

        def run() -> None:
            try:
                outcome["card"] = trainer.train()
            except Exception as exc:  # noqa: BLE001 - handed to the page's thread, which shows it
                outcome["error"] = exc

        worker = threading.Thread(target=run, name="personalize-training", daemon=True)
        started = time.perf_counter()
        worker.start()
        try:
            while worker.is_alive() or not records.empty():
                try:
                    record = records.get(timeout=0.5)
                except queue.Empty:
                    continue
                step = record["step"]
                left = (time.perf_counter() - started) / step * (steps - step)
                status = f"step {step}/{steps} · loss {record['loss']:.4f} · {left:.0f} s left"
                progress((step, steps), desc=status, unit="steps")
                yield f"Training: {status}", None, None, None
            worker.join()
        finally:
            stop.set()  # a cancelled page closes this generator: the training thread stops at its next step
            self.stops.pop(session, None)
        if "error" in outcome:
            raise outcome["error"]
        card = outcome["card"]
        progress(1.0, desc="drawing the after pictures")
        trainer.model.eval()
        after = [image for p in filled for seed in SEEDS
                 for image in trainer.model.generate({"size": 1, "node_inputs": {}}, [p], seed=seed)]
        titles = [f"{p} #{seed}" for p in filled for seed in SEEDS]
        grid = grid_image([(f"before: '{plain[0]}'", before), (f"after: '{filled[0]}'", after)], titles)
        grid.save(run_dir / "before-after.png")
        archive = shutil.make_archive(str(run_dir / "card"), "zip", card)
        exported = sorted(str(p) for p in (card / "diffusers").rglob("*") if p.is_file())
        elapsed = time.perf_counter() - started
        word = (" and the word with `pipe.load_textual_inversion(...)`" if any(p.endswith("learned_embeds.safetensors") for p in exported)
                else f" (the word '{token}' is read as written)")
        yield (f"Done: {steps} steps in {elapsed:.0f} s. Card: `{card}`; load the adapter in diffusers with "
               f"`pipe.load_lora_weights(...)`{word}."), grid, archive, exported

    def cancel(self, session: str) -> str:
        stop = self.stops.get(session)
        if stop is None:
            return "Nothing is training."
        stop.set()
        return "Cancelled; the run stopped before writing a card."


def build_demo(work_dir: str | Path = "runs/demo-personalize", limits: Limits | None = None,
               overrides: list[str] | None = None, warm_up: bool = True, default_steps: int = 800) -> Any:
    """The studio page (not launched). `overrides` are recipe key=value overrides for every run and `default_steps` the slider's
    start value (the recipe's 800; tests use fewer)."""
    limits = limits or Limits()
    studio = Studio(Path(work_dir).resolve(), limits, list(overrides or []))
    if warm_up:
        studio.warm_up()
    example_files = [str(p) for p in sorted(EXAMPLE_FOLDER.iterdir()) if p.suffix.lower() in (*IMAGE_SUFFIXES, ".txt")]

    @as_ui_errors
    def train(files: list[Any] | None, token: str, class_word: str, method: str, steps: float, prompts: str,
              before_word: str, base: str, request: gr.Request, progress: gr.Progress = gr.Progress()) -> Iterator[tuple[Any, ...]]:
        yield from studio.train(files, token, class_word, method, steps, prompts, before_word, base, request.session_hash or "",
                                progress)

    def cancel(request: gr.Request) -> str:
        return studio.cancel(request.session_hash or "")

    with gr.Blocks(analytics_enabled=False, title="mmadapt: personalization studio") as demo:
        gr.Markdown("# Personalization studio\nUpload 3-5 pictures of a subject or style (a `<picture>.txt` beside a "
                    "picture is its caption), pick a new word and its class, and train a LoRA plus the word's embedding "
                    "on a frozen diffusion model of the miniature zoo (16 px handwritten digits): `digits-sd`, a U-Net, or "
                    "`digits-dit`, a diffusion transformer in the SD 3 layout, where the word is read as written.")
        with gr.Row():
            with gr.Column():
                # No file_types: Gradio's own refusal does not name the file; sort_uploads does.
                files = gr.File(file_count="multiple", label="Pictures (3-5) and captions",
                                elem_id="pictures")
                example = gr.Button("Use the slanted-digits example", elem_id="example-button")
                with gr.Row():
                    token = gr.Textbox("<sks>", label="Token (the new word)")
                    class_word = gr.Textbox("digit", label="Class word")
                with gr.Row():
                    method = gr.Radio(list(METHODS), value="lora", label="Adapter")
                    base = gr.Radio(list(BASES), value=next(iter(BASES)), label="Base model (layout)", elem_id="base")
                steps = gr.Slider(10, 1600, value=default_steps, step=10, label="Training steps (the recipe's 800: about 80 s on 2 CPU cores)")
                prompts = gr.Textbox(DEFAULT_PROMPTS, lines=2, label="Grid prompts ({token} is your word)")
                before_word = gr.Textbox("handwritten", label="Before row: the word in place of the token",
                                         info="the frozen base model draws the prompts with this word instead")
                with gr.Row():
                    start = gr.Button("Train", variant="primary", elem_id="train-button")
                    stop = gr.Button("Cancel", variant="stop", elem_id="cancel-button")
            with gr.Column():
                status = gr.Markdown("Ready.", elem_id="status")
                grid = gr.Image(label="Before / after", type="pil", format="png", elem_id="grid", interactive=False)
                card_zip = gr.File(label="Card (zip)", elem_id="card-zip", interactive=False)
                exported = gr.File(label="Diffusers export (LoRA or LoKr, learned embedding)", file_count="multiple",
                                   elem_id="diffusers-export", interactive=False)
        example.click(lambda: example_files, None, files, api_name="example")
        event = start.click(train, [files, token, class_word, method, steps, prompts, before_word, base], [status, grid, card_zip, exported],
                            api_name="train", concurrency_id=MODEL_QUEUE, concurrency_limit=1)  # one training at a time
        stop.click(cancel, None, status, cancels=[event], api_name="cancel", queue=False)
        guard_requests(demo, limits)
        demo.demo_css = CSS  # Gradio 6 takes css at launch; mmadapt.serve.demo.launch passes it
        demo.demo_allowed_paths = [str(EXAMPLE_FOLDER), str(studio.work_dir)]
    return demo


def main(cards: list[str] | None, host: str, port: int | None, share: bool, limits: Limits) -> None:
    if cards:
        raise MMAdaptError("the personalize demo trains its own card; --card does not apply to it")
    launch(build_demo(limits=limits), host=host, port=port, share=share)
