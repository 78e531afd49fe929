"""The `vlm` demo: caption an input and chat about it with any card whose generator writes text."""
from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mmadapt.data.captions import TEMPLATES
from mmadapt.core.registry import sub_sections
from mmadapt.data.modalities import MODALITIES, modality_of
from mmadapt.serve.demo import (CARDS_DIR, EXAMPLES_DIR, MODEL_QUEUE, Limits, as_ui_errors, check_audio, check_card_fits_demo,
                          check_image, guard_requests, image_input, launch, load_demo_card)
from mmadapt.errors import CardError, DataError

log = logging.getLogger("mmadapt.serve.demo.vlm")
DEFAULT_CARD = CARDS_DIR / "mini-qformer"  # stage 1: captions, and each question asked alone
CHAT_CARD = CARDS_DIR / "mini-chat"  # stage 2: chats, with history and several pictures
DEFAULT_CARDS = (CHAT_CARD, DEFAULT_CARD)
DIGIT_EXAMPLES = EXAMPLES_DIR / "digits"
DECODING = ("greedy", "sampled")
CAPTION_QUESTION = "What does it show?"  # how a chat card is asked for a caption: stage 1's caption instruction
# The zoo's digits are 8x8: draw them large, as pixels rather than blur.
CSS = ("#vlm-input img {image-rendering: pixelated; width: 100%; height: 100%; object-fit: contain} .gallery img {image-rendering: pixelated} "
       "#chat img {image-rendering: pixelated; width: 64px; height: 64px}")


def data_fields(model: Any) -> dict[str, str]:
    """{data field: modality} over the card's encoders, e.g. {'image': 'image'} or {'image': 'image', 'audio': 'audio'}."""
    fields: dict[str, str] = {}
    for name, encoder in model.encoders().items():
        for refs in model.plan.inputs[name].values():
            fields.update({r.key: modality_of(encoder).name for r in refs if r.is_data and r.key})
    return fields


def read_input(modality: str, value: Any, field: str, limits: Limits) -> Any:
    """An upload checked for its modality, in the form the card's encoder preprocesses: a picture within the demo's
    pixel limit, a clip within its length and above silence, any other file as the modality table reads it."""
    widget = MODALITIES[modality].widget
    if widget == "image":
        return check_image(value, limits, field)
    if value is None:
        raise DataError(f"{field}: no {modality} given")
    if widget == "audio":
        check_audio(value, limits, field)
        return value  # the encoder decodes the checked file itself, at its own rate
    return MODALITIES[modality].read(value)


class CardSet:
    """The demo's cards, all loaded at start; a listed card that does not fit is kept with its reason."""

    def __init__(self, cards: list[str | Path]) -> None:
        self.models: dict[str, Any] = {}
        self.refused: dict[str, str] = {}
        for card in cards:
            try:
                check_card_fits_demo(card, "vlm", "text", tuple(MODALITIES))
            except CardError as exc:
                if not self.models and not self.refused:
                    raise  # the first card is the page's own: it must fit
                self.refused[str(card)] = str(exc)
                log.warning("%s", exc)
                continue
            self.models[str(card)] = model = load_demo_card(card, "vlm", "text", tuple(MODALITIES))
            warm_up(model)
        self.fields: dict[str, str] = {}
        for model in self.models.values():
            self.fields.update(data_fields(model))

    def get(self, card: str) -> Any:
        if card in self.refused:
            raise CardError(self.refused[card])
        if card not in self.models:
            raise CardError(f"card {card!r} is not one of this demo's cards: {', '.join(self.models)}")
        return self.models[card]


def warm_up(model: Any) -> None:
    """One caption of a bundled example at start: first-call set-up (kernels, caches) happens before any visitor."""
    examples = sorted(DIGIT_EXAMPLES.glob("*.png"))
    if examples and "image" in data_fields(model):
        answer(model, ["image"], [examples[0]], None, settings_of("greedy", 1.0, 8), Limits())


def settings_of(decoding: str, temperature: float, max_tokens: float) -> dict[str, Any]:
    if decoding not in DECODING:
        raise DataError(f"decoding: {decoding!r} is not one of {', '.join(DECODING)}")
    sampled = decoding == "sampled"
    return {"max_new_tokens": int(max_tokens), "do_sample": sampled, **({"temperature": float(temperature)} if sampled else {})}


def answer(model: Any, fields: list[str], values: list[Any], question: str | None, settings: dict[str, Any], limits: Limits) -> str:
    """One generation: the card's inputs from the widgets; no question: its caption prompt, else the question in its template.

    A multi-modality card takes whichever of its inputs are given (at least one); a single-modality card needs its own.
    """
    from mmadapt.serve.inference import generate_for_samples, generate_reply, prompt_for, section_for

    by_field = dict(zip(fields, values))
    own = data_fields(model)
    mixed = sub_sections(model.recipe.data) is not None
    sample: dict[str, Any] = {"text": "", "key": "demo", "id": 0}
    for field, modality in own.items():
        if mixed and by_field.get(field) is None:
            continue
        sample[field] = read_input(modality, by_field.get(field), field, limits)
    if mixed and not set(own) & set(sample):
        raise DataError(f"no input given; this card takes any of: {', '.join(own)}")
    if model.generator.chats():  # a stage-2 card: the question (or the caption question) as a one-turn conversation
        inputs = {field: [sample[field]] for field in own if field in sample}
        turn = with_markers(question or CAPTION_QUESTION, 1, chat_marker(model))
        return generate_reply(model, [{"from": "human", "value": turn}], inputs, **settings).strip()
    section = section_for(model, set(own) & set(sample))
    prompt = prompt_for(section, question)
    template = section.get("template", "caption")
    template = "instruction" if question and template == "raw" else template  # a raw prompt has no question slot: asked as eval does
    reply = generate_for_samples(model, [sample], prompt, **settings)[0]
    turn = "Question:" if template == "raw" else TEMPLATES[template][0].split("{prompt}")[0].strip()
    return (reply.split(turn)[0] if turn else reply).strip()  # a reply that runs on into a new turn stops there, as a chat reply would


def chat_marker(model: Any) -> str:
    """The text a chat card's conversations mark its picture's place with (its recipe's `markers`, e.g. "<image>")."""
    markers = set(getattr(model.generator, "markers", {}).values())
    if len(markers) != 1:
        raise CardError(f"this demo chats with cards whose LM reads one input marker; this card's: {sorted(markers) or 'none'}")
    return markers.pop()


def with_markers(text: str, pictures: int, marker: str) -> str:
    """A user turn's text with one marker per picture attached to it: where the user wrote them, else before the text."""
    written = text.count(marker)
    if written == pictures:
        return text
    if written:
        raise DataError(f"message: {written} {marker} in the text but {pictures} pictures attached to it")
    return marker * pictures + ("\n" if pictures else "") + text


def chat_turn(model: Any, state: dict[str, Any], text: str, paths: list[str], settings: dict[str, Any],
              limits: Limits) -> Iterator[tuple[str, dict[str, Any]]]:
    """The card's reply to one user turn with the pictures at `paths`, streamed: (the reply so far, the state after it).

    A chat card (its LM has a chat template) gets the whole conversation and every picture so far; any other text card
    is asked the question about the latest picture alone, as stage 1 was trained."""
    from mmadapt.serve.inference import stream_reply

    images = state["images"] + paths
    if len(images) > limits.max_chat_pictures:
        raise DataError(f"message: a conversation holds at most {limits.max_chat_pictures} pictures "
                        f"({len(state['images'])} given before, {len(paths)} now); clear the chat to start again")
    if not images and "image" in data_fields(model):
        raise DataError("message: no picture yet; attach one to the message (or give one on the left)")
    if not model.generator.chats():
        if model.recipe.data.get("template", "caption") == "caption" and sub_sections(model.recipe.data) is None:
            raise DataError("message: this card was trained with the caption template, which has no question slot")
        yield answer(model, ["image"], images[-1:], text, settings, limits), {"turns": [], "images": images[-1:]}
        return
    pictures = [check_image(p, limits, "message") for p in images]  # (re)read: the state keeps the uploads' paths
    turns = state["turns"] + [{"from": "human", "value": with_markers(text, len(paths), chat_marker(model))}]
    reply = ""
    for reply in stream_reply(model, turns, {"image": pictures}, **settings):
        yield reply, state
    yield reply, {"turns": turns + [{"from": "gpt", "value": reply}], "images": images}


def build_demo(cards: list[str | Path] | None = None, limits: Limits | None = None) -> Any:
    """The caption-and-chat page for the given cards (default: the shipped chat and stage-1 cards); not launched."""
    import gradio as gr

    limits = limits or Limits()
    card_set = CardSet([str(c) for c in (cards or DEFAULT_CARDS)])
    fields = list(card_set.fields)
    first = next(iter(card_set.models))

    def widgets_for(card: str) -> list[Any]:
        own = data_fields(card_set.models[card])
        return [gr.update(visible=f in own) for f in fields]

    @as_ui_errors
    def switch_card(card: str) -> list[Any]:
        card_set.get(card)
        return widgets_for(card)

    @as_ui_errors
    def caption(card: str, *args: Any) -> str:
        values, (decoding, temperature, max_tokens) = list(args[: len(fields)]), args[len(fields):]
        model = card_set.get(card)
        return answer(model, fields, values, None, settings_of(decoding, temperature, max_tokens), limits)

    @as_ui_errors
    def send(card: str, message: dict[str, Any], state: dict[str, Any] | None,
             *args: Any) -> Iterator[tuple[list[dict[str, Any]], dict[str, Any], dict[str, Any]]]:
        """One user turn: its pictures (else, first, the picture on the left) and text; the reply streams into the chat.
        The conversation lives in the session (`state`), so an API client sends only the new message."""
        values, (decoding, temperature, max_tokens) = list(args[: len(fields)]), args[len(fields):]
        model = card_set.get(card)
        settings = settings_of(decoding, temperature, max_tokens)
        text, files = (message.get("text") or "").strip(), list(message.get("files") or [])
        if not text:
            raise DataError("message: empty; type a question about the pictures")
        state = state if state and state.get("card") == card else {"card": card, "turns": [], "images": [], "shown": []}
        if len(state["shown"]) >= limits.max_chat_messages:
            raise DataError(f"chat: {len(state['shown'])} messages; the limit is {limits.max_chat_messages}; clear the chat")
        paths = [str(f.get("path") if isinstance(f, dict) else f) for f in files]
        for path in paths:
            check_image(path, limits, "message")  # refused before the chat shows it
        left = values[fields.index("image")] if "image" in fields else None
        if not paths and not state["images"] and left is not None:  # the picture given on the left starts the chat
            check_image(left, limits, "image")
            paths = [str(left)]
        shown = state["shown"] + [{"role": "user", "content": {"path": p}} for p in paths] + [{"role": "user", "content": text}]
        cleared = {"text": "", "files": []}
        for reply, after in chat_turn(model, state, text, paths, settings, limits):
            said = shown + [{"role": "assistant", "content": reply}]
            yield said, cleared, {**after, "card": card, "shown": said}

    def clear() -> tuple[list[Any], dict[str, Any], None]:
        return [], {"text": "", "files": []}, None

    with gr.Blocks(analytics_enabled=False, title="mmadapt: caption and chat") as demo:
        gr.Markdown("# Caption and chat\nA frozen encoder and a frozen language model joined by a small trained bridge "
                    "(a card). Give an input and get a caption; or chat: attach one or more pictures to a message and ask. "
                    "A chat card (mini-chat) reads the whole conversation and every picture in it, through its chat "
                    "template; a stage-1 card (mini-qformer) answers each question about the latest picture alone.")
        card = gr.Dropdown(list(card_set.models) + list(card_set.refused), value=first, label="Card",
                           interactive=len(cards or []) > 1)
        with gr.Row():
            with gr.Column():
                widgets = []
                first_fields = data_fields(card_set.models[first])
                for field in fields:
                    widgets.append(input_widget(gr, card_set.fields[field], field, visible=field in first_fields))
                if DIGIT_EXAMPLES.is_dir() and "image" in fields:
                    examples = sorted(DIGIT_EXAMPLES.glob("*.png"))
                    gr.Examples([[str(p)] for p in examples], inputs=[widgets[fields.index("image")]],
                                label="Test digits (the zoo never trained on them)", examples_per_page=10)
                with gr.Accordion("Generation settings", open=False):
                    decoding = gr.Radio(list(DECODING), value="greedy", label="Decoding")
                    temperature = gr.Slider(0.1, 2.0, value=0.8, step=0.05, label="Temperature (sampled only)")
                    max_tokens = gr.Slider(1, 64, value=32, step=1, label="Max new tokens")  # a pair's answers run to ~30
                caption_button = gr.Button("Caption", variant="primary", elem_id="caption-button")
            with gr.Column():
                caption_box = gr.Textbox(label="Caption", elem_id="caption", interactive=False)
                chat = gr.Chatbot(label="Chat", elem_id="chat", height=560)
                message = gr.MultimodalTextbox(label="Message", elem_id="message", file_types=["image"], file_count="multiple",
                                               placeholder="Attach pictures, then ask: What is their sum?", submit_btn="Ask")
                clear_button = gr.Button("Clear the chat", elem_id="clear-button", size="sm")
                # {"card", "turns": the LLaVA turns so far, "images": their pictures' paths in order, "shown": the chat}
                conversation = gr.State(None)
        settings = [decoding, temperature, max_tokens]
        card.change(switch_card, [card], widgets, api_name="switch_card")  # no model call: outside the model's queue
        one_queue = {"concurrency_id": MODEL_QUEUE, "concurrency_limit": 1}  # captions and questions wait in one line
        caption_button.click(caption, [card, *widgets, *settings], caption_box, api_name="caption", **one_queue)
        message.submit(send, [card, message, conversation, *widgets, *settings], [chat, message, conversation],
                       api_name="chat", **one_queue)
        clear_button.click(clear, None, [chat, message, conversation], api_name="clear")
        chat.clear(clear, None, [chat, message, conversation], api_name=False)  # the chat's own bin empties the history too
        card.change(clear, None, [chat, message, conversation], api_name=False)
        guard_requests(demo, limits)
        demo.demo_css = CSS  # Gradio 6 takes css at launch; mmadapt.serve.demo.launch passes it
    return demo


def input_widget(gr: Any, modality: str, field: str, visible: bool) -> Any:
    """The widget for one data field, as the modality table names it: a picture, a recording, or any other file."""
    label = field.capitalize() if field == modality else f"{field} ({modality})"
    widget = MODALITIES[modality].widget
    if widget == "image":
        return image_input(label=label, elem_id="vlm-input", height=256, visible=visible)
    if widget == "audio":
        return gr.Audio(type="filepath", sources=["upload", "microphone"], label=label, visible=visible)
    return gr.File(label=label, visible=visible)


def main(cards: list[str] | None, host: str, port: int | None, share: bool, limits: Limits) -> None:
    launch(build_demo(cards, limits), host=host, port=port, share=share)
