"""Graph analysis shared by `validate` and assembly: references, order, signatures and width inference."""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

from mmadapt.errors import Problem
from mmadapt.core.generator import Generator
from mmadapt.core.nodes import Bridge, Encoder, Node
from mmadapt.core.params import check, hints
from mmadapt.core.registry import ADAPTER_TYPES, DATA_TYPES, NODE_TYPES, UnknownType, resolve
from mmadapt.core.spec import NodeSpec

WIDTH_ARGS = ("in_dim", "out_dim")


@dataclass(frozen=True)
class Ref:
    """A parsed input reference: `node`, `node.key` or `data.field`."""

    source: str  # a node name, or "data"
    key: str | None  # output key of a node with dict outputs, or the data field

    @property
    def is_data(self) -> bool:
        return self.source == "data"


@dataclass
class Plan:
    """What the checks learned about a graph: classes, wiring, order and bridge widths."""

    classes: dict[str, type[Node]] = field(default_factory=dict)
    inputs: dict[str, dict[str, list[Ref]]] = field(default_factory=dict)  # node -> port -> refs
    order: list[str] = field(default_factory=list)  # topological: producers before consumers
    generator: str | None = None
    bridge_dims: dict[str, dict[str, int]] = field(default_factory=dict)  # bridge -> {in_dim, out_dim}
    notes: list[str] = field(default_factory=list)


def parse_ref(text: Any) -> Ref | None:
    if not isinstance(text, str) or not text:
        return None
    source, _, key = text.partition(".")
    return Ref(source, key or None)


def constructor_problems(cls: type, params: dict[str, Any], where: str, inferred: tuple[str, ...] = ()) -> list[Problem]:
    """Bind recipe arguments to the constructor signature: unknown and missing arguments, and values that do not fit
    their annotation (type, enum, bound), all at once. A number YAML read as text ('3e-4') is written back as the number,
    so the constructor gets what was checked."""
    signature = inspect.signature(cls.__init__)
    accepted = [n for n, p in signature.parameters.items() if n != "self" and p.kind is not p.VAR_KEYWORD]
    takes_any = any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values())
    expected = hints(cls.__init__)
    problems = []
    for key, value in params.items():
        if key not in accepted and not takes_any:
            problems.append(Problem(where, key, f"{cls.__name__} has no argument '{key}'; accepted: {', '.join(accepted)}"))
            continue
        converted, problem = check(expected.get(key, Any), value)
        if problem is not None:
            problems.append(Problem(where, key, problem))
        elif isinstance(value, str) and not isinstance(converted, str):
            params[key] = converted
    for name, parameter in signature.parameters.items():
        if name == "self" or parameter.kind in (parameter.VAR_KEYWORD, parameter.VAR_POSITIONAL):
            continue
        if parameter.default is parameter.empty and name not in params and name not in inferred:
            problems.append(Problem(where, name, f"required by {cls.__name__} and not given"))
    return problems


def forward_ports(cls: type[Node]) -> list[str]:
    signature = inspect.signature(cls.forward)
    return [n for n, p in signature.parameters.items() if n != "self" and p.kind is not p.VAR_KEYWORD]


def analyse(nodes: dict[str, NodeSpec], data_fields: frozenset[str] | set[str] | None = None) -> tuple[Plan, list[Problem]]:
    """Resolve types, check arguments and wiring, and order the graph. No weights are touched."""
    plan = Plan()
    problems: list[Problem] = []
    for name, spec in nodes.items():
        where = f"graph.{name}"
        try:
            cls = resolve(spec.type, NODE_TYPES)
        except UnknownType as exc:
            problems.append(Problem(where, "type", str(exc)))
            continue
        if not (isinstance(cls, type) and issubclass(cls, Node)):
            problems.append(Problem(where, "type", f"'{spec.type}' is not a mmadapt Node (Encoder, Bridge or Generator)"))
            continue
        plan.classes[name] = cls
        inferred = WIDTH_ARGS if issubclass(cls, Bridge) else ()
        problems += constructor_problems(cls, spec.params, where, inferred)
        problems += _adapter_problems(spec, where)
        if spec.adapters and issubclass(cls, Bridge):
            problems.append(Problem(where, "adapters", "adapters go on frozen encoders or generators; a bridge trains whole"))
        ports = forward_ports(cls)
        wiring: dict[str, list[Ref]] = {}
        merged = {**cls.default_inputs, **spec.inputs}
        for port, value in merged.items():
            if port not in ports:
                problems.append(Problem(where, f"inputs.{port}", f"{cls.__name__}.forward has no argument '{port}'; accepted: {', '.join(ports)}"))
                continue
            values = value if isinstance(value, list) else [value]
            refs: list[Ref] = []
            for item in values:
                ref = parse_ref(item)
                if ref is None:
                    problems.append(Problem(where, f"inputs.{port}", f"expected a node name, node.output or data.field, got {item!r}"))
                elif not ref.is_data and ref.source not in nodes:
                    problems.append(Problem(where, f"inputs.{port}", f"unknown node '{ref.source}'; nodes: {', '.join(nodes)}"))
                elif ref.source == name:
                    problems.append(Problem(where, f"inputs.{port}", "a node cannot feed itself"))
                elif ref.is_data and (wrong := data_ref_problem(cls, port, ref, port in spec.inputs, data_fields)):
                    problems.append(Problem(where, f"inputs.{port}", wrong))
                else:
                    refs.append(ref)
            wiring[port] = refs
        plan.inputs[name] = wiring
    generators = [n for n, c in plan.classes.items() if issubclass(c, Generator)]
    if len(generators) != 1 and len(plan.classes) == len(nodes):
        problems.append(Problem("graph", "", f"needs exactly one generator (such as causal_lm or diffusion); found {len(generators)}: {', '.join(generators) or 'none'}"))
    plan.generator = generators[0] if generators else None
    plan.order, cycle = _topological_order(plan.inputs)
    if cycle:
        problems.append(Problem("graph", "", f"the inputs form a cycle through: {', '.join(cycle)}"))
    return plan, problems


def data_ref_problem(cls: type[Node], port: str, ref: Ref, explicit: bool, fields: frozenset[str] | set[str] | None,
                     section: str = "data") -> str | None:
    """What is wrong with a `data.FIELD` input. Only encoders read sample fields (the generator makes its data from each
    sample's text, by port; nothing fills a bridge's), and the field must be one the data section's samples carry,
    when its class says which (`fields`; a mixture: any part's, since an encoder skips the rows of other parts)."""
    if issubclass(cls, Generator):
        return None
    if not issubclass(cls, Encoder):
        return f"data.{ref.key}: only encoders read data fields; nothing fills a {cls.role}'s"
    if fields is None or ref.key in fields:
        return None
    default = "" if explicit else f" ({cls.__name__} reads data.{ref.key} unless inputs.{port} names another field)"
    return f"{section} gives no field '{ref.key}'{default}; its samples carry: {', '.join(sorted(fields))}"


def _adapter_problems(spec: NodeSpec, where: str) -> list[Problem]:
    problems = []
    for index, adapter in enumerate(spec.adapters):
        at = f"{where}.adapters[{index}]"
        args = {k: v for k, v in adapter.items() if k != "type"}
        try:
            cls = resolve(str(adapter.get("type", "")), ADAPTER_TYPES)
        except UnknownType as exc:
            problems.append(Problem(at, "type", str(exc)))
            continue
        problems += constructor_problems(cls, args, at)
        adapter.update(args)  # the values as checked
    return problems


def data_problems(data: dict[str, Any], where: str) -> list[Problem]:
    """Check a `data:` section against its dataset constructor."""
    if not data:
        return [Problem(where, "", "missing; give at least a 'type' (known: " + ", ".join(DATA_TYPES) + ")")]
    try:
        cls = resolve(str(data.get("type", "")), DATA_TYPES)
    except UnknownType as exc:
        return [Problem(where, "type", str(exc))]
    args = {k: v for k, v in data.items() if k != "type"}
    problems = constructor_problems(cls, args, where)
    data.update(args)  # the values as checked
    for name in getattr(cls, "section_lists", ()):  # a mixture's parts
        sections = args.get(name)
        for index, section in enumerate(sections if isinstance(sections, list) else []):
            problems += data_problems(section, f"{where}.{name}[{index}]") if isinstance(section, dict) else []
    return problems


def _topological_order(inputs: dict[str, dict[str, list[Ref]]]) -> tuple[list[str], list[str]]:
    """Kahn's algorithm over node references; returns (order, nodes left in a cycle)."""
    parents = {n: {r.source for refs in ports.values() for r in refs if not r.is_data and r.source in inputs} for n, ports in inputs.items()}
    order: list[str] = []
    ready = [n for n in inputs if not parents[n]]
    while ready:
        node = ready.pop(0)
        order.append(node)
        for other in inputs:
            if node in parents[other]:
                parents[other].discard(node)
                if not parents[other] and other not in order and other not in ready:
                    ready.append(other)
    cycle = [n for n in inputs if n not in order]
    while True:  # drop nodes that only read from the cycle: the message names the cycle itself
        feeding = {p for n in cycle for p in parents[n]}
        inner = [n for n in cycle if n in feeding]
        if len(inner) == len(cycle):
            return order, cycle
        cycle = inner


def infer_bridge_widths(
    plan: Plan, nodes: dict[str, NodeSpec], known: dict[str, dict[str, int]]
) -> list[Problem]:
    """Fill `plan.bridge_dims` from neighbours' widths; an explicit width that contradicts one is a problem.

    `known` maps encoders to {'output': D} and generators to {port: D}; a missing entry means the base
    model's config could not be read, and the widths it would decide are left to load time.
    """
    problems: list[Problem] = []
    outputs: dict[str, int | None] = {n: known.get(n, {}).get("output") for n in plan.order}
    for name in plan.order:
        cls = plan.classes[name]
        if not issubclass(cls, Bridge):
            continue
        where = f"graph.{name}"
        explicit = {k: nodes[name].params[k] for k in WIDTH_ARGS if k in nodes[name].params}
        dims: dict[str, int] = {}
        takes = inspect.signature(cls.__init__).parameters
        if "in_dim" in takes:
            refs = plan.inputs[name].get(cls.width_input or "", [])
            producer = refs[0].source if len(refs) == 1 and not refs[0].is_data else None
            found = outputs.get(producer) if producer else None
            dims.update(_settle(where, "in_dim", explicit.get("in_dim"), found, f"the output of '{producer}'", problems))
            if "in_dim" not in dims and producer is None and refs and takes["in_dim"].default is takes["in_dim"].empty:
                problems.append(Problem(where, "in_dim", f"cannot be inferred: inputs.{cls.width_input} names {len(refs)} "
                                                         "sources, not one node; give it explicitly"))
        if "out_dim" in takes:
            required = _required_by_consumers(plan, nodes, name, known)
            found, who = required if required else (None, "")
            dims.update(_settle(where, "out_dim", explicit.get("out_dim"), found, who, problems))
        if "out_dim" not in dims and "out_dim" in takes and takes["out_dim"].default is takes["out_dim"].empty:
            if all(_consumer_width_readable(plan, name, known, c) for c in _consumers(plan, name)):
                problems.append(Problem(where, "out_dim", "cannot be inferred from any consumer; give it explicitly"))
        plan.bridge_dims[name] = dims
        outputs[name] = dims.get("out_dim")
    return problems


def _settle(where: str, arg: str, explicit: Any, found: int | None, who: str, problems: list[Problem]) -> dict[str, int]:
    if explicit is not None and found is not None and explicit != found:
        problems.append(Problem(where, arg, f"given as {explicit} but {who} has width {found}"))
        return {arg: found}
    value = explicit if explicit is not None else found
    return {arg: value} if value is not None else {}


def _consumers(plan: Plan, producer: str) -> list[tuple[str, str]]:
    return [(n, port) for n, ports in plan.inputs.items() for port, refs in ports.items() if any(r.source == producer for r in refs)]


def _consumer_width_readable(plan: Plan, producer: str, known: dict[str, dict[str, int]], consumer: tuple[str, str]) -> bool:
    name, _ = consumer
    return issubclass(plan.classes[name], Bridge) or name in known


def _required_by_consumers(
    plan: Plan, nodes: dict[str, NodeSpec], producer: str, known: dict[str, dict[str, int]]
) -> tuple[int, str] | None:
    """The width a producer's consumers expect: a generator port's width, or a bridge's explicit in_dim."""
    for consumer, port in _consumers(plan, producer):
        cls = plan.classes[consumer]
        if issubclass(cls, Bridge):
            width = nodes[consumer].params.get("in_dim") if port == cls.width_input else None
        else:
            width = known.get(consumer, {}).get(port)
        if width is not None:
            return width, f"'{consumer}' input '{port}'"
    return None

