"""Assembly: build base nodes, read their real widths, size the bridges, freeze and attach adapters."""
from __future__ import annotations

from typing import Any

import torch

from mmadapt.errors import MMAdaptError, Problem, RecipeError
from mmadapt.graph import Plan, infer_bridge_widths
from mmadapt.model import AssembledModel
from mmadapt.nodes import Bridge, Node
from mmadapt.registry import ADAPTER_TYPES, resolve
from mmadapt.spec import Recipe


def _build(name: str, cls: type[Node], params: dict[str, Any]) -> Node:
    """Construct one node; any failure becomes a message naming the node (no raw traceback)."""
    try:
        return cls(**params)
    except MMAdaptError as exc:
        raise RecipeError([Problem(f"graph.{name}", "", str(exc))], source="assembly") from None
    except Exception as exc:  # noqa: BLE001 - library errors (OSError, ValueError, ...) vary; name the node
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise RecipeError([Problem(f"graph.{name}", "", f"building {cls.__name__} failed: {first_line}")], source="assembly") from None


def assemble(recipe: Recipe, plan: Plan) -> AssembledModel:
    """Turn a validated recipe into a model whose only trainable tensors are bridges and adapters."""
    built: dict[str, Node] = {}
    for name in plan.order:
        if not issubclass(plan.classes[name], Bridge):
            built[name] = _build(name, plan.classes[name], recipe.nodes[name].params)
    known = {name: node.widths() for name, node in built.items()}
    problems = infer_bridge_widths(plan, recipe.nodes, known)
    if problems:
        raise RecipeError(problems, source="assembly")
    torch.manual_seed(recipe.train.seed)  # bridge init is part of the run's reproducibility
    for name in plan.order:
        if issubclass(plan.classes[name], Bridge):
            params = {**recipe.nodes[name].params, **plan.bridge_dims[name]}
            built[name] = _build(name, plan.classes[name], params)
    for name, node in built.items():
        spec = recipe.nodes[name]
        trainable = spec.trainable if spec.trainable is not None else isinstance(node, Bridge)
        node.requires_grad_(trainable)
        for index, adapter_raw in enumerate(spec.adapters):
            adapter_cls = resolve(str(adapter_raw["type"]), ADAPTER_TYPES)
            adapter = adapter_cls(**{k: v for k, v in adapter_raw.items() if k != "type"})
            inner = adapter.target or node.adapter_target
            if not isinstance(getattr(node, inner, None), torch.nn.Module):
                raise RecipeError([Problem(f"graph.{name}.adapters[{index}].target", inner, f"'{name}' has no inner model '{inner}'")], "assembly")
            try:
                adapter.apply(getattr(node, inner), node.adapter_modules.get(inner))
            except (ValueError, AttributeError, TypeError) as exc:
                raise RecipeError([Problem(f"graph.{name}.adapters[{index}]", "", str(exc).splitlines()[0])], "assembly") from None
    model = AssembledModel(recipe, plan, built)
    model.train()
    return model
