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
    print(f"card: {card}")
    if recipe.data.get("type") == "digits_captions" and trainer.is_main:
        report_digits(trainer.model, card, grid=None)
    return 0


def report_digits(model: Any, card: Any, grid: str | None, limit: int | None = None) -> None:
    """Evaluate a digits card on the test split, print the figures and keep them beside the card."""
    import json
    from pathlib import Path

    from mmadapt.evaluate import caption_grid, evaluate_digits

    figures = evaluate_digits(model, limit=limit)
    captions = figures.pop("captions")
    print(f"test samples: {figures['samples']}")
    print(f"caption accuracy: {figures['caption_accuracy']:.3f}")
    for question, value in figures["zero_shot"].items():
        print(f"zero-shot '{question}': {value:.3f} (caption-then-answer pipeline: {figures['caption_then_answer'][question]:.3f})")
    print(f"CIDEr: {figures['cider']:.3f}")
    for example in figures["examples"]:
        print(f"  e.g. {example}")
    if limit is None:
        (Path(card) / "eval.json").write_text(json.dumps(figures, indent=2))
    if grid:
        caption_grid(captions, Path(grid))
        print(f"grid: {grid}")


def cmd_eval(args: argparse.Namespace) -> int:
    from mmadapt.errors import MMAdaptError
    from mmadapt.inference import load_card

    model = load_card(args.card)
    if model.recipe.data.get("type") != "digits_captions":
        raise MMAdaptError(f"{args.card}: eval measures digits cards (data type digits_captions); this card trained on {model.recipe.data.get('type')}")
    report_digits(model, args.card, grid=args.grid, limit=args.limit)
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from mmadapt.inference import generate_from_images, load_card

    model = load_card(args.card)
    settings: dict[str, Any] = {"max_new_tokens": args.max_new_tokens, "do_sample": args.sample}
    if args.sample:
        settings.update(temperature=args.temperature, top_p=args.top_p)
    for image, text in zip(args.image, generate_from_images(model, args.image, args.prompt or "", **settings)):
        print(f"{image}: {text}")
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
    generate = sub.add_parser("generate", help="caption or answer about images with a trained card")
    generate.add_argument("card", help="a bridge card folder")
    generate.add_argument("--image", action="append", required=True, help="an image file (repeatable)")
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
