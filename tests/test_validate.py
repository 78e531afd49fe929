"""Recipe checks without weights: every shipped recipe passes; bad ones get every problem, located."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO, build, tiny_recipe
from mmadapt.errors import RecipeError
from mmadapt.spec import apply_overrides
from mmadapt.validate import check_recipe, load_recipe

RECIPES = sorted(str(p.relative_to(REPO)) for p in (REPO / "recipes").rglob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES)
def test_every_shipped_recipe_validates(path: str) -> None:
    recipe, plan = load_recipe(str(REPO / path))
    assert plan.decoder is not None and len(plan.order) == len(recipe.nodes)


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


def test_missing_required_argument_wrong_port_cycle_and_no_decoder() -> None:
    raw = tiny_recipe("qformer")
    raw["graph"]["qformer"]["inputs"] = {"context": "llm", "images": "vision"}
    problems = problems_of(raw)
    assert any("graph.qformer.inputs.images: QFormer.forward has no argument 'images'; accepted: context" in p for p in problems)
    assert any("cycle through: qformer, llm" in p for p in problems)
    raw = tiny_recipe("qformer")
    del raw["graph"]["llm"]
    raw["graph"]["vision"].pop("config")
    problems = problems_of(raw)
    assert any("needs exactly one decoder" in p for p in problems)


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
    from mmadapt.train import Trainer

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
    raw["data"] = {"type": "mixture", "parts": [{"type": "digits_points", "split": "train", "spelled_text": "It is a {word}."},
                                                 {"type": "digits_points", "split": "train"}]}
    assert problems_of(raw) == ["data.spelled_text: graph.llm.text_alignment is set, so every training sample needs a "
                                "spelled_text; digits_points gives none unless its spelled_text is set (e.g. spelled_text: "
                                "\"The picture shows a {word}.\")"]
    raw["data"]["parts"][1]["spelled_text"] = "It is a {word}."
    recipe, _ = check_recipe(raw, "good.yaml")
    assert recipe.nodes["llm"].params["text_alignment"] == 5
