"""The `mmadapt` command line: validate, info, train, generate, eval, export, personalize, demo, data; no tracebacks."""
from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mmadapt.errors import MMAdaptError, RecipeError

EXIT_BAD_INPUT = 2
TRUST_HELP = "load a card whose recipe names code outside mmadapt (a dotted type:), importing it; only for cards you trust"


def cmd_validate(args: argparse.Namespace) -> int:
    from mmadapt.core.validate import load_recipe

    recipe, plan = load_recipe(args.recipe, args.overrides)
    print(f"{args.recipe}: ok ({len(recipe.nodes)} nodes: {' -> '.join(plan.order)})")
    for name, dims in plan.bridge_dims.items():
        print(f"  {name}: " + (", ".join(f"{k}={v}" for k, v in dims.items()) or "widths decided at load"))
    for note in plan.notes:
        print(f"  note: {note}")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from mmadapt.core.assemble import assemble
    from mmadapt.serve.info import node_table
    from mmadapt.core.validate import load_recipe

    recipe, plan = load_recipe(args.recipe, args.overrides)
    model = assemble(recipe, plan)
    print(node_table(model))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from mmadapt.training.trainer import Trainer
    from mmadapt.core.validate import load_recipe

    recipe, plan = load_recipe(args.recipe, args.overrides)
    for note in plan.notes:
        logging.getLogger("mmadapt").info(note)
    trainer = Trainer(recipe, plan)
    card = trainer.train(resume=args.resume)
    if not trainer.is_main:  # one process reports; the others only trained their share
        return 0
    print(f"card: {card}")
    from mmadapt.eval.chat import chat_section
    from mmadapt.eval.evaluate import is_labelled, report_card

    if trainer.sharded:  # the test split would run on this process alone, and a sharded node needs all of them
        print(f"sharded run: evaluate the card on one process with `mmadapt eval {card}`")
    elif is_labelled(recipe.data) or chat_section(recipe.data) is not None:  # figures a script can read, on the test split
        report_card(trainer.model, card, grid=None)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from mmadapt.eval.evaluate import report_card
    from mmadapt.serve.inference import load_card

    model = load_card(args.card, trust_code=args.trust_card_code)
    if args.data:  # any user's file: captions or conversations
        from mmadapt.eval.files import report_file

        report_file(model, args.data, args.report, limit=args.limit)
        return 0
    report_card(model, args.card, grid=args.grid, limit=args.limit)
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from mmadapt.serve.inference import generate_from_files, load_card

    from mmadapt.data.modalities import MODALITIES

    given = {m.field: files for m in MODALITIES.values() if (files := getattr(args, m.field))}
    if len(given) != 1:
        raise MMAdaptError(f"give inputs of one kind: {', '.join(m.flag for m in MODALITIES.values())} (each repeatable)")
    (field, files), = given.items()
    model = load_card(args.card, trust_code=args.trust_card_code)
    settings: dict[str, Any] = {"max_new_tokens": args.max_new_tokens, "do_sample": args.sample}
    if args.sample:
        settings.update(temperature=args.temperature, top_p=args.top_p)
    for path, text in zip(files, generate_from_files(model, field, files, args.prompt or "", **settings)):
        print(f"{path}: {text}")
    return 0


# The mini recipe for each layout (the node type its checkpoint folder needs) and method. SDXL runs SD 1.x's with the
# type changed: the token bridge reads its width off the folder. SD3's take the token as a written rare word.
PERSONALIZE_RECIPES = {"diffusion": {"lora": "personalize-lora.yaml", "lokr": "personalize-lokr.yaml"},
                       "sdxl": {"lora": "personalize-lora.yaml", "lokr": "personalize-lokr.yaml"},
                       "sd3": {"lora": "personalize-dit-lora.yaml", "lokr": "personalize-dit-lokr.yaml"}}


def personalization_recipe(checkpoint: str | None, method: str, token: str, class_word: str,
                           recipe: str | None = None) -> tuple[Path, list[str]]:
    """The mini recipe for the checkpoint's layout (read off its model_index.json) and the method, with the overrides
    that fill in the checkpoint, token and class word; `recipe` replaces the mini one."""
    import yaml

    from mmadapt.generators.diffusion.generator import PIPELINE_NODE_TYPES, read_pipeline_class

    layout = read_pipeline_class(checkpoint or "zoo:digits-sd")
    if checkpoint and layout not in PIPELINE_NODE_TYPES:
        raise MMAdaptError(f"--checkpoint: {checkpoint} is not a pipeline folder of a layout personalize knows "
                           f"({layout or 'no model_index.json'}; known: {', '.join(PIPELINE_NODE_TYPES)})")
    node_type = PIPELINE_NODE_TYPES.get(layout or "", "diffusion")
    path = Path(recipe) if recipe else Path(__file__).resolve().parent.parent / "recipes" / "mini" / PERSONALIZE_RECIPES[node_type][method]
    overrides = [f"data.instance_prompt=a {token} {class_word}"]
    try:  # a recipe with a placeholder has a token bridge fill the word's rows; without (SD3's), the word is read as written
        takes_token = "placeholder" in (yaml.safe_load(path.read_text()) or {}).get("graph", {}).get("sd", {})
    except (OSError, UnicodeDecodeError, yaml.YAMLError, AttributeError):
        takes_token = True  # load_recipe names what is wrong with the file
    if takes_token:
        overrides += [f"graph.sd.placeholder={token}", f"graph.sd.placeholder_init={class_word}"]
    if checkpoint:
        overrides += [f"graph.sd.checkpoint={checkpoint}", f"graph.sd.type={node_type}"]
    return path, overrides


def cmd_personalize(args: argparse.Namespace) -> int:
    """DreamBooth on a few images: the mini recipe for the method, pointed at the user's images, token and class."""
    import json

    from mmadapt.data.dreambooth import list_images
    from mmadapt.eval.personalization import personalization_report
    from mmadapt.training.trainer import Trainer
    from mmadapt.core.validate import load_recipe

    found = len(list_images(args.images, "--images"))
    if found < 3:
        raise MMAdaptError(f"--images: {args.images} has {found} image(s); personalization needs 3 to 5")
    recipe_path, overrides = personalization_recipe(args.checkpoint, args.method, args.token, args.class_word, args.recipe)
    overrides.append(f"data.instance_dir={args.images}")
    if args.class_prompt:
        overrides.append(f"data.class_prompt={args.class_prompt}")
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


def cmd_export(args: argparse.Namespace) -> int:
    """Write a card as a stock model folder (LLaVA, BLIP-2, diffusers files) that loads without mmadapt."""
    from pathlib import Path

    from mmadapt.core.checkpoint_io import atomic_dir
    from mmadapt.serve.inference import load_card

    output = Path(args.output)
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise MMAdaptError(f"{output}: already exists and is not an empty folder; nothing was written (pick a new folder)")
    model = load_card(args.card, trust_code=args.trust_card_code)
    with atomic_dir(output) as folder:  # a refused or failed export leaves no half-written folder
        written = model.generator.export_stock(model, folder)
    print(f"exported {args.card} to {output}: {', '.join(written)}")
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    from mmadapt.data.dreambooth import write_style_examples

    if args.dataset == "shards":
        from mmadapt.data.shards import write_shards

        if args.dest is None:
            raise MMAdaptError("mmadapt data shards SRC DEST: give the folder the shards go to")
        report = write_shards(Path(args.folder), Path(args.dest), args.per_shard)
        for path, reason in report.unreadable:
            print(f"left out {path}: {reason}", file=sys.stderr)
        print(f"wrote {report.samples} samples in {len(report.shards)} shards to {args.dest}"
              + (f"; {len(report.unreadable)} unreadable files left out" if report.unreadable else "")
              + f"; read them with data: {{type: hf_dataset, path: {args.dest}, column: <extension>, text_column: txt}}")
        return 0

    if args.dataset == "fsdd":
        from mmadapt.data.fsdd import ENV_VAR, fetch_fsdd, recordings

        root = fetch_fsdd(args.folder)
        print(f"FSDD: {len(recordings(root))} recordings in {root}; point {ENV_VAR} there or pass root: in a recipe")
        return 0
    paths = write_style_examples(args.folder)
    print(f"wrote {len(paths)} slanted digits to {args.folder}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Start a Gradio demo on the miniature zoo (or the given cards); blocks until Ctrl-C."""
    from mmadapt.serve.demo import TRUST_CARD_CODE, Limits, demo_module

    TRUST_CARD_CODE["allowed"] = args.trust_card_code
    limits = Limits(max_image_pixels=args.max_image_pixels, max_audio_seconds=args.max_audio_seconds,
                    max_text_chars=args.max_text_chars)
    demo_module(args.name).main(args.card, host=args.host, port=args.port, share=args.share, limits=limits)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from mmadapt.data.modalities import MODALITIES

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
    for modality in MODALITIES.values():
        generate.add_argument(modality.flag, dest=modality.field, action="append", help=f"{modality.files} (repeatable)")
    generate.add_argument("--prompt", help="a question, filled into the card's prompt template")
    generate.add_argument("--max-new-tokens", type=int, default=24)
    generate.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    generate.add_argument("--temperature", type=float, default=0.8)
    generate.add_argument("--top-p", type=float, default=0.95)
    generate.add_argument("--trust-card-code", action="store_true", help=TRUST_HELP)
    generate.set_defaults(handler=cmd_generate)
    evaluate = sub.add_parser("eval", help="a card's figures on its test split (digits), or on your own file (--data)")
    evaluate.add_argument("card", help="a bridge card folder")
    evaluate.add_argument("--data", help="a caption JSONL ({image, text}) or a LLaVA-format conversation JSON/JSONL to measure on")
    evaluate.add_argument("--report", help="where --data's JSON report goes (default: FILE.eval.json beside the file)")
    evaluate.add_argument("--grid", help="also write a PNG grid of test digits with their captions")
    evaluate.add_argument("--limit", type=int, help="only the first N test samples (quick checks)")
    evaluate.add_argument("--trust-card-code", action="store_true", help=TRUST_HELP)
    evaluate.set_defaults(handler=cmd_eval)
    personalize = sub.add_parser("personalize", help="DreamBooth-LoRA/LoKr on 3-5 images: a card plus its diffusers export")
    personalize.add_argument("--images", required=True, help="a folder of 3-5 images of the subject or style")
    personalize.add_argument("--token", default="<sks>", help="the new word that will name the subject")
    personalize.add_argument("--class-word", default="digit", help="the subject's class, for prior preservation")
    personalize.add_argument("--class-prompt", help="prompt of the prior-preservation images (default: the recipe's)")
    personalize.add_argument("--method", choices=list(PERSONALIZE_RECIPES["diffusion"]), default="lora")
    personalize.add_argument("--checkpoint", help="an SD 1.x, SDXL or SD3 pipeline folder (default: zoo:digits-sd; zoo:digits-dit is SD3's)")
    personalize.add_argument("--recipe", help="start from this recipe instead of the mini one")
    personalize.add_argument("--output-dir", help="the run folder")
    personalize.add_argument("--report", action="store_true", help="also measure style and referee figures (mini world)")
    personalize.add_argument("overrides", nargs="*", help="key=value recipe overrides")
    personalize.set_defaults(handler=cmd_personalize)
    export = sub.add_parser("export", help="write a card as a stock model folder: LLaVA or BLIP-2 (transformers), or diffusers' files")
    export.add_argument("card", help="a bridge card folder")
    export.add_argument("output", help="a new (or empty) folder to write")
    export.add_argument("--trust-card-code", action="store_true", help=TRUST_HELP)
    export.set_defaults(handler=cmd_export)
    from mmadapt.serve.demo import DEFAULT_HOST, DEMOS, Limits

    demo = sub.add_parser("demo", help="start a Gradio demo: vlm, audio2image or personalize (offline, mini zoo by default)")
    demo.add_argument("name", choices=list(DEMOS))
    demo.add_argument("--card", action="append", help="a card folder (repeatable: the page offers each); default: the shipped mini card")
    demo.add_argument("--port", type=int, help="default: Gradio's, 7860 or the next free one")
    demo.add_argument("--host", default=DEFAULT_HOST, help="the address to bind; 0.0.0.0 exposes the demo to the network")
    demo.add_argument("--share", action="store_true", help="also open a public gradio.live link (off by default)")
    demo.add_argument("--max-image-pixels", type=int, default=Limits.max_image_pixels, help="larger uploads are refused")
    demo.add_argument("--max-audio-seconds", type=float, default=Limits.max_audio_seconds, help="longer clips are refused")
    demo.add_argument("--max-text-chars", type=int, default=Limits.max_text_chars, help="longer typed text (question, prompt, word) is refused")
    demo.add_argument("--trust-card-code", action="store_true", help=TRUST_HELP)
    demo.set_defaults(handler=cmd_demo)
    data = sub.add_parser("data", help="write example data")
    data.add_argument("dataset", choices=["slanted-digits", "fsdd", "shards"],
                      help="slanted-digits: the mini personalization example; fsdd: clone the spoken digits (needs internet); "
                           "shards: a caption JSONL/CSV or a captioned picture folder (FOLDER) as webdataset tar shards in DEST")
    data.add_argument("folder", help="where the example data goes; for shards, the source file or folder")
    data.add_argument("dest", nargs="?", help="shards: the folder the tar shards go to")
    data.add_argument("--per-shard", type=int, default=1000, help="shards: samples per tar shard")
    data.set_defaults(handler=cmd_data)
    return parser


class StderrHandler(logging.StreamHandler):
    """Logs to whatever sys.stderr is at each record, so `main` called in-process (tests, notebooks) never writes to a closed stream."""

    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, _value: Any) -> None:
        pass


def setup_logging() -> None:
    """One stderr handler on the root logger at INFO, added once however often `main` runs."""
    root = logging.getLogger()
    if not any(isinstance(h, StderrHandler) for h in root.handlers):
        root.addHandler(StderrHandler())
    root.setLevel(logging.INFO)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    setup_logging()
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
