"""The `audio2image` demo: a recording in, pictures out, through any card whose encoder hears and whose generator draws."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from mmadapt.serve.demo import (CARDS_DIR, MODEL_QUEUE, REPO_ROOT, Limits, as_ui_errors, check_audio, guard_requests, launch,
                          load_demo_card)
from mmadapt.data.digits import WORDS
from mmadapt.errors import CardError, DataError
from mmadapt.data.fsdd import fsdd_available, fsdd_root

log = logging.getLogger("mmadapt.serve.demo.audio2image")
# The shipped cards, each with the recipe that remakes it: AudioToken's word in the prompt, and IP-Adapter's image prompt
DEFAULT_CARDS = {CARDS_DIR / "mini-audio-token": REPO_ROOT / "recipes" / "mini" / "audio-token.yaml",
                 CARDS_DIR / "mini-audio-ip-adapter": REPO_ROOT / "recipes" / "mini" / "audio-ip-adapter.yaml"}
MAX_PICTURES = 4
CSS = "#pictures img {image-rendering: pixelated}"  # the zoo's pictures are 16 px: show pixels, not blur


def example_clips() -> list[Path]:
    """One test-split recording (index 0, FSDD's own convention) of each digit, speakers taken in turn."""
    if not fsdd_available():
        return []
    folder = fsdd_root() / "recordings"
    speakers = sorted({p.stem.split("_")[1] for p in folder.glob("0_*_0.wav")})
    return [folder / f"{d}_{speakers[d % len(speakers)]}_0.wav" for d in range(len(WORDS))] if speakers else []


def audio_field(model: Any) -> str:
    """The data field the card's audio encoder reads (e.g. 'audio')."""
    for name, encoder in model.encoders().items():
        for refs in model.plan.inputs[name].values():
            for ref in refs:
                if ref.is_data and encoder.modality == "audio":
                    return str(ref.key)
    raise CardError("the card has no audio encoder reading from data")


def how_it_draws(model: Any, prompt: str) -> str:
    """One line on where the card puts the clip: an IP-Adapter's image prompt, or a word in the prompt (AudioToken)."""
    if "ip_tokens" in model.plan.inputs[model.generator_name]:
        return f"an image prompt beside the text `{prompt}`, read by IP-Adapter's decoupled cross-attention"
    return f"the word `{model.generator.placeholder}` in the frozen diffusion model's prompt `{prompt}` (AudioToken's design)"


def build_demo(cards: list[str | Path] | None = None, limits: Limits | None = None) -> Any:
    """The audio-to-image page for the given cards (default: the shipped AudioToken and IP-Adapter cards), a choice
    between them when there are several; not launched."""
    import gradio as gr

    limits = limits or Limits()
    for card, recipe in DEFAULT_CARDS.items() if cards is None else ():
        if not card.is_dir():
            raise CardError(f"{card}: a shipped audio card is missing; remake it with `mmadapt train "
                            f"{recipe.relative_to(REPO_ROOT)}` and copy runs/{card.name}/card there, or pass --card")
    models = {Path(c).name: load_demo_card(c, "audio2image", "image", ("audio",)) for c in (cards or list(DEFAULT_CARDS))}
    prompts = {name: str(m.recipe.data.get("text") or m.generator.placeholder) for name, m in models.items()}  # trained inside
    resolution = next(iter(models.values())).generator.resolution

    @as_ui_errors
    def generate(audio: str | None, seed: float, steps: float, guidance: float, pictures: float, card: str | None = None,
                 progress: gr.Progress = gr.Progress()) -> list[Any]:
        from mmadapt.serve.inference import generate_for_samples

        card = card or next(iter(models))
        if card not in models:
            raise CardError(f"card: {card!r} is not one of this demo's cards ({', '.join(models)})")
        model, prompt = models[card], prompts[card]
        check_audio(audio, limits, "audio")
        if not 1 <= int(pictures) <= MAX_PICTURES:
            raise DataError(f"pictures: {pictures} is not between 1 and {MAX_PICTURES}")
        if not 1 <= int(steps) <= 200:
            raise DataError(f"steps: {steps} is not between 1 and 200")
        images = []
        for offset in progress.tqdm(range(int(pictures)), desc="drawing"):
            sample = {audio_field(model): audio, "text": prompt, "key": "demo", "id": 0}
            images += generate_for_samples(model, [sample], prompt, seed=int(seed) + offset,
                                           num_inference_steps=int(steps), guidance_scale=float(guidance))
        return [(image, f"seed {int(seed) + i}") for i, image in enumerate(images)]

    with gr.Blocks(analytics_enabled=False, title="mmadapt: audio to image") as demo:
        gr.Markdown("# Audio to image\nA frozen audio encoder's reading of a clip goes into a frozen diffusion model. "
                    + " ".join(f"Card `{name}`: {how_it_draws(m, prompts[name])}." for name, m in models.items()))
        with gr.Row():
            with gr.Column():
                card = gr.Radio(list(models), value=next(iter(models)), label="Card", elem_id="card", interactive=len(models) > 1)
                audio = gr.Audio(sources=["upload", "microphone"], type="filepath", label="Audio", elem_id="audio")
                clips = example_clips()
                if clips:
                    gr.Examples([[str(c)] for c in clips], inputs=[audio], label="Spoken digits (FSDD test split)")
                else:
                    gr.Markdown("No example clips: the FSDD recordings were not found (set MMADAPT_FSDD).")
                with gr.Row():
                    seed = gr.Number(0, precision=0, minimum=0, maximum=2**31 - 1, label="Seed")
                    steps = gr.Slider(1, 100, value=25, step=1, label="Steps")
                with gr.Row():
                    guidance = gr.Slider(1.0, 10.0, value=4.0, step=0.5, label="Guidance")
                    pictures = gr.Slider(1, MAX_PICTURES, value=2, step=1, label="Pictures")
                button = gr.Button("Generate", variant="primary", elem_id="generate-button")
            with gr.Column():
                gallery = gr.Gallery(label=f"Pictures ({resolution} px, shown enlarged)", elem_id="pictures",
                                     columns=2, height=420, format="png", interactive=False)
        button.click(generate, [audio, seed, steps, guidance, pictures, card], gallery, api_name="generate",
                     concurrency_id=MODEL_QUEUE, concurrency_limit=1)
        guard_requests(demo, limits)
        demo.demo_css = CSS  # Gradio 6 takes css at launch; mmadapt.serve.demo.launch passes it
        demo.demo_allowed_paths = [str(clips[0].parent)] if clips else []
    return demo


def main(cards: list[str] | None, host: str, port: int | None, share: bool, limits: Limits) -> None:
    launch(build_demo(list(cards) if cards else None, limits), host=host, port=port, share=share)
