"""Recipe files: YAML loading, `key=value` overrides, and the typed training config."""
from __future__ import annotations

import copy
import os
import shutil
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from mmadapt.errors import Problem, RecipeError
from mmadapt.core.params import Fraction, NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt, check, hints

def cpu_bf16_problem(precision: str) -> str | None:
    """Why `precision: bf16` cannot train here: no GPU, and a CPU without bfloat16 matrix units (AVX512-BF16 or AMX),
    where torch runs bf16 products emulated, hundreds of times slower than fp32. None where it can."""
    import torch

    if precision != "bf16" or torch.cuda.is_available() or torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return None
    return ("bf16 needs a GPU or a CPU with bfloat16 matrix units (AVX512-BF16 or AMX), and this machine has neither: "
            "its bf16 matrix products are emulated, hundreds of times slower than fp32; use precision: fp32 here")


def compile_problem(enabled: bool) -> str | None:
    """Why torch.compile cannot run here, or None: on CPU, inductor builds its kernels with a C++ compiler."""
    import torch

    if not enabled or torch.cuda.is_available():
        return None
    if os.environ.get("CXX") or shutil.which("g++") or shutil.which("clang++"):
        return None
    return ("torch.compile's CPU backend builds its kernels with a C++ compiler, and none is here (no g++, clang++ or "
            "$CXX); install one (e.g. apt install g++) or set train.compile: false")


def machine_problems(train: TrainConfig) -> list[Problem]:
    """The train settings this machine cannot run: `mmadapt train` refuses them before anything loads, `mmadapt
    validate` notes them (the real-size recipes are validated on machines that will not train them)."""
    found = {"precision": cpu_bf16_problem(train.precision), "compile": compile_problem(train.compile)}
    return [Problem("train", name, message) for name, message in found.items() if message]


Tracker = Literal["tensorboard", "wandb", "mlflow"]  # accelerate's tracker names train.log_with takes
TRACKER_PACKAGES: dict[str, str] = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}  # what each imports

TOP_LEVEL_KEYS = ("name", "graph", "data", "val_data", "train")
NODE_RESERVED_KEYS = ("type", "inputs", "trainable", "adapters", "from_card")


@dataclass
class TrainConfig:
    """How to train the bridge. Every field has a default, so a recipe names only what it changes."""

    lr: PositiveFloat = 1e-4  # peak learning rate of AdamW, reached after warmup
    weight_decay: NonNegativeFloat = 0.0  # AdamW decoupled decay; bridges are small, so none by default
    batch_size: PositiveInt = 8  # samples per process per micro-step
    grad_accum: PositiveInt = 1  # micro-steps per optimizer step: global batch = batch_size * processes * grad_accum
    steps: PositiveInt = 100  # optimizer steps; the run length is counted in these, not epochs
    warmup_steps: NonNegativeInt = 0  # linear warmup before the cosine decay to zero
    max_grad_norm: NonNegativeFloat = 1.0  # gradient clipping; 0 turns it off
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"  # fp32 | bf16 | fp16: accelerate's mixed precision (fp16 needs a GPU)
    seed: int = 0  # seeds data order, init of bridges and of config-built random bases
    cache_frozen_features: bool = False  # cache outputs of frozen, unaugmented encoders on disk
    cache_dir: str = ".mmadapt-cache"  # where the feature cache lives; shared between runs on purpose
    output_dir: str = "runs/{name}"  # run directory: metrics, checkpoints and the final card
    log_every: PositiveInt = 10  # steps between JSONL metric lines (every step is logged when 1)
    eval_every: NonNegativeInt = 0  # steps between validation passes; 0 = only at the end
    save_every: NonNegativeInt = 0  # steps between resumable checkpoints; 0 = only at the end
    keep_checkpoints: NonNegativeInt = 2  # older step checkpoints are deleted, the final card never is
    max_text_tokens: PositiveInt = 64  # prompt + target tokens per sample, truncated beyond this
    num_workers: NonNegativeInt = 0  # DataLoader workers; bad samples are counted exactly with any number (reports travel in the batches)
    skip_bad_samples: bool = True  # skip, count and report unreadable samples; False fails fast
    max_bad_fraction: Fraction = 0.05  # above this fraction of an epoch's samples unreadable, the run stops with exit 2 and a summary
    eval_generations: NonNegativeInt = 4  # sample generations written to the log at each evaluation
    max_new_tokens: PositiveInt = 16  # generation length used by evaluation and `generate`
    gradient_checkpointing: bool = False  # recompute frozen LLM layers in backward: less activation memory, ~1/3 more LM compute
    # torch.compile the bridges and the frozen generator's body (mmadapt.training.compile): fused kernels between the
    # matrix products; the first steps pay the compilation (minutes on CPU), so it is for long runs. Off by default.
    compile: bool = False
    # Frozen nodes to shard over the processes with FSDP2, e.g. [llm]: each process holds 1/N of their weights, for
    # generators that do not fit one device. Bridges stay whole on every process. Ignored on one process.
    shard_frozen: list[str] = field(default_factory=list)
    # accelerate's experiment trackers, beside metrics.jsonl (which stays): tensorboard (offline, into
    # OUTPUT_DIR/trackers), wandb, mlflow; each needs its package installed. Off by default.
    log_with: list[Tracker] = field(default_factory=list)


@dataclass
class NodeSpec:
    """One node of the graph as written in the recipe, before anything is built."""

    name: str
    type: str
    inputs: dict[str, str | list[str]] = field(default_factory=dict)
    trainable: bool | None = None  # None: the role decides (bridges train, encoders/generators are frozen)
    adapters: list[dict[str, Any]] = field(default_factory=list)
    params: dict[str, Any] = field(default_factory=dict)
    from_card: dict[str, str] | None = None  # {card: folder, node: its name there}: a bridge trained in another graph


@dataclass
class Recipe:
    """A parsed recipe: the raw mapping (for saving) plus typed views of its parts."""

    raw: dict[str, Any]
    source: str
    name: str
    nodes: dict[str, NodeSpec]
    data: dict[str, Any]
    val_data: dict[str, Any] | None
    train: TrainConfig


class DuplicateKey(yaml.YAMLError):
    """A mapping names one key twice; lines are counted from 1, as editors show them."""

    def __init__(self, key: Any, line: int, first_line: int) -> None:
        super().__init__(f"line {line}: key {key!r} is written twice in one mapping (first on line {first_line}); "
                         "keep one")


class RecipeLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key written twice in one mapping: PyYAML keeps the last one silently, so a second
    `lr:` further down would quietly win."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        first: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base` entries may be overridden, as YAML allows
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                seen = key in first
            except TypeError:  # an unhashable key: SafeLoader reports it itself
                continue
            if seen:
                raise DuplicateKey(key, key_node.start_mark.line + 1, first[key] + 1)
            first[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep)


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a recipe file into a mapping; a YAML syntax error or a key written twice names the file and line."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError([Problem(str(path), "", "file not found")], source=str(path))
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        problem = f"not UTF-8 text (byte {exc.start} is {exc.object[exc.start]:#04x}); save the recipe as UTF-8"
        raise RecipeError([Problem(str(path), "", problem)], source=str(path)) from None
    except OSError as exc:
        raise RecipeError([Problem(str(path), "", f"cannot be read ({exc.strerror})")], source=str(path)) from None
    try:
        loaded = yaml.load(text, Loader=RecipeLoader)
    except DuplicateKey as exc:
        raise RecipeError([Problem(str(path), "", str(exc))], source=str(path)) from None
    except yaml.YAMLError as exc:
        raise RecipeError([Problem(str(path), "", f"not valid YAML: {exc}")], source=str(path)) from None
    if not isinstance(loaded, dict):
        raise RecipeError([Problem(str(path), "", "a recipe must be a mapping with a 'graph' key")], str(path))
    loaded.setdefault("name", path.stem)
    return loaded


def apply_overrides(raw: dict[str, Any], overrides: list[str], source: str = "command line") -> dict[str, Any]:
    """Apply `a.b.c=value` overrides; values are parsed as YAML so `3e-4`, `true` and `[1,2]` work."""
    result = copy.deepcopy(raw)
    problems: list[Problem] = []
    for item in overrides:
        key, sep, value_text = item.partition("=")
        if not sep or not key:
            problems.append(Problem(source, item, "an override must look like section.key=value"))
            continue
        try:
            value = yaml.load(value_text, Loader=RecipeLoader) if value_text else ""
        except yaml.YAMLError as exc:
            reason = getattr(exc, "problem", None) or str(exc).splitlines()[0]
            problems.append(Problem(source, key, f"the value {value_text!r} is not valid YAML ({reason})"))
            continue
        parts = key.split(".")
        target = result
        for part in parts[:-1]:
            if not isinstance(target.get(part, {}), dict):
                problems.append(Problem(source, key, f"'{part}' is not a mapping, so it has no keys"))
                break
            target = target.setdefault(part, {})
        else:
            target[parts[-1]] = value
    if problems:
        raise RecipeError(problems, source=source)
    return result


RETIRED_OBJECTIVE = ("objective", "lm")  # train.objective was never read; the only value it took is still accepted


def parse_train_config(raw: Any, where: str = "train") -> tuple[TrainConfig, list[Problem]]:
    """Build a TrainConfig, collecting a Problem per unknown key or wrongly typed value."""
    problems: list[Problem] = []
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        return TrainConfig(), [Problem(where, "", "must be a mapping of training options")]
    expected = hints(TrainConfig)
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    values: dict[str, Any] = {}
    for key, value in raw.items():
        if key == RETIRED_OBJECTIVE[0] and value == RETIRED_OBJECTIVE[1]:
            continue  # what every card written before the generator contract carries; the generator decides its loss
        if key == RETIRED_OBJECTIVE[0]:
            problems.append(Problem(where, key, f"retired: the generator decides its loss (cards may still carry "
                                                f"'{RETIRED_OBJECTIVE[1]}', which is read and dropped); got {value!r}"))
            continue
        if key not in known:
            problems.append(Problem(where, str(key), f"unknown option; accepted: {', '.join(sorted(known))}"))
            continue
        converted, problem = check(expected[key], value)
        if problem is not None:
            problems.append(Problem(where, key, problem))
            continue
        values[key] = converted
    return TrainConfig(**values), problems


def parse_node(name: str, raw: Any) -> tuple[NodeSpec | None, list[Problem]]:
    """Split a node mapping into its reserved keys and its constructor arguments."""
    where = f"graph.{name}"
    if not isinstance(raw, dict):
        return None, [Problem(where, "", "a node must be a mapping with at least a 'type'")]
    problems: list[Problem] = []
    if "type" not in raw:
        problems.append(Problem(where, "type", "missing; every node needs a type"))
    inputs = raw.get("inputs") or {}
    if not isinstance(inputs, dict):
        problems.append(Problem(where, "inputs", "must map forward-argument names to upstream nodes"))
        inputs = {}
    trainable = raw.get("trainable")
    if trainable is not None and not isinstance(trainable, bool):
        problems.append(Problem(where, "trainable", f"expected true or false, got {trainable!r}"))
        trainable = None
    adapters = raw.get("adapters") or []
    if isinstance(adapters, dict):
        adapters = [adapters]
    if not isinstance(adapters, list) or not all(isinstance(a, dict) for a in adapters):
        problems.append(Problem(where, "adapters", "must be a list of mappings, each with a 'type'"))
        adapters = []
    from_card = raw.get("from_card")
    if isinstance(from_card, str):
        from_card = {"card": from_card, "node": name}
    if from_card is not None and not (isinstance(from_card, dict) and isinstance(from_card.get("card"), str)
                                      and set(from_card) <= {"card", "node"}):
        problems.append(Problem(where, "from_card", "expected a card folder, or {card: FOLDER, node: NAME_IN_THAT_CARD}"))
        from_card = None
    elif from_card is not None:
        from_card = {"card": from_card["card"], "node": str(from_card.get("node", name))}
    params = {k: v for k, v in raw.items() if k not in NODE_RESERVED_KEYS}
    spec = NodeSpec(name, str(raw.get("type", "")), dict(inputs), trainable, list(adapters), params, from_card)
    return spec, problems


def parse_recipe(raw: dict[str, Any], source: str) -> tuple[Recipe, list[Problem]]:
    """Parse the structure of a recipe; semantic checks (types, signatures, widths) live in validate.py."""
    problems: list[Problem] = []
    for key in raw:
        if key not in TOP_LEVEL_KEYS:
            problems.append(Problem(str(key), "", f"unknown top-level key; accepted: {', '.join(TOP_LEVEL_KEYS)}"))
    graph = raw.get("graph")
    nodes: dict[str, NodeSpec] = {}
    if not isinstance(graph, dict) or not graph:
        problems.append(Problem("graph", "", "missing or empty; it must map node names to nodes"))
    else:
        for name, node_raw in graph.items():
            spec, node_problems = parse_node(str(name), node_raw)
            problems.extend(node_problems)
            if spec is not None:
                nodes[str(name)] = spec
    data = raw.get("data") or {}
    if not isinstance(data, dict):
        problems.append(Problem("data", "", "must be a mapping with a 'type'"))
        data = {}
    val_data = raw.get("val_data")
    if val_data is not None and not isinstance(val_data, dict):
        problems.append(Problem("val_data", "", "must be a mapping with a 'type'"))
        val_data = None
    train, train_problems = parse_train_config(raw.get("train"))
    problems.extend(train_problems)
    name = str(raw.get("name", "run"))
    return Recipe(raw, source, name, nodes, data, val_data, train), problems
