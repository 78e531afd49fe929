"""`init_from` copies a LLaVA checkpoint's projector into linear_projector / mlp_projector: transformers' layout
(`multi_modal_projector.linear_1/2`, as save_pretrained writes it, or under `model.` as the live model names it) and
the original LLaVA repo's
(`model.mm_projector.0/2`, also as stage 1's mm_projector.bin or a sharded pytorch_model.bin)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from bridges.projector import LinearProjector, MLPProjector
from conftest import TINY_LMS, TINY_VISION, build, tiny_recipe
from mmadapt.core.semantics import NodeContext
from mmadapt.core.validate import check_recipe
from mmadapt.errors import MMAdaptError, RecipeError

IN, OUT = TINY_VISION["hidden_size"], TINY_LMS["llama"]["hidden_size"]  # 32 -> 48
CONTEXT = NodeContext("projector", ("vision", "projector", "llm"), ("vision",))


@pytest.fixture(scope="module")
def llava(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Path]:
    """A random tiny LlavaForConditionalGeneration and its save_pretrained folder."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(0)
    text = {k: v for k, v in TINY_LMS["llama"].items() if k != "model_type"}
    config = LlavaConfig(vision_config=dict(TINY_VISION), text_config={"model_type": "llama", **text}, image_token_id=383,
                         projector_hidden_act="gelu")
    model = LlavaForConditionalGeneration(config).eval()
    folder = tmp_path_factory.mktemp("llava") / "llava-hf"
    model.save_pretrained(folder)
    return model, folder


def projector_of(model: Any) -> dict[str, torch.Tensor]:
    """linear_1/linear_2 weights and biases, as `0.weight`, `2.weight` ... (LLaVA's own nn.Sequential indices)."""
    projector = model.model.multi_modal_projector
    return {f"{2 * i}.{kind}": getattr(layer, kind).detach().clone()
            for i, layer in enumerate((projector.linear_1, projector.linear_2)) for kind in ("weight", "bias")}


def llava_repo_folder(folder: Path, tensors: dict[str, torch.Tensor], how: str = "safetensors") -> Path:
    """A folder as the original LLaVA repo writes it: a config.json naming the projector type, and the weights."""
    folder.mkdir(parents=True)
    layers = sum(k.endswith("weight") for k in tensors if "mm_projector" in k)
    kind = "linear" if layers == 1 else f"mlp{layers}x_gelu"
    (folder / "config.json").write_text(json.dumps({"model_type": "llava_llama", "mm_projector_type": kind,
                                                    "mm_hidden_size": IN, "hidden_size": OUT}))
    if how == "safetensors":
        save_file(tensors, str(folder / "model.safetensors"))
    elif how == "mm_projector.bin":  # stage 1 (feature alignment) saves the projector alone
        torch.save(tensors, folder / "mm_projector.bin")
    else:  # a sharded torch checkpoint: the projector sits in the second shard
        rest = {"model.embed_tokens.weight": torch.randn(4, OUT)}
        torch.save(rest, folder / "pytorch_model-00001-of-00002.bin")
        torch.save(tensors, folder / "pytorch_model-00002-of-00002.bin")
        weight_map = {**dict.fromkeys(rest, "pytorch_model-00001-of-00002.bin"),
                      **dict.fromkeys(tensors, "pytorch_model-00002-of-00002.bin")}
        (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return folder


def assert_is_llavas(bridge: MLPProjector, model: Any) -> None:
    projector = model.model.multi_modal_projector
    for ours, theirs in ((bridge.mlp[0], projector.linear_1), (bridge.mlp[2], projector.linear_2)):
        assert torch.equal(ours.weight, theirs.weight) and torch.equal(ours.bias, theirs.bias)
    x = torch.randn(2, 5, IN)
    with torch.no_grad():
        expected = projector(x)
        assert torch.allclose(bridge(x), expected, atol=1e-6, rtol=0)
    assert expected.abs().max() > 1e-3  # not a trivial all-zero match


def test_init_from_a_transformers_llava_checkpoint(llava: tuple[Any, Path]) -> None:
    model, folder = llava
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), "pt") as saved:  # transformers 5.24 saves the hub's (4.x) names
        assert {"multi_modal_projector.linear_1.weight", "multi_modal_projector.linear_2.bias"} <= set(saved.keys())
    assert_is_llavas(MLPProjector(IN, OUT, init_from=str(folder)), model)


@pytest.mark.parametrize("prefix, how", [
    ("model.multi_modal_projector.", "safetensors"),  # the names of a live transformers 5 model
    ("model.mm_projector.", "safetensors"),  # the original LLaVA repo
    ("model.mm_projector.", "mm_projector.bin"),
    ("model.mm_projector.", "pytorch_model.bin"),
])
def test_init_from_other_llava_layouts(llava: tuple[Any, Path], tmp_path: Path, prefix: str, how: str) -> None:
    model, _ = llava
    names = {"0": "linear_1", "2": "linear_2"} if "multi_modal" in prefix else {"0": "0", "2": "2"}
    tensors = {f"{prefix}{names[k.split('.')[0]]}.{k.split('.')[1]}": v
               for k, v in projector_of(model).items()}
    tensors["model.layers.0.mlp.up_proj.weight"] = torch.randn(8, OUT)  # the LM's weights beside it are left alone
    assert_is_llavas(MLPProjector(IN, OUT, init_from=str(llava_repo_folder(tmp_path / "ckpt", tensors, how))), model)


def test_linear_projector_from_a_llava_1_0_checkpoint(tmp_path: Path) -> None:
    weight, bias = torch.randn(OUT, IN), torch.randn(OUT)
    folder = llava_repo_folder(tmp_path / "llava-1.0", {"model.mm_projector.weight": weight, "model.mm_projector.bias": bias})
    bridge = LinearProjector(IN, OUT, init_from=str(folder))
    assert torch.equal(bridge.proj.weight, weight) and torch.equal(bridge.proj.bias, bias)
    one_layer = MLPProjector(IN, OUT, num_layers=1, init_from=str(folder))
    assert torch.equal(one_layer.mlp[0].weight, weight)
    with pytest.raises(MMAdaptError, match=r"holds a 1-layer projector .*this mlp_projector has 2: set num_layers: 1"):
        MLPProjector(IN, OUT, init_from=str(folder))


def test_a_size_mismatch_names_the_tensor(llava: tuple[Any, Path]) -> None:
    _, folder = llava
    with pytest.raises(MMAdaptError) as info:
        MLPProjector(IN, 40, init_from=str(folder))
    message = str(info.value)
    assert f"init_from '{folder}' does not fit this mlp_projector" in message
    assert "multi_modal_projector.linear_1.weight -> mlp.0.weight: checkpoint (48, 32) vs bridge (40, 32)" in message
    assert "maps width 32 (in_dim) to 48 (out_dim) through hidden_dim 48; match its sizes in the recipe" in message


def test_the_layer_count_must_match(llava: tuple[Any, Path]) -> None:
    _, folder = llava
    with pytest.raises(MMAdaptError, match=r"holds a 2-layer projector \(multi_modal_projector\.linear_1\.weight, \.\.\.\); "
                                           r"this linear_projector has 1: use type: mlp_projector with num_layers: 2"):
        LinearProjector(IN, OUT, init_from=str(folder))
    with pytest.raises(MMAdaptError, match=r"this mlp_projector has 3: set num_layers: 2"):
        MLPProjector(IN, OUT, num_layers=3, init_from=str(folder))


def test_a_checkpoint_without_a_projector_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "plain-lm"
    folder.mkdir()
    save_file({"model.embed_tokens.weight": torch.randn(4, OUT)}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(MMAdaptError) as info:
        MLPProjector(IN, OUT, init_from=str(folder))
    assert str(folder) in str(info.value)
    assert all(p in str(info.value) for p in ("model.multi_modal_projector.", "multi_modal_projector.", "model.mm_projector."))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(MMAdaptError, match=rf"'{empty}': no model.safetensors.index.json, .*mm_projector.bin"):
        LinearProjector(IN, OUT, init_from=str(empty))
    with pytest.raises(MMAdaptError, match=rf"init_from '{tmp_path / 'nowhere'}': no such folder"):
        LinearProjector(IN, OUT, init_from=str(tmp_path / "nowhere"))


def test_validate_checks_the_layer_count_from_config_json(llava: tuple[Any, Path], tmp_path: Path) -> None:
    _, folder = llava
    assert MLPProjector.param_problems({"init_from": str(folder)}, CONTEXT) == []
    [wrong] = MLPProjector.param_problems({"init_from": str(folder), "num_layers": 3}, CONTEXT)
    assert wrong.field == "num_layers" and "set num_layers: 2" in wrong.message
    [linear] = LinearProjector.param_problems({"init_from": str(folder)}, CONTEXT)
    assert linear.field == "init_from" and "use type: mlp_projector with num_layers: 2" in linear.message
    original = llava_repo_folder(tmp_path / "stage1", {"model.mm_projector.weight": torch.randn(OUT, IN)}, "mm_projector.bin")
    assert LinearProjector.param_problems({"init_from": str(original)}, CONTEXT) == []
    config = json.loads((original / "config.json").read_text())
    del config["mm_projector_type"]  # LLaVA-1.0's config names no type: its builder's default is linear
    (original / "config.json").write_text(json.dumps({**config, "model_type": "llava"}))
    assert LinearProjector.param_problems({"init_from": str(original)}, CONTEXT) == []
    assert "set num_layers: 1" in MLPProjector.param_problems({"init_from": str(original)}, CONTEXT)[0].message
    raw = tiny_recipe("mlp_projector")
    raw["graph"]["mlp_projector"].update(init_from=str(folder), num_layers=3)
    with pytest.raises(RecipeError) as info:
        check_recipe(raw, "bad.yaml")
    [problem] = info.value.problems
    assert (problem.where, problem.field) == ("graph.mlp_projector", "num_layers")
    raw["graph"]["mlp_projector"]["init_from"] = str(tmp_path / "nowhere")
    raw["graph"]["mlp_projector"]["num_layers"] = 2
    with pytest.raises(RecipeError, match=r"graph.mlp_projector.init_from: no such file or folder"):
        check_recipe(raw, "bad.yaml")


def test_a_recipe_starts_its_projector_from_llava(llava: tuple[Any, Path]) -> None:
    model, folder = llava
    raw = tiny_recipe("mlp_projector")
    del raw["graph"]["mlp_projector"]["hidden_dim"]  # LLaVA's hidden width is out_dim
    raw["graph"]["mlp_projector"]["init_from"] = str(folder)
    assert_is_llavas(build(raw).nodes["mlp_projector"], model)
