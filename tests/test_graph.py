"""mmadapt.core.graph on its own: references, wiring checks, order, and bridge widths inferred from the real widths
of the neighbours (no CLI, no recipe file)."""
from __future__ import annotations

import copy
from typing import Any

import pytest
import torch

from conftest import TINY_LMS, TINY_VISION
from mmadapt.core.graph import Ref, analyse, constructor_problems, infer_bridge_widths, parse_ref
from mmadapt.core.spec import NodeSpec

VISION = {"type": "hf_vision", "config": dict(TINY_VISION)}  # output width 32
LLM = {"type": "causal_lm", "config": dict(TINY_LMS["llama"]), "tokenizer": "bytes"}  # prefix_embeds width 48
RESERVED = ("type", "inputs", "trainable", "adapters", "from_card")


def specs(graph: dict[str, dict[str, Any]]) -> dict[str, NodeSpec]:
    """NodeSpecs as the recipe parser makes them: reserved keys apart, the rest constructor params."""
    out = {}
    for name, raw in copy.deepcopy(graph).items():
        out[name] = NodeSpec(name=name, type=raw.pop("type"), inputs=raw.pop("inputs", {}), trainable=raw.pop("trainable", None),
                             adapters=raw.pop("adapters", []), params=raw)
    return out


def graph_of(*middle: tuple[str, dict[str, Any]], prefix: Any = "proj") -> dict[str, dict[str, Any]]:
    graph: dict[str, dict[str, Any]] = {"vision": dict(VISION)}
    graph.update(dict(middle))
    graph["llm"] = {**LLM, "inputs": {"prefix_embeds": prefix}}
    return graph


def messages(problems: list[Any]) -> list[str]:
    return [str(p) for p in problems]


@pytest.fixture(scope="module")
def real_widths() -> dict[str, dict[str, int]]:
    """The widths of the built frozen nodes, as assembly reads them (not the numbers in the test's configs)."""
    from mmadapt.generators.causal_lm import CausalLM
    from mmadapt.encoders.hf_vision import HFVisionTower

    vision = HFVisionTower(config=dict(TINY_VISION))
    llm = CausalLM(config=dict(TINY_LMS["llama"]), tokenizer="bytes")
    assert vision.model.config.hidden_size == 32 and llm.model.get_input_embeddings().embedding_dim == 48
    return {"vision": vision.widths(), "llm": llm.widths()}


# --- references ---
@pytest.mark.parametrize(("text", "expected"), [
    ("vision", Ref("vision", None)), ("llm.prefix", Ref("llm", "prefix")), ("data.image", Ref("data", "image")),
    ("a.b.c", Ref("a", "b.c")), ("", None), (None, None), (3, None), (["vision"], None),
])
def test_parse_ref(text: Any, expected: Ref | None) -> None:
    assert parse_ref(text) == expected
    if expected is not None:
        assert expected.is_data == (text.split(".")[0] == "data")


# --- analyse: a good graph ---
def test_a_good_graph_resolves_classes_wires_default_inputs_and_orders_producers_first() -> None:
    graph = graph_of(("proj", {"type": "mlp_projector", "inputs": {"x": "vision"}}))
    graph = {"llm": graph["llm"], "proj": graph["proj"], "vision": graph["vision"]}  # written consumers first
    plan, problems = analyse(specs(graph))
    assert problems == []
    assert plan.order == ["vision", "proj", "llm"]
    assert plan.generator == "llm"
    assert {n: c.__name__ for n, c in plan.classes.items()} == {"llm": "CausalLM", "proj": "MLPProjector", "vision": "HFVisionTower"}
    assert plan.inputs["vision"] == {"pixel_values": [Ref("data", "image")]}  # the encoder's default input
    assert plan.inputs["proj"] == {"x": [Ref("vision", None)]}
    assert plan.inputs["llm"]["prefix_embeds"] == [Ref("proj", None)]
    assert plan.inputs["llm"]["labels"] == [Ref("data", "labels")]


def test_a_list_input_keeps_every_reference_in_order() -> None:
    graph = graph_of(("soft", {"type": "soft_prompt", "num_tokens": 2}), ("proj", {"type": "linear_projector", "inputs": {"x": "vision"}}),
                     prefix=["soft", "proj"])
    plan, problems = analyse(specs(graph))
    assert problems == []
    assert plan.inputs["llm"]["prefix_embeds"] == [Ref("soft", None), Ref("proj", None)]
    assert plan.order.index("soft") < plan.order.index("llm") and plan.order.index("proj") < plan.order.index("llm")


# --- analyse: refusals, each naming the node ---
def test_an_unknown_type_is_refused_naming_the_node_and_a_close_name() -> None:
    graph = graph_of(("proj", {"type": "mlp_projecter", "inputs": {"x": "vision"}}))
    plan, problems = analyse(specs(graph))
    assert len(problems) == 1
    assert (problems[0].where, problems[0].field) == ("graph.proj", "type")
    assert "unknown type 'mlp_projecter' (did you mean 'mlp_projector'?)" in problems[0].message
    assert "proj" not in plan.classes


def test_a_class_that_is_not_a_node_is_refused_naming_it() -> None:
    graph = graph_of(("proj", {"type": "collections.OrderedDict", "inputs": {"x": "vision"}}))
    assert messages(analyse(specs(graph))[1]) == [
        "graph.proj.type: 'collections.OrderedDict' is not a mmadapt Node (Encoder, Bridge or Generator)"]


def test_a_dangling_input_is_refused_naming_node_port_and_the_missing_name() -> None:
    graph = graph_of(("proj", {"type": "linear_projector", "inputs": {"x": "visoin"}}))
    assert messages(analyse(specs(graph))[1]) == [
        "graph.proj.inputs.x: unknown node 'visoin'; nodes: vision, proj, llm"]


def test_a_malformed_reference_and_an_unknown_port_are_refused() -> None:
    graph = graph_of(("proj", {"type": "linear_projector", "inputs": {"x": ["vision", 7], "images": "vision"}}))
    found = messages(analyse(specs(graph))[1])
    assert "graph.proj.inputs.x: expected a node name, node.output or data.field, got 7" in found
    assert "graph.proj.inputs.images: LinearProjector.forward has no argument 'images'; accepted: x" in found
    assert len(found) == 2


def cycle_graph() -> dict[str, NodeSpec]:
    return specs(graph_of(("a", {"type": "linear_projector", "inputs": {"x": "b"}}),
                          ("b", {"type": "linear_projector", "inputs": {"x": "a"}}), prefix="b"))


def test_a_cycle_is_refused_naming_the_nodes_on_it() -> None:
    plan, problems = analyse(cycle_graph())
    assert len(problems) == 1 and (problems[0].where, problems[0].field) == ("graph", "")
    assert problems[0].message.startswith("the inputs form a cycle through: a, b")
    assert "vision" not in problems[0].message
    assert plan.order == ["vision"]  # nothing on or after the cycle can be ordered


def test_a_cycle_message_names_only_the_nodes_on_it() -> None:
    assert messages(analyse(cycle_graph())[1]) == ["graph: the inputs form a cycle through: a, b"]


def test_a_node_feeding_itself_is_refused() -> None:
    graph = graph_of(("proj", {"type": "linear_projector", "inputs": {"x": "proj"}}))
    assert messages(analyse(specs(graph))[1]) == ["graph.proj.inputs.x: a node cannot feed itself"]


@pytest.mark.parametrize("count", [0, 2])
def test_exactly_one_generator(count: int) -> None:
    graph = graph_of(("proj", {"type": "linear_projector", "inputs": {"x": "vision"}}))
    if count == 0:
        del graph["llm"]
    else:
        graph["llm2"] = copy.deepcopy(graph["llm"])
    expected = "none" if count == 0 else "llm, llm2"
    assert messages(analyse(specs(graph))[1]) == [
        f"graph: needs exactly one generator (such as causal_lm or diffusion); found {count}: {expected}"]


def test_only_encoders_read_data_fields_and_only_fields_the_data_gives() -> None:
    graph = graph_of(("proj", {"type": "linear_projector", "inputs": {"x": "data.image"}}))
    assert messages(analyse(specs(graph))[1]) == [
        "graph.proj.inputs.x: data.image: only encoders read data fields; nothing fills a bridge's"]
    graph = graph_of(("proj", {"type": "linear_projector", "inputs": {"x": "vision"}}))
    fields = frozenset({"points", "prompt", "target"})
    assert messages(analyse(specs(graph), fields)[1]) == [
        "graph.vision.inputs.pixel_values: data gives no field 'image' (HFVisionTower reads data.image unless "
        "inputs.pixel_values names another field); its samples carry: points, prompt, target"]
    graph["vision"]["inputs"] = {"pixel_values": "data.photo"}
    assert messages(analyse(specs(graph), fields)[1]) == [
        "graph.vision.inputs.pixel_values: data gives no field 'photo'; its samples carry: points, prompt, target"]
    assert analyse(specs(graph), fields | {"photo"})[1] == []


def test_adapters_on_a_bridge_and_bad_adapter_types_are_refused() -> None:
    graph = graph_of(("proj", {"type": "linear_projector", "inputs": {"x": "vision"}, "adapters": [{"type": "lora", "r": 4}]}))
    graph["llm"]["adapters"] = [{"type": "lorra", "r": 4}]
    found = messages(analyse(specs(graph))[1])
    assert "graph.proj.adapters: adapters go on frozen encoders or generators; a bridge trains whole" in found
    assert any(m.startswith("graph.llm.adapters[0].type: unknown type 'lorra' (did you mean 'lora'?)") for m in found)
    assert len(found) == 2


def test_every_problem_of_a_graph_is_reported_at_once() -> None:
    graph = graph_of(("proj", {"type": "linear_projector", "inputs": {"x": "nowhere"}, "bogus": 1}))
    graph["vision"]["type"] = "hf_visoin"
    found = messages(analyse(specs(graph))[1])
    assert [m.split(":")[0] for m in found] == ["graph.vision.type", "graph.proj.bogus", "graph.proj.inputs.x"]


# --- constructor arguments ---
def test_constructor_problems_unknown_missing_inferred_and_text_numbers() -> None:
    from bridges.projector import MLPProjector
    from bridges.qformer import QFormer

    found = messages(constructor_problems(MLPProjector, {"hidden_dim": 40, "num_layer": 2}, "graph.p"))
    assert found == ["graph.p.num_layer: MLPProjector has no argument 'num_layer'; accepted: in_dim, out_dim, hidden_dim, num_layers, init_from",
                     "graph.p.in_dim: required by MLPProjector and not given", "graph.p.out_dim: required by MLPProjector and not given"]
    assert constructor_problems(MLPProjector, {"hidden_dim": 40}, "graph.p", ("in_dim", "out_dim")) == []  # widths: inferred
    assert messages(constructor_problems(MLPProjector, {"hidden_dim": 0}, "graph.p", ("in_dim", "out_dim"))) == [
        "graph.p.hidden_dim: must be >= 1, got 0"]
    assert messages(constructor_problems(MLPProjector, {"hidden_dim": "40"}, "graph.p", ("in_dim", "out_dim"))) == [
        "graph.p.hidden_dim: expected int, got '40'"]
    params: dict[str, Any] = {"num_queries": 2, "dropout": "1e-1"}  # YAML 1.1 reads 1e-1 as text: written back as the float
    assert constructor_problems(QFormer, params, "graph.q", ("in_dim", "out_dim")) == []
    assert params == {"num_queries": 2, "dropout": 0.1} and isinstance(params["dropout"], float)


# --- width inference, from the built neighbours' real widths ---
def test_widths_are_the_neighbours_real_widths_and_the_bridge_then_fits_them(real_widths: dict[str, dict[str, int]]) -> None:
    nodes = specs(graph_of(("proj", {"type": "mlp_projector", "inputs": {"x": "vision"}, "hidden_dim": 16})))
    plan, problems = analyse(nodes)
    assert problems == [] and infer_bridge_widths(plan, nodes, real_widths) == []
    assert plan.bridge_dims["proj"] == {"in_dim": real_widths["vision"]["output"], "out_dim": real_widths["llm"]["prefix_embeds"]}
    assert plan.bridge_dims["proj"] == {"in_dim": 32, "out_dim": 48}
    bridge = plan.classes["proj"](**nodes["proj"].params, **plan.bridge_dims["proj"])
    assert bridge(torch.zeros(2, 5, 32)).shape == (2, 5, 48)


def test_a_chain_of_bridges_passes_an_explicit_width_down_and_up() -> None:
    known = {"vision": {"output": 32}, "llm": {"prefix_embeds": 48}}
    graph = graph_of(("a", {"type": "mlp_projector", "inputs": {"x": "vision"}}), ("b", {"type": "linear_projector", "inputs": {"x": "a"}}),
                     prefix="b")
    nodes = specs(graph)
    plan, _ = analyse(nodes)
    assert messages(infer_bridge_widths(plan, nodes, known)) == ["graph.a.out_dim: cannot be inferred from any consumer; give it explicitly"]
    assert plan.bridge_dims == {"a": {"in_dim": 32}, "b": {"out_dim": 48}}
    graph["b"]["in_dim"] = 20  # the consumer's explicit in_dim decides the producer's out_dim
    nodes = specs(graph)
    plan, _ = analyse(nodes)
    assert infer_bridge_widths(plan, nodes, known) == []
    assert plan.bridge_dims == {"a": {"in_dim": 32, "out_dim": 20}, "b": {"in_dim": 20, "out_dim": 48}}


def test_the_width_input_port_is_the_one_read(real_widths: dict[str, dict[str, int]]) -> None:
    nodes = specs(graph_of(("q", {"type": "qformer", "inputs": {"context": "vision"}, "num_queries": 2, "hidden_size": 16,
                                   "num_layers": 1, "num_heads": 2}), prefix="q"))
    plan, _ = analyse(nodes)
    assert infer_bridge_widths(plan, nodes, real_widths) == []
    assert plan.bridge_dims["q"] == {"in_dim": 32, "out_dim": 48}


def test_an_explicit_width_that_contradicts_a_neighbour_is_refused_and_the_neighbour_wins() -> None:
    nodes = specs(graph_of(("proj", {"type": "linear_projector", "inputs": {"x": "vision"}, "in_dim": 31, "out_dim": 48})))
    plan, _ = analyse(nodes)
    found = infer_bridge_widths(plan, nodes, {"vision": {"output": 32}, "llm": {"prefix_embeds": 48}})
    assert messages(found) == ["graph.proj.in_dim: given as 31 but the output of 'vision' has width 32"]
    assert plan.bridge_dims["proj"] == {"in_dim": 32, "out_dim": 48}


def test_an_unreadable_neighbour_leaves_its_width_to_load_time() -> None:
    nodes = specs(graph_of(("proj", {"type": "linear_projector", "inputs": {"x": "vision"}})))
    plan, _ = analyse(nodes)
    assert infer_bridge_widths(plan, nodes, {"llm": {"prefix_embeds": 48}}) == []  # vision's config not readable
    assert plan.bridge_dims["proj"] == {"out_dim": 48}
    plan, _ = analyse(nodes)
    assert infer_bridge_widths(plan, nodes, {"vision": {"output": 32}}) == []  # llm's not readable: no complaint either
    assert plan.bridge_dims["proj"] == {"in_dim": 32}


def test_a_bridge_without_inputs_gets_only_its_output_width() -> None:
    nodes = specs(graph_of(("soft", {"type": "soft_prompt", "num_tokens": 2}), prefix="soft"))
    plan, _ = analyse(nodes)
    assert infer_bridge_widths(plan, nodes, {"vision": {"output": 32}, "llm": {"prefix_embeds": 48}}) == []
    assert plan.bridge_dims["soft"] == {"out_dim": 48}


def test_an_in_dim_that_cannot_be_inferred_is_reported() -> None:
    nodes = specs(graph_of(("proj", {"type": "linear_projector", "inputs": {"x": ["vision", "vision"]}})))
    plan, problems = analyse(nodes)
    assert problems == []
    found = infer_bridge_widths(plan, nodes, {"vision": {"output": 32}, "llm": {"prefix_embeds": 48}})
    assert any(p.where == "graph.proj" and p.field == "in_dim" for p in found), messages(found)
