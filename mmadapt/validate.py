"""`mmadapt validate`: every check that needs no weights, all problems reported at once."""
from __future__ import annotations

import inspect
from typing import Any

from mmadapt.errors import MMAdaptError, Problem, RecipeError
from mmadapt.graph import Plan, analyse, data_problems, infer_bridge_widths
from mmadapt.nodes import Bridge, Encoder, WidthUnknown
from mmadapt.registry import DATA_TYPES, resolve
from mmadapt.spec import Recipe, apply_overrides, load_yaml, parse_recipe


def check_recipe(raw: dict[str, Any], source: str) -> tuple[Recipe, Plan]:
    """Validate a recipe mapping; raise RecipeError listing every problem, else return the plan."""
    recipe, problems = parse_recipe(raw, source)
    plan, graph_problems = analyse(recipe.nodes)
    problems += graph_problems
    problems += shard_problems(recipe, plan) if not graph_problems else []
    problems += alignment_problems(recipe)
    problems += data_problems(recipe.data, "data")
    if recipe.val_data is not None:
        problems += data_problems(recipe.val_data, "val_data")
    if not graph_problems:
        known, width_problems = read_config_widths(recipe, plan)
        problems += width_problems
        if not width_problems:
            problems += infer_bridge_widths(plan, recipe.nodes, known)
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


def alignment_problems(recipe: Recipe) -> list[Problem]:
    """A node with text_alignment trains toward each sample's spelled_text, so table datasets must be told to give one.

    Checked here because a missing one otherwise stops the run at its first step, after the models and the cache load.
    Dotted-path datasets are left alone: they may set the field themselves.
    """
    aligned = [name for name, node in recipe.nodes.items() if isinstance(node.params.get("text_alignment"), (int, float))
               and node.params["text_alignment"] > 0]
    if not aligned:
        return []
    parts = recipe.data.get("parts") if recipe.data.get("type") == "mixture" else [recipe.data]
    problems = []
    for part in parts or []:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in DATA_TYPES or kind == "mixture" or part.get("spelled_text"):
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


def load_recipe(path: str, overrides: list[str] | None = None) -> tuple[Recipe, Plan]:
    """Read, override and validate a recipe file."""
    raw = load_yaml(path)
    if overrides:
        raw = apply_overrides(raw, overrides)
    return check_recipe(raw, source=str(path))
