"""`mmadapt validate`: every check that needs no weights, all problems reported at once."""
from __future__ import annotations

import inspect
from typing import Any

from mmadapt.errors import MMAdaptError, Problem, RecipeError
from mmadapt.core.graph import Plan, analyse, data_problems, data_ref_problem, infer_bridge_widths
from mmadapt.core.nodes import Bridge, Encoder, Node, WidthUnknown
from mmadapt.core.registry import ADAPTER_TYPES, DATA_TYPES, UnknownType, resolve, sub_sections
from mmadapt.core.semantics import Finding, NodeContext, adapter_findings, place_finding, section_fields, section_findings, source_finding
from mmadapt.core.spec import machine_problems, Recipe, apply_overrides, load_yaml, parse_recipe


def check_recipe(raw: dict[str, Any], source: str, for_training: bool = True) -> tuple[Recipe, Plan]:
    """Validate a recipe mapping; raise RecipeError listing every problem, else return the plan.

    `for_training=False` (a card's recipe, rebuilt to generate) leaves out what only training needs: the data's files
    and fields, and that something trains.
    """
    recipe, problems = parse_recipe(raw, source)
    plan, graph_problems = analyse(recipe.nodes, section_fields(recipe.data) if for_training else None)
    problems += graph_problems
    problems += shard_problems(recipe, plan) if not graph_problems else []
    problems += tracker_problems(recipe)
    plan.notes += [f"{problem}; train refuses it on this machine" for problem in machine_problems(recipe.train)]  # notes, not problems
    problems += alignment_problems(recipe)
    problems += data_problems(recipe.data, "data")
    if recipe.val_data is not None:
        problems += data_problems(recipe.val_data, "val_data")
    if for_training:
        for where, section in (("data", recipe.data), ("val_data", recipe.val_data)):
            problems += settle(where, section_findings(section), plan) if section else []
    if not graph_problems:
        known, width_problems = read_config_widths(recipe, plan)
        problems += width_problems
        if not width_problems:
            problems += infer_bridge_widths(plan, recipe.nodes, known)
        unread = {n for n, c in plan.classes.items() if n not in known and not issubclass(c, Bridge)}
        failed = {p.where.removeprefix("graph.") for p in width_problems}
        for name in plan.order:
            problems += node_problems(name, recipe, plan, unread, failed)
        problems += (nothing_trains(recipe, plan) + val_field_problems(recipe, plan)) if for_training else []
    if problems:
        raise RecipeError(problems, source=source)
    return recipe, plan


def shard_problems(recipe: Recipe, plan: Plan) -> list[Problem]:
    """train.shard_frozen names frozen base nodes of this graph, without adapters (their tensors train)."""
    problems: list[Problem] = []
    for name in recipe.train.shard_frozen:
        node = recipe.nodes.get(name)
        if node is None:
            problems.append(Problem("train", "shard_frozen", f"no node '{name}' in the graph; nodes: {', '.join(recipe.nodes)}"))
        elif issubclass(plan.classes[name], Bridge) or node.trainable:
            problems.append(Problem("train", "shard_frozen", f"node '{name}' trains; only frozen nodes are sharded"))
        elif node.adapters:
            problems.append(Problem("train", "shard_frozen", f"node '{name}' carries adapters, which train; only frozen "
                                                             "nodes without adapters are sharded"))
        elif issubclass(plan.classes[name], Encoder) and recipe.train.cache_frozen_features:
            problems.append(Problem("train", "shard_frozen", f"encoder '{name}' would feed the feature cache, which each "
                                                             "process fills alone; set cache_frozen_features: false"))
    return problems


def tracker_problems(recipe: Recipe) -> list[Problem]:
    """Each tracker in train.log_with has its package on this machine (accelerate would fail at the first step)."""
    import importlib.util

    from mmadapt.core.spec import TRACKER_PACKAGES

    return [Problem("train", "log_with", f"'{name}' needs the {TRACKER_PACKAGES[name]} package, which is not installed "
                                         f"here (pip install {TRACKER_PACKAGES[name]})")
            for name in recipe.train.log_with if importlib.util.find_spec(TRACKER_PACKAGES[name]) is None]


def alignment_problems(recipe: Recipe) -> list[Problem]:
    """A node with text_alignment trains toward each sample's spelled_text, so table datasets must be told to give one.

    Checked here because a missing one otherwise stops the run at its first step, after the models and the cache load.
    Dotted-path datasets are left alone: they may set the field themselves.
    """
    aligned = [name for name, node in recipe.nodes.items() if isinstance(node.params.get("text_alignment"), (int, float))
               and node.params["text_alignment"] > 0]
    if not aligned:
        return []
    parts = sub_sections(recipe.data)
    problems = []
    for part in parts if parts is not None else [recipe.data]:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in DATA_TYPES or sub_sections(part) is not None or part.get("spelled_text"):
            continue  # unknown types are reported by data_problems
        takes_it = "spelled_text" in inspect.signature(resolve(kind, DATA_TYPES)).parameters
        remedy = "unless its spelled_text is set (e.g. spelled_text: \"The picture shows a {word}.\")" if takes_it else "(it has no spelled_text option)"
        problems.append(Problem("data", "spelled_text", f"graph.{aligned[0]}.text_alignment is set, so every training sample "
                                                        f"needs a spelled_text; {kind} gives none {remedy}"))
    return problems


def read_config_widths(recipe: Recipe, plan: Plan) -> tuple[dict[str, dict[str, int]], list[Problem]]:
    """Ask each base node for the widths its config states, noting the ones that must wait for load."""
    known: dict[str, dict[str, int]] = {}
    problems: list[Problem] = []
    for name in plan.order:
        cls = plan.classes[name]
        if issubclass(cls, Bridge):
            continue
        try:
            known[name] = cls.config_widths(recipe.nodes[name].params)
        except WidthUnknown as exc:
            plan.notes.append(f"graph.{name}: config not readable here ({exc}); its widths will be checked at load")
        except MMAdaptError as exc:
            problems.append(Problem(f"graph.{name}", "", str(exc)))
    return known, problems


def load_recipe(path: str, overrides: list[str] | None = None, for_training: bool = True) -> tuple[Recipe, Plan]:
    """Read, override and validate a recipe file (`for_training`: as in check_recipe)."""
    raw = load_yaml(path)
    if overrides:
        raw = apply_overrides(raw, overrides)
    return check_recipe(raw, source=str(path), for_training=for_training)


# --- what the recipe means, checked before anything loads ---
def settle(where: str, findings: list[Finding], plan: Plan) -> list[Problem]:
    """Findings as problems at `where`; the notes (what cannot be checked on this machine) go to the plan's notes."""
    problems = []
    for finding in findings:
        if finding.note:
            plan.notes.append(f"{where}.{finding.field}: {finding.message}" if finding.field else f"{where}: {finding.message}")
        else:
            problems.append(Problem(where, finding.field, finding.message))
    return problems


def node_problems(name: str, recipe: Recipe, plan: Plan, unread: set[str], failed: set[str]) -> list[Problem]:
    """One node's checkpoints and paths, its class's own cross-field checks, its from_card and its adapters' targets.

    Reading the configs for the widths already said what it could: for a node in `failed` (its config reading was a
    problem, e.g. an unknown zoo member) its checkpoints are not reported again, nor noted for one in `unread` (not
    readable here, which the width note says).
    """
    cls, spec, where = plan.classes[name], recipe.nodes[name], f"graph.{name}"
    feeders = tuple(dict.fromkeys(r.source for refs in plan.inputs[name].values() for r in refs if not r.is_data))
    findings = [source_finding(spec.params.get(param), param, hub_file) for param, hub_file in cls.source_params.items()]
    findings = [f for f in findings if f is not None and name not in failed and not (f.note and name in unread)]
    fed = tuple(port for port, refs in plan.inputs[name].items() if any(not r.is_data for r in refs))
    findings += cls.param_problems(spec.params, NodeContext(name, tuple(recipe.nodes), feeders, fed))
    problems = settle(where, findings, plan)
    if spec.from_card is not None:
        problems += card_problems(where, spec.from_card, plan)
    if spec.adapters and not issubclass(cls, Bridge):
        problems += adapter_problems(name, cls, spec.params, spec.adapters)
    return problems


def card_problems(where: str, source: dict[str, str], plan: Plan) -> list[Problem]:
    """`from_card` names a card folder that holds a trained node of that name (its card.json says; no weights read)."""
    from mmadapt.core.card import read_card

    folder, node = source["card"], source["node"]
    found = place_finding(folder, "from_card", "folder")
    if found is not None:
        return settle(where, [found], plan)
    try:
        _, meta = read_card(folder)
    except MMAdaptError as exc:
        return [Problem(where, "from_card", str(exc))]
    tensors = meta.get("trainable_tensors")
    held = sorted({key.split(".")[0] for key in tensors}) if isinstance(tensors, dict) else [node]
    if node not in held:
        return [Problem(where, "from_card", f"{folder} has no trained node '{node}'; it holds: {', '.join(held) or 'none'}")]
    return []


def adapter_problems(name: str, cls: type[Node], params: dict[str, Any], adapters: list[dict[str, Any]]) -> list[Problem]:
    """Each adapter's inner model exists and its target_modules match modules of it, on a meta-device build of the base."""
    try:
        bases = cls.adapter_bases(params)
    except Exception:  # noqa: BLE001 - a config some library cannot build on the meta device: left to load time, as unreadable ones
        bases = None
    if bases is None:
        return []
    problems = []
    for index, raw in enumerate(adapters):
        at = f"graph.{name}.adapters[{index}]"
        try:
            adapter = resolve(str(raw.get("type", "")), ADAPTER_TYPES)(**{k: v for k, v in raw.items() if k != "type"})
            inner = adapter.target or cls.adapter_target
            config = adapter.peft_config(cls.adapter_modules.get(inner)) if inner in bases else None
        except (UnknownType, TypeError, ValueError, MMAdaptError):
            continue  # its type and arguments are reported by the constructor checks
        if config is None:
            problems.append(Problem(at, "target", f"'{name}' has no inner model '{inner}' to adapt; it has: {', '.join(bases)}"))
            continue
        label = f"{name}.{inner} ({type(bases[inner]).__name__})"
        if (unexportable := cls.adapter_export_problem(inner, config)) is not None:
            problems.append(Problem(at, "type", unexportable))
        problems += [Problem(at, f.field, f.message) for f in adapter_findings(config, bases[inner], label)]
    return problems


def nothing_trains(recipe: Recipe, plan: Plan) -> list[Problem]:
    """Something must train: a bridge (unless trainable: false), an adapter, or a node with trainable: true.

    The diffusion generator's placeholder row is no exception: it is a slot that a token bridge fills, never trained itself.
    """
    if len(plan.classes) != len(recipe.nodes):
        return []  # an unknown type is reported on its own
    for name, spec in recipe.nodes.items():
        if spec.adapters or (spec.trainable if spec.trainable is not None else issubclass(plan.classes[name], Bridge)):
            return []
    bridges = [name for name, cls in plan.classes.items() if issubclass(cls, Bridge)]
    frozen = f"its bridges ({', '.join(bridges)}) have trainable: false" if bridges else "it has no bridge"
    return [Problem("graph", "", f"nothing trains: {frozen}, no node has adapters, and none has trainable: true; a run "
                                 "needs a trainable bridge, an adapter (e.g. {type: lora}) or a node with trainable: true")]


def val_field_problems(recipe: Recipe, plan: Plan) -> list[Problem]:
    """The encoders' data fields in val_data too (the `data:` section's are checked with the graph)."""
    fields = section_fields(recipe.val_data) if recipe.val_data else None
    if fields is None:
        return []
    problems = []
    for name, ports in plan.inputs.items():
        cls = plan.classes[name]
        for port, refs in ports.items() if issubclass(cls, Encoder) else ():
            wrong = [data_ref_problem(cls, port, r, port in recipe.nodes[name].inputs, fields, "val_data") for r in refs if r.is_data]
            problems += [Problem(f"graph.{name}", f"inputs.{port}", w) for w in wrong if w]
    return problems
