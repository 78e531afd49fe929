"""Assembly: build base nodes, read their real widths, size the bridges, freeze and attach adapters."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from mmadapt.errors import MMAdaptError, Problem, RecipeError
from mmadapt.core.graph import Plan, infer_bridge_widths
from mmadapt.core.model import AssembledModel
from mmadapt.core.nodes import Bridge, Node
from mmadapt.core.registry import ADAPTER_TYPES, resolve
from mmadapt.core.spec import Recipe


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
        for part in node.trained_parts():
            part.requires_grad_(True)
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
    for name, node in built.items():
        if not isinstance(node, Bridge):
            node.weights_fingerprint()  # now, on the plain modules, before any wrapper (DDP, FSDP) reshapes them
    for name, spec in recipe.nodes.items():
        if spec.from_card is not None:
            load_node_from_card(name, built, plan, spec.from_card)
    model = AssembledModel(recipe, plan, built)
    model.train()
    return model


def load_node_from_card(name: str, built: dict[str, Node], plan: Plan, source: dict[str, str]) -> None:
    """Copy one bridge's tensors from a card trained in another graph, after checking that it was trained on the same
    upstream encoder and at the same widths; its tensors then train on (default) or stay frozen (`trainable: false`)."""
    from mmadapt.core.card import WEIGHTS_FILE, read_card, same_base
    from mmadapt.core.checkpoint_io import read_safetensors

    where = f"graph.{name}.from_card"
    card, their_name = Path(source["card"]), source["node"]
    try:
        _, meta = read_card(card)
        stored = read_safetensors(card / WEIGHTS_FILE)
    except MMAdaptError as exc:
        raise RecipeError([Problem(where, "", str(exc))], "assembly") from None
    node = built[name]
    problems = []
    if not any(k.startswith(f"{their_name}.") for k in stored):
        problems.append(f"{card} has no trained node '{their_name}'; it holds: {', '.join(sorted({k.split('.')[0] for k in stored}))}")
    elif meta["widths"].get(their_name) != node.widths():
        problems.append(f"'{their_name}' in {card} has widths {meta['widths'][their_name]}, this graph's '{name}' {node.widths()}")
    for parent in [r.source for refs in plan.inputs[name].values() for r in refs if not r.is_data]:
        here = built[parent].describe()
        weights = built[parent].weights_fingerprint()
        if here and not any(same_base(base, here, weights) for base in meta["bases"].values()):
            bases = ", ".join(f"{b.get('source')} (weights {b.get('weights', 'not recorded')})" for b in meta["bases"].values())
            problems.append(f"{card} was not trained on this graph's '{parent}' ({here.get('source')}, weights {weights}); "
                            f"its bases: {bases}")
    prefix = f"{their_name}."
    tensors = {k[len(prefix):]: v for k, v in stored.items() if k.startswith(prefix)}
    own = dict(node.named_parameters())
    if not problems and set(tensors) != set(own):
        problems.append(f"'{their_name}' in {card} holds {sorted(set(tensors) ^ set(own))[:6]} that this '{name}' does not match")
    if problems:
        raise RecipeError([Problem(where, "", p) for p in problems], "assembly")
    with torch.no_grad():
        for key, param in own.items():
            param.copy_(tensors[key].to(param.dtype))
