"""The `mmadapt` command: validate, info, train and generate. Errors print as messages, never tracebacks."""
from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable
from typing import Any

from mmadapt.errors import MMAdaptError, RecipeError

EXIT_BAD_INPUT = 2


def cmd_validate(args: argparse.Namespace) -> int:
    from mmadapt.validate import load_recipe

    recipe, plan = load_recipe(args.recipe, args.overrides)
    print(f"{args.recipe}: ok ({len(recipe.nodes)} nodes: {' -> '.join(plan.order)})")
    for name, dims in plan.bridge_dims.items():
        print(f"  {name}: " + (", ".join(f"{k}={v}" for k, v in dims.items()) or "widths decided at load"))
    for note in plan.notes:
        print(f"  note: {note}")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from mmadapt.assemble import assemble
    from mmadapt.info import node_table
    from mmadapt.validate import load_recipe

    recipe, plan = load_recipe(args.recipe, args.overrides)
    model = assemble(recipe, plan)
    print(node_table(model))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from mmadapt.train import Trainer
    from mmadapt.validate import load_recipe

    recipe, plan = load_recipe(args.recipe, args.overrides)
    for note in plan.notes:
        logging.getLogger("mmadapt").info(note)
    trainer = Trainer(recipe, plan)
    card = trainer.train(resume=args.resume)
    if not trainer.is_main:  # one process reports; the others only trained their share
        return 0
    print(f"card: {card}")
    from mmadapt.evaluate import is_labelled

    if trainer.sharded:  # the test split would run on this process alone, and a sharded node needs all of them
        print(f"sharded run: evaluate the card on one process with `mmadapt eval {card}`")
    elif is_labelled(recipe.data):
        report_digits(trainer.model, card, grid=None)
    return 0


def report_digits(model: Any, card: Any, grid: str | None, limit: int | None = None) -> None:
    """Evaluate a digits card on the test split, print the figures and keep them beside the card."""
    import json
    from pathlib import Path

    from mmadapt.evaluate import caption_grid, evaluate_digits, evaluate_image_token

    if model.decoder.output == "image":
        figures = evaluate_image_token(model, limit=limit or 200)
        print(f"test samples: {figures['samples']}")
        print(f"referee reads the input digit in the generated picture: {figures['referee_accuracy']:.3f}")
        print(f"per digit: {figures['per_digit']}")
        if figures["referee_accuracy_by_group"]:
            print(f"per group: {figures['referee_accuracy_by_group']}")
        (Path(card) / "eval.json").write_text(json.dumps(figures, indent=2))
        return
    from mmadapt.evaluate import labelled_parts

    parts = labelled_parts(model.recipe.data)
    if len(parts) > 1:  # a mixture: each modality measured on its own test split
        measured = []
        for index, part in enumerate(parts):
            print(f"== part {index}: {part.get('type')}")
            figures = evaluate_digits(model, limit=limit, data=part)
            figures.pop("captions")
            print_text_figures(figures)
            measured.append({"data": part, **figures})
        if limit is None:
            (Path(card) / "eval.json").write_text(json.dumps({"parts": measured}, indent=2))
        return
    figures = evaluate_digits(model, limit=limit)
    captions = figures.pop("captions")
    print_text_figures(figures)
    if limit is None:
        (Path(card) / "eval.json").write_text(json.dumps(figures, indent=2))
    if grid and model.recipe.data.get("type") == "digits_captions":
        caption_grid(captions, Path(grid))
        print(f"grid: {grid}")


def print_text_figures(figures: dict[str, Any]) -> None:
    print(f"test samples: {figures['samples']}")
    print(f"caption accuracy: {figures['caption_accuracy']:.3f}")
    if figures["caption_accuracy_by_group"]:
        print(f"caption accuracy per group: {figures['caption_accuracy_by_group']}")
    for question, value in figures["zero_shot"].items():
        print(f"zero-shot '{question}': {value:.3f} (caption-then-answer pipeline: {figures['caption_then_answer'][question]:.3f})")
    print(f"CIDEr: {figures['cider']:.3f}")
    for example in figures["examples"]:
        print(f"  e.g. {example}")


def cmd_eval(args: argparse.Namespace) -> int:
    from mmadapt.errors import MMAdaptError
    from mmadapt.evaluate import is_labelled
    from mmadapt.inference import load_card

    model = load_card(args.card)
    if not is_labelled(model.recipe.data):
        raise MMAdaptError(f"{args.card}: eval measures cards trained on labelled digits data (digits_captions, fsdd_captions, digits_points); this card trained on {model.recipe.data.get('type')}")
    report_digits(model, args.card, grid=args.grid, limit=args.limit)
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from mmadapt.inference import generate_from_files, load_card

    given = {field: files for field in ("image", "audio", "points") if (files := getattr(args, field))}
    if len(given) != 1:
        raise MMAdaptError("give inputs of one kind: --image, --audio or --points (each repeatable)")
    (field, files), = given.items()
    model = load_card(args.card)
    settings: dict[str, Any] = {"max_new_tokens": args.max_new_tokens, "do_sample": args.sample}
    if args.sample:
        settings.update(temperature=args.temperature, top_p=args.top_p)
    for path, text in zip(files, generate_from_files(model, field, files, args.prompt or "", **settings)):
        print(f"{path}: {text}")
    return 0


PERSONALIZE_RECIPES = {"lora": "personalize-lora.yaml", "lokr": "personalize-lokr.yaml"}


def cmd_personalize(args: argparse.Namespace) -> int:
    """DreamBooth on a few images: the mini recipe for the method, pointed at the user's images, token and class."""
    import json
    from pathlib import Path

    from mmadapt.personalize import list_images, personalization_report
    from mmadapt.train import Trainer
    from mmadapt.validate import load_recipe

    found = len(list_images(args.images, "--images"))
    if found < 3:
        raise MMAdaptError(f"--images: {args.images} has {found} image(s); personalization needs 3 to 5")
    recipe_path = Path(__file__).resolve().parent.parent / "recipes" / "mini" / PERSONALIZE_RECIPES[args.method]
    if args.recipe:
        recipe_path = Path(args.recipe)
    overrides = [f"data.instance_dir={args.images}", f"data.instance_prompt=a {args.token} {args.class_word}",
                 f"graph.sd.placeholder={args.token}", f"graph.sd.placeholder_init={args.class_word}"]
    if args.class_prompt:
        overrides.append(f"data.class_prompt={args.class_prompt}")
    if args.checkpoint:
        overrides.append(f"graph.sd.checkpoint={args.checkpoint}")
    if args.output_dir:
        overrides.append(f"train.output_dir={args.output_dir}")
    recipe, plan = load_recipe(recipe_path, overrides + list(args.overrides))
    trainer = Trainer(recipe, plan)
    card = trainer.train()
    print(f"card: {card}")
    print(f"diffusers export: {Path(card) / 'diffusers'}")
    if args.report and trainer.is_main:
        figures = personalization_report(trainer.model, args.token)
        (Path(card) / "personalization.json").write_text(json.dumps(figures, indent=2))
        for key, value in figures.items():
            print(f"{key}: {value}")
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    from mmadapt.personalize import write_style_examples

    if args.dataset == "fsdd":
        from mmadapt.fsdd import ENV_VAR, fetch_fsdd, recordings

        root = fetch_fsdd(args.folder)
        print(f"FSDD: {len(recordings(root))} recordings in {root}; point {ENV_VAR} there or pass root: in a recipe")
        return 0
    paths = write_style_examples(args.folder)
    print(f"wrote {len(paths)} slanted digits to {args.folder}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Start a Gradio demo on the miniature zoo (or the given cards); blocks until Ctrl-C."""
    from mmadapt.demo import Limits, demo_module

    limits = Limits(max_image_pixels=args.max_image_pixels, max_audio_seconds=args.max_audio_seconds)
    demo_module(args.name).main(args.card, host=args.host, port=args.port, share=args.share, limits=limits)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mmadapt", description="Train small bridges between frozen encoders and generators.")
    sub = parser.add_subparsers(dest="command", required=True)

    def recipe_command(name: str, handler: Callable[[argparse.Namespace], int], help_text: str) -> argparse.ArgumentParser:
        command = sub.add_parser(name, help=help_text)
        command.add_argument("recipe", help="a recipe YAML file")
        command.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.lr=3e-4 graph.qformer.num_queries=16")
        command.set_defaults(handler=handler)
        return command

    recipe_command("validate", cmd_validate, "check a recipe without loading weights")
    recipe_command("info", cmd_info, "build the graph and print its nodes, sizes and shapes")
    train = recipe_command("train", cmd_train, "train the recipe's bridge and write a card")
    train.add_argument("--resume", action="store_true", help="continue from the run's last checkpoint")
    generate = sub.add_parser("generate", help="caption or answer about images, recordings or point clouds with a trained card")
    generate.add_argument("card", help="a bridge card folder")
    generate.add_argument("--image", action="append", help="an image file (repeatable)")
    generate.add_argument("--audio", action="append", help="a WAV/FLAC/OGG/MP3 file (repeatable)")
    generate.add_argument("--points", action="append", help="a .npy/.ply/.xyz point cloud (repeatable)")
    generate.add_argument("--prompt", help="a question, filled into the card's prompt template")
    generate.add_argument("--max-new-tokens", type=int, default=24)
    generate.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    generate.add_argument("--temperature", type=float, default=0.8)
    generate.add_argument("--top-p", type=float, default=0.95)
    generate.set_defaults(handler=cmd_generate)
    evaluate = sub.add_parser("eval", help="caption accuracy, zero-shot QA and CIDEr of a digits card on the test split")
    evaluate.add_argument("card", help="a bridge card folder")
    evaluate.add_argument("--grid", help="also write a PNG grid of test digits with their captions")
    evaluate.add_argument("--limit", type=int, help="only the first N test samples (quick checks)")
    evaluate.set_defaults(handler=cmd_eval)
    personalize = sub.add_parser("personalize", help="DreamBooth-LoRA/LoKr on 3-5 images: a card plus its diffusers export")
    personalize.add_argument("--images", required=True, help="a folder of 3-5 images of the subject or style")
    personalize.add_argument("--token", default="<sks>", help="the new word that will name the subject")
    personalize.add_argument("--class-word", default="digit", help="the subject's class, for prior preservation")
    personalize.add_argument("--class-prompt", help="prompt of the prior-preservation images (default: the recipe's)")
    personalize.add_argument("--method", choices=list(PERSONALIZE_RECIPES), default="lora")
    personalize.add_argument("--checkpoint", help="a Stable Diffusion pipeline folder or hub id (default: zoo:digits-sd)")
    personalize.add_argument("--recipe", help="start from this recipe instead of the mini one")
    personalize.add_argument("--output-dir", help="the run folder")
    personalize.add_argument("--report", action="store_true", help="also measure style and referee figures (mini world)")
    personalize.add_argument("overrides", nargs="*", help="key=value recipe overrides")
    personalize.set_defaults(handler=cmd_personalize)
    from mmadapt.demo import DEFAULT_HOST, DEMOS, Limits

    demo = sub.add_parser("demo", help="start a Gradio demo: vlm, audio2image or personalize (offline, mini zoo by default)")
    demo.add_argument("name", choices=list(DEMOS))
    demo.add_argument("--card", action="append", help="a card folder (repeatable: the page offers each); default: the shipped mini card")
    demo.add_argument("--port", type=int, help="default: Gradio's, 7860 or the next free one")
    demo.add_argument("--host", default=DEFAULT_HOST, help="the address to bind; 0.0.0.0 exposes the demo to the network")
    demo.add_argument("--share", action="store_true", help="also open a public gradio.live link (off by default)")
    demo.add_argument("--max-image-pixels", type=int, default=Limits.max_image_pixels, help="larger uploads are refused")
    demo.add_argument("--max-audio-seconds", type=float, default=Limits.max_audio_seconds, help="longer clips are refused")
    demo.set_defaults(handler=cmd_demo)
    data = sub.add_parser("data", help="write example data")
    data.add_argument("dataset", choices=["slanted-digits", "fsdd"],
                      help="slanted-digits: the mini personalization example; fsdd: clone the spoken digits (needs internet)")
    data.add_argument("folder")
    data.set_defaults(handler=cmd_data)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "urllib3", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except RecipeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except MMAdaptError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("interrupted; the last checkpoint is intact (resume with --resume)", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - the last line of defence: a message, not a traceback
        if os.environ.get("MMADAPT_DEBUG"):
            raise
        print(f"error: unexpected {type(exc).__name__}: {exc}\n(set MMADAPT_DEBUG=1 for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
