"""Recipe checks without weights: every shipped recipe passes; bad ones get every problem, located."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO, build, tiny_recipe
from mmadapt.errors import RecipeError
from mmadapt.core.spec import apply_overrides
from mmadapt.core.validate import check_recipe, load_recipe

RECIPES = sorted(str(p.relative_to(REPO)) for p in (REPO / "recipes").rglob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES)
def test_every_shipped_recipe_validates(path: str) -> None:
    """Every shipped recipe validates, except that the hub and GPU ones lack the data and checkpoints they fetch first,
    and multimodal-from-cards the cards other recipes make: those must be the only problems."""
    try:
        recipe, plan = load_recipe(str(REPO / path))
    except RecipeError as exc:
        assert all("is not on this machine" in p.message for p in exc.problems), str(exc)
        return
    assert plan.generator is not None and len(plan.order) == len(recipe.nodes)


def problems_of(raw: dict) -> list[str]:
    with pytest.raises(RecipeError) as info:
        check_recipe(raw, "bad.yaml")
    return [str(p) for p in info.value.problems]


def test_all_problems_are_reported_at_once_each_naming_node_and_field() -> None:
    raw = tiny_recipe()
    raw["graph"]["qformer"]["num_querys"] = 8
    raw["graph"]["vision"]["type"] = "hf_visoin"
    raw["graph"]["llm"]["inputs"]["prefix_embeds"] = "qfromer"
    raw["train"]["lr"] = "fast"
    raw["train"]["epochs"] = 3
    raw["extra"] = 1
    problems = problems_of(raw)
    joined = "\n".join(problems)
    assert "graph.qformer.num_querys: QFormer has no argument 'num_querys'; accepted: in_dim, out_dim, num_queries" in joined
    assert "graph.vision.type: unknown type 'hf_visoin' (did you mean 'hf_vision'?); known types:" in joined
    assert "graph.llm.inputs.prefix_embeds: unknown node 'qfromer'; nodes: vision, qformer, llm" in joined
    assert "train.lr: expected float, got 'fast'" in joined
    assert "train.epochs: unknown option; accepted:" in joined
    assert "extra: unknown top-level key" in joined
    assert len(problems) == 6


def test_contradicting_width_is_an_error_naming_the_neighbour() -> None:
    raw = tiny_recipe("mlp_projector")
    raw["graph"]["mlp_projector"]["in_dim"] = 99
    raw["graph"]["mlp_projector"]["out_dim"] = 77
    problems = problems_of(raw)
    assert "graph.mlp_projector.in_dim: given as 99 but the output of 'vision' has width 32" in problems
    assert "graph.mlp_projector.out_dim: given as 77 but 'llm' input 'prefix_embeds' has width 48" in problems


def test_consistent_explicit_width_is_accepted_and_inferred_ones_are_filled() -> None:
    raw = tiny_recipe("qformer")
    raw["graph"]["qformer"]["out_dim"] = 48
    _, plan = check_recipe(raw, "ok.yaml")
    assert plan.bridge_dims["qformer"] == {"in_dim": 32, "out_dim": 48}


def test_missing_required_argument_wrong_port_cycle_and_no_generator() -> None:
    raw = tiny_recipe("qformer")
    raw["graph"]["qformer"]["inputs"] = {"context": "llm", "images": "vision"}
    problems = problems_of(raw)
    assert any("graph.qformer.inputs.images: QFormer.forward has no argument 'images'; accepted: context" in p for p in problems)
    assert any("cycle through: qformer, llm" in p for p in problems)
    raw = tiny_recipe("qformer")
    del raw["graph"]["llm"]
    raw["graph"]["vision"].pop("config")
    problems = problems_of(raw)
    assert any("needs exactly one generator" in p for p in problems)


def test_unreadable_hub_config_is_a_note_not_an_error() -> None:
    raw = tiny_recipe("mlp_projector")
    raw["graph"]["llm"] = {"type": "causal_lm", "checkpoint": "no-such-org/no-such-model", "inputs": {"prefix_embeds": "mlp_projector"}}
    _, plan = check_recipe(raw, "hub.yaml")
    assert plan.bridge_dims["mlp_projector"] == {"in_dim": 32}
    assert any(n.startswith("graph.llm: config not readable here") and "checked at load" in n for n in plan.notes)


def test_overrides_change_the_built_graph() -> None:
    raw = apply_overrides(tiny_recipe("qformer"), ["train.lr=3e-4", "graph.qformer.num_queries=16", "train.cache_frozen_features=true"])
    recipe, _ = check_recipe(raw, "override")
    assert recipe.train.lr == pytest.approx(3e-4) and recipe.train.cache_frozen_features is True
    assert build(raw).nodes["qformer"].query_tokens.shape == (1, 16, 32)
    with pytest.raises(RecipeError, match="an override must look like section.key=value"):
        apply_overrides(raw, ["train.lr"])


def test_dotted_path_type_imports_an_outside_class_without_registration() -> None:
    raw = tiny_recipe("linear_projector")
    raw["graph"]["linear_projector"] = {"type": "plugin_bridge.DoubleLinear", "inputs": {"x": "vision"}, "scale": 0.5}
    model = build(raw)
    assert type(model.nodes["linear_projector"]).__name__ == "DoubleLinear"
    assert model.plan.bridge_dims["linear_projector"] == {"in_dim": 32, "out_dim": 48}
    raw["graph"]["linear_projector"]["type"] = "plugin_bridge.Nope"
    assert any("module 'plugin_bridge' has no attribute 'Nope'" in p for p in problems_of(raw))


def run_cli(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mmadapt", *args], capture_output=True, text=True, cwd=cwd, timeout=300)


def test_cli_validate_exits_2_with_messages_and_no_traceback(tmp_path: Path) -> None:
    raw = tiny_recipe()
    raw["graph"]["qformer"]["num_querys"] = 8
    raw["graph"]["llm"]["inputs"]["prefix_embeds"] = "nowhere"
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(raw))
    result = run_cli("validate", str(bad))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr + result.stdout
    assert f"{bad}: 2 problem(s)" in result.stderr
    assert "graph.qformer.num_querys" in result.stderr and "graph.llm.inputs.prefix_embeds" in result.stderr
    broken = tmp_path / "broken.yaml"
    broken.write_text("graph: {vision: [unclosed\n")
    result = run_cli("validate", str(broken))
    assert result.returncode == 2 and "not valid YAML" in result.stderr and "Traceback" not in result.stderr
    result = run_cli("validate", str(tmp_path / "missing.yaml"))
    assert result.returncode == 2 and "file not found" in result.stderr


def test_shard_frozen_names_frozen_nodes_only() -> None:
    raw = tiny_recipe("qformer")
    raw["train"]["shard_frozen"] = ["llm", "qformer", "lmm"]
    raw["graph"]["llm"]["adapters"] = [{"type": "lora", "r": 4}]
    problems = problems_of(raw)
    assert "train.shard_frozen: node 'llm' carries adapters, which train; only frozen nodes without adapters are sharded" in problems
    assert "train.shard_frozen: node 'qformer' trains; only frozen nodes are sharded" in problems
    assert "train.shard_frozen: no node 'lmm' in the graph; nodes: vision, qformer, llm" in problems
    raw = tiny_recipe("qformer", cache_frozen_features=True)
    raw["train"]["shard_frozen"] = "vision"
    assert problems_of(raw) == ["train.shard_frozen: expected list[str], got 'vision'"]
    raw["train"]["shard_frozen"] = ["vision"]
    assert problems_of(raw) == ["train.shard_frozen: encoder 'vision' would feed the feature cache, which each process "
                                "fills alone; set cache_frozen_features: false"]
    raw["train"]["shard_frozen"], raw["train"]["cache_frozen_features"] = ["vision", "llm"], False
    recipe, _ = check_recipe(raw, "good.yaml")
    assert recipe.train.shard_frozen == ["vision", "llm"]


def test_shard_frozen_on_one_process_keeps_the_whole_lm(tmp_path: Path) -> None:
    from mmadapt.training.trainer import Trainer

    raw = tiny_recipe("qformer", output_dir=str(tmp_path / "run"))
    raw["train"]["shard_frozen"] = ["llm"]
    trainer = Trainer(*check_recipe(raw, "good.yaml"))
    assert not trainer.sharded and trainer.wrapped is not None
    weights = next(trainer.model.nodes["llm"].parameters())
    assert type(weights).__name__ == "Parameter"  # not a DTensor: one process keeps the whole LM


def test_text_alignment_needs_data_that_spells_the_text_before_anything_loads() -> None:
    raw = tiny_recipe("qformer")
    raw["graph"]["llm"]["text_alignment"] = 5
    raw["data"] = {"type": "image_captions", "path": "captions.jsonl"}  # a table of files and texts: no spelled_text option
    assert "data.spelled_text: graph.llm.text_alignment is set, so every training sample needs a spelled_text; image_captions " \
           "gives none (it has no spelled_text option)" in problems_of(raw)
    raw["data"] = {"type": "mixture", "parts": [{"type": "digits_captions", "split": "train", "spelled_text": "It is a {word}."},
                                                 {"type": "digits_captions", "split": "train"}]}
    assert problems_of(raw) == ["data.spelled_text: graph.llm.text_alignment is set, so every training sample needs a "
                                "spelled_text; digits_captions gives none unless its spelled_text is set (e.g. spelled_text: "
                                "\"The picture shows a {word}.\")"]
    raw["data"]["parts"][1]["spelled_text"] = "It is a {word}."
    recipe, _ = check_recipe(raw, "good.yaml")
    assert recipe.nodes["llm"].params["text_alignment"] == 5


# --- values against annotations (mmadapt/params.py) ---
def test_value_checker_scalars_enums_bounds_nested_and_none() -> None:
    from typing import Annotated, Any, Literal

    from mmadapt.core.params import Dropout, OneOf, PositiveInt, Range, check

    assert check(float, 3) == (3.0, None) and check(float, "3e-4") == (3e-4, None)  # YAML 1.1 reads 3e-4 as text
    assert check(float, True)[1] == "expected float, got True" and check(int, True)[1] == "expected int, got True"
    assert check(int, 2.0)[1] == "expected int, got 2.0" and check(str, 5)[1] == "expected str, got 5"
    assert check(Literal["patch", "pooled"], "grid")[1] == "expected one of patch, pooled, got 'grid'"
    assert check(Annotated[str, OneOf(("caption", "raw"))], "chat")[1] == "expected one of caption, raw, got 'chat'"
    assert check(PositiveInt, 0)[1] == "must be >= 1, got 0" and check(PositiveInt, 1) == (1, None)
    assert check(PositiveInt | None, None) == (None, None)
    assert check(PositiveInt | None, "ten")[1] == "expected int, got 'ten'"
    assert check(PositiveInt | None, -4)[1] == "must be >= 1, got -4"
    assert check(Dropout, 1.0)[1] == "must be in [0, 1), got 1.0" and check(Dropout, 0) == (0.0, None)
    assert check(Annotated[float, Range(0, 1)], 1) == (1.0, None)
    assert check(list[PositiveInt], [1, 0])[1] == "item 1: must be >= 1, got 0"
    assert check(list[str], "vision")[1] == "expected list[str], got 'vision'"
    assert check(dict[str, list[float]], {"a": [1, "2e-1"]}) == ({"a": [1.0, 0.2]}, None)
    assert check(dict[str, str], {"qformer": 3})[1] == "value of 'qformer': expected str, got 3"
    assert check(dict[str, str], {1: "x"})[1] == "key 1: expected str, got 1"
    assert check(str | list[str] | None, 5)[1] == "expected str | list[str] | None, got 5"
    assert check(Any, object) == (object, None)


def test_every_registered_constructor_has_annotations_the_checker_can_read() -> None:
    import typing

    from mmadapt.core.registry import ADAPTER_TYPES, DATA_TYPES, NODE_TYPES, import_dotted

    for table in (NODE_TYPES, ADAPTER_TYPES, DATA_TYPES):
        for dotted in table.values():  # a typo here would silently turn the checks off (plugins fall back to accepting)
            assert typing.get_type_hints(import_dotted(dotted).__init__, include_extras=True), dotted


def test_a_plugin_whose_annotations_cannot_be_evaluated_is_accepted_as_it_is() -> None:
    from mmadapt.core.graph import constructor_problems

    class Plugin:
        def __init__(self, scale: NotImportedHere = 1) -> None:  # noqa: F821
            self.scale = scale

    assert constructor_problems(Plugin, {"scale": "anything"}, "graph.p") == []


def test_bad_values_in_train_nodes_adapters_and_data_are_reported_at_once() -> None:
    raw = tiny_recipe("lora")
    raw["train"].update(lr=-1, precision="fp64", log_every=0, max_new_tokens=0, objective="mse")
    raw["graph"]["proj"]["num_layers"] = 0
    raw["graph"]["llm"].update(dtype="fp16", prefix_as="logits", text_alignment="high")
    raw["graph"]["llm"]["adapters"][0].update(r="four", dropout=1.5)
    raw["graph"]["vision"]["feature"] = "grid"
    raw["data"].update(split="tran", template="chat", limit=0)
    problems = problems_of(raw)
    for expected in ("train.lr: must be > 0, got -1.0", "train.precision: expected one of fp32, bf16, fp16, got 'fp64'",
                     "train.log_every: must be >= 1, got 0", "train.max_new_tokens: must be >= 1, got 0",
                     "train.objective: retired: the generator decides its loss (cards may still carry 'lm', which is read and dropped); got 'mse'", "graph.proj.num_layers: must be >= 1, got 0",
                     "graph.llm.dtype: expected one of float32, bfloat16, float16, got 'fp16'",
                     "graph.llm.prefix_as: expected one of embeddings, token_distribution, got 'logits'",
                     "graph.llm.text_alignment: expected float, got 'high'", "graph.llm.adapters[0].r: expected int, got 'four'",
                     "graph.llm.adapters[0].dropout: must be in [0, 1), got 1.5",
                     "graph.vision.feature: expected one of patch, pooled, got 'grid'",
                     "data.split: expected one of train, val, test, got 'tran'",
                     "data.template: expected one of caption, instruction, raw, got 'chat'", "data.limit: must be >= 1, got 0"):
        assert expected in problems, f"{expected!r} not in {problems}"


def test_mixture_parts_are_checked_as_data_sections_and_text_numbers_become_numbers() -> None:
    raw = tiny_recipe("qformer")
    raw["data"] = {"type": "mixture", "parts": [{"type": "digits_captions", "split": "train"},
                                                 {"type": "digits_captions", "split": "tran", "style": "fancy"}]}
    assert set(problems_of(raw)) >= {"data.parts[1].split: expected one of train, val, test, got 'tran'",
                                     "data.parts[1].style: expected one of varied, fixed, got 'fancy'"}
    raw = tiny_recipe("qformer")
    raw["graph"]["qformer"]["dropout"] = "1e-1"  # YAML 1.1 reads 1e-1 (no dot) as text
    recipe, _ = check_recipe(raw, "good.yaml")
    assert recipe.nodes["qformer"].params["dropout"] == 0.1


# --- recipe files and overrides ---
TINY = REPO / "recipes" / "tiny" / "qformer-random.yaml"


def test_a_key_written_twice_names_the_file_line_and_key(tmp_path: Path) -> None:
    from mmadapt.core.spec import load_yaml

    text = TINY.read_text().replace("  lr: 1.0e-3\n", "  lr: 1.0e-3\n  lr: 5.0e-2\n")
    path = tmp_path / "twice.yaml"
    path.write_text(text)
    line = text.splitlines().index("  lr: 5.0e-2") + 1
    with pytest.raises(RecipeError) as info:
        load_yaml(path)
    assert str(info.value.problems[0]) == f"{path}: line {line}: key 'lr' is written twice in one mapping (first on line {line - 1}); keep one"
    path.write_text("graph: {llm: {type: causal_lm, type: qformer}}\n")
    with pytest.raises(RecipeError, match="line 1: key 'type' is written twice"):
        load_yaml(path)
    path.write_text("base: &b {lr: 1.0}\ntrain:\n  <<: *b\n  lr: 2.0\n")  # a merge key may be overridden, as YAML allows
    assert load_yaml(path)["train"] == {"lr": 2.0}


@pytest.mark.parametrize("encoding", ["utf-16", "latin-1"])
def test_a_recipe_that_is_not_utf8_names_its_file(tmp_path: Path, encoding: str) -> None:
    from mmadapt.core.spec import load_yaml

    path = tmp_path / "recipe.yaml"
    path.write_bytes("name: caf\xe9\ngraph: {}\n".encode(encoding))
    with pytest.raises(RecipeError) as info:
        load_yaml(path)
    assert str(info.value.problems[0]).startswith(f"{path}: not UTF-8 text (byte ")


def test_an_override_with_bad_yaml_names_the_override() -> None:
    with pytest.raises(RecipeError) as info:
        apply_overrides(tiny_recipe(), ["train.lr={", "train.steps=5", "graph.qformer.num_queries=[1, 2"])
    assert [p.field for p in info.value.problems] == ["train.lr", "graph.qformer.num_queries"]
    assert "the value '{' is not valid YAML (expected the node content" in str(info.value.problems[0])
