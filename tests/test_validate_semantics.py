"""What a recipe means, checked by `validate` before any weights load: markers, data fields, that something trains,
cross-field node arguments, inline config keys, files and folders, hub ids and adapter targets."""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest

from conftest import REPO, tiny_recipe
from mmadapt.errors import Problem, RecipeError
from mmadapt.core.spec import load_yaml
from mmadapt.core.validate import check_recipe

QFORMER = load_yaml(REPO / "recipes" / "mini" / "qformer.yaml")  # zoo digits-clip -> Q-Former -> zoo digits-lm
PERSONALIZE = load_yaml(REPO / "recipes" / "mini" / "personalize-lora.yaml")  # soft prompt -> zoo digits-sd with a LoRA


def problems_of(raw: dict[str, Any]) -> list[Problem]:
    with pytest.raises(RecipeError) as info:
        check_recipe(raw, "bad.yaml")
    return info.value.problems


def the_problem(raw: dict[str, Any]) -> Problem:
    found = problems_of(raw)
    assert len(found) == 1, found
    return found[0]


def variant(base: dict[str, Any]) -> dict[str, Any]:
    return copy.deepcopy(base)


def notes_of(raw: dict[str, Any]) -> list[str]:
    return check_recipe(raw, "ok.yaml")[1].notes


def test_markers_name_bridges_that_feed_the_decoder() -> None:
    raw = variant(QFORMER)
    raw["graph"]["llm"]["markers"] = {"qformr": "<image>"}
    assert the_problem(raw) == Problem("graph.llm", "markers", "'qformr' is not a node of the graph; nodes: vision, qformer, llm")
    raw["graph"]["llm"]["markers"] = {"vision": "<image>"}
    assert the_problem(raw) == Problem("graph.llm", "markers", "'vision' does not feed 'llm', so no tokens of it reach a marker; "
                                                               "its inputs come from: qformer")
    raw["graph"]["llm"]["markers"] = {"qformer": "<image>"}
    check_recipe(raw, "ok.yaml")


def test_an_encoder_reads_only_fields_the_data_gives() -> None:
    raw = variant(QFORMER)
    raw["graph"]["vision"]["inputs"] = {"pixel_values": "data.imgae"}
    assert the_problem(raw) == Problem("graph.vision", "inputs.pixel_values", "data gives no field 'imgae'; its samples carry: "
                                                                              "id, image, key, label, prompt, target, text")
    raw = variant(QFORMER)
    raw["data"] = {"type": "digits_points", "limit": 8}  # an image tower over point clouds: its default input is missing
    assert the_problem(raw) == Problem("graph.vision", "inputs.pixel_values", "data gives no field 'image' (OpenCLIPVision reads "
                                       "data.image unless inputs.pixel_values names another field); its samples carry: id, key, "
                                       "label, points, prompt, target, text")
    raw = variant(QFORMER)
    raw["val_data"] = {"type": "digits_points", "split": "val", "limit": 8}
    assert the_problem(raw).message.startswith("val_data gives no field 'image'")
    raw = variant(QFORMER)
    raw["graph"]["qformer"]["inputs"] = {"context": "data.image"}
    assert Problem("graph.qformer", "inputs.context", "data.image: only encoders read data fields; nothing fills a bridge's") in problems_of(raw)


def test_a_mixture_gives_every_parts_fields_and_a_field_no_part_gives_is_an_error(fsdd: None) -> None:
    check_recipe(load_yaml(REPO / "recipes" / "mini" / "multimodal.yaml"), "multimodal.yaml")  # rows of other modalities are skipped per encoder
    raw = variant(QFORMER)
    raw["data"] = {"type": "mixture", "parts": [{"type": "fsdd_captions", "split": "train"}, {"type": "digits_points"}]}
    raw["val_data"] = None
    assert the_problem(raw).message.startswith("data gives no field 'image'")
    raw["data"]["parts"][0]["paired_image"] = "digits"  # each recording then carries the scan of its digit
    check_recipe(raw, "ok.yaml")


def test_a_graph_in_which_nothing_trains_is_refused() -> None:
    raw = variant(QFORMER)
    raw["graph"]["qformer"]["trainable"] = False
    assert the_problem(raw) == Problem("graph", "", "nothing trains: its bridges (qformer) have trainable: false, no node has "
                                       "adapters, and none has trainable: true; a run needs a trainable bridge, an adapter "
                                       "(e.g. {type: lora}) or a node with trainable: true")
    raw["graph"]["llm"]["adapters"] = [{"type": "lora", "r": 4, "target_modules": ["q_proj"]}]
    check_recipe(raw, "adapters train.yaml")
    del raw["graph"]["llm"]["adapters"]
    raw["graph"]["vision"]["trainable"] = True
    check_recipe(raw, "the tower trains.yaml")
    raw = variant(PERSONALIZE)  # the diffusion decoder's placeholder row is a slot the soft prompt fills, not trained itself
    raw["graph"]["token"]["trainable"] = False
    del raw["graph"]["sd"]["adapters"]
    assert the_problem(raw).message.startswith("nothing trains: its bridges (token) have trainable: false")


def test_qformer_heads_must_divide_its_width() -> None:
    raw = variant(QFORMER)
    raw["graph"]["qformer"]["num_heads"] = 3
    assert the_problem(raw) == Problem("graph.qformer", "num_heads", "3 does not divide hidden_size 64: each head takes "
                                                                     "hidden_size / num_heads channels (e.g. num_heads: 2)")
    raw["graph"]["qformer"].pop("hidden_size")  # the default 768 is checked too
    raw["graph"]["qformer"]["num_heads"] = 5
    assert the_problem(raw).message.startswith("5 does not divide hidden_size 768")


def test_an_encoder_layer_is_within_its_configs_layers(fsdd: None) -> None:
    raw = tiny_recipe()  # a 2-layer config-built CLIP tower: hidden_states[-3..2]
    raw["graph"]["vision"]["layer"] = 3
    assert the_problem(raw) == Problem("graph.vision", "layer", "3 is out of range: it indexes the 3 hidden_states of a 2-layer "
                                                                "tower (the embeddings, then each layer), so it must be in -3..2")
    raw["graph"]["vision"]["layer"] = -3
    check_recipe(raw, "ok.yaml")
    raw["graph"]["vision"].update(layer=7, feature="pooled")  # pooled output reads no layer
    check_recipe(raw, "ok.yaml")
    raw = variant(QFORMER)  # zoo digits-clip: 4 blocks, read from its folder's open_clip_config.json
    raw["graph"]["vision"]["layer"] = 4
    assert the_problem(raw) == Problem("graph.vision", "layer", "4 is out of range: it indexes the 4 blocks of the tower, so it "
                                                                "must be in -4..3")
    raw = load_yaml(REPO / "recipes" / "mini" / "audio-qformer.yaml")  # zoo fsdd-audiomae: 4 blocks
    raw["graph"]["audio"]["layer"] = -5
    assert the_problem(raw) == Problem("graph.audio", "layer", "-5 is out of range: it indexes the 4 blocks of the encoder, so it "
                                                               "must be in -4..3")


def test_inline_config_keys_are_known_to_the_config_class() -> None:
    raw = tiny_recipe()
    raw["graph"]["llm"]["config"]["hiden_size"] = raw["graph"]["llm"]["config"].pop("hidden_size")
    raw["graph"]["vision"]["config"]["num_hiden_layers"] = 2
    raw["graph"]["llm"]["config"].update(rope_theta=10000.0, torch_dtype="float32")  # legacy spellings transformers converts
    assert problems_of(raw) == [
        Problem("graph.vision", "config", "unknown config key 'num_hiden_layers' for CLIPVisionConfig (did you mean 'num_hidden_layers'?)"),
        Problem("graph.llm", "config", "unknown config key 'hiden_size' for LlamaConfig (did you mean 'hidden_size'?)")]
    raw = tiny_recipe()  # a dual-tower config: its sub-config's keys are checked against the sub-config's class
    raw["graph"]["vision"]["config"] = {"model_type": "clip", "vision_config": {**raw["graph"]["vision"]["config"], "patch_sise": 8}}
    raw["graph"]["vision"]["config"]["vision_config"].pop("model_type")
    assert the_problem(raw) == Problem("graph.vision", "config.vision_config", "unknown config key 'patch_sise' for "
                                                                               "CLIPVisionConfig (did you mean 'patch_size'?)")
    raw = variant(QFORMER)  # open_clip: CLIP's arguments, and its vision_cfg against CLIPVisionCfg
    raw["graph"]["vision"] = {"type": "open_clip_vision", "config": {"embed_dim": 64, "vision_cfg": {"image_size": 32, "patch_size": 8,
                              "width": 96, "layres": 4}, "text_cfg": {"context_length": 16, "width": 32, "heads": 2, "layers": 2}}}
    assert the_problem(raw) == Problem("graph.vision", "config.vision_cfg", "unknown config key 'layres' for CLIPVisionCfg "
                                                                            "(did you mean 'layers'?)")
    raw = load_yaml(REPO / "recipes" / "mini" / "points-qformer.yaml")  # the point and audio encoders' own config classes
    raw["graph"]["points"]["config"] = {"num_groups": 4}
    assert the_problem(raw) == Problem("graph.points", "", "config: unknown config key 'num_groups' for PointBERTConfig (did you "
                                                           "mean 'num_group'?)")


def test_data_files_and_folders_exist_relative_to_the_current_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "captions.jsonl").write_text('{"image": "a.png", "text": "a"}\n')
    raw = variant(QFORMER)
    raw["data"], raw["val_data"] = {"type": "image_captions", "path": "captions.jsonl"}, None
    check_recipe(raw, "ok.yaml")
    raw["data"]["path"] = "captions.json"
    assert the_problem(raw) == Problem("data", "path", f"no such file: captions.json (relative paths start at the current folder, {tmp_path})")
    raw["data"].update(path=str(tmp_path / "captions.jsonl"), image_root=str(tmp_path / "images"))
    assert the_problem(raw) == Problem("data", "image_root", f"no such folder: {tmp_path / 'images'}")
    raw["data"] = {"type": "image_captions", "path": "data/coco/captions.jsonl"}  # its folder missing too: data not fetched yet
    assert the_problem(raw) == Problem("data", "path", f"data/coco/captions.jsonl (relative paths start at the current folder, "
                                       f"{tmp_path}) is not on this machine (nor its folder data/coco); make or fetch it before training")
    raw["data"] = {"type": "mixture", "parts": [{"type": "digits_captions"}, {"type": "image_captions", "path": "nope.jsonl"}]}
    assert the_problem(raw).where == "data" and the_problem(raw).field == "parts[1].path"
    raw["data"] = {"type": "image_captions", "path": "nope.jsonl"}  # a card's recipe rebuilt to generate needs no data
    check_recipe(raw, "card", for_training=False)


def test_fsdd_root_and_dreambooth_folders(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    raw = load_yaml(REPO / "recipes" / "mini" / "audio-qformer.yaml")
    monkeypatch.setenv("MMADAPT_FSDD", str(tmp_path / "fsdd"))
    raw["val_data"] = None
    assert the_problem(raw) == Problem("data", "root", f"FSDD not found at {tmp_path / 'fsdd'} (no recordings/ folder); pass root:, "
                                       "set MMADAPT_FSDD, or fetch it with `mmadapt data fsdd DIR` (the place named by $MMADAPT_FSDD)")
    raw = variant(PERSONALIZE)
    raw["data"]["instance_dir"] = "examples/slanted-digtis"
    assert the_problem(raw) == Problem("data", "instance_dir", f"no such folder: examples/slanted-digtis (relative paths start at "
                                                               f"the current folder, {Path.cwd()})")
    raw["data"].update(instance_dir=str(tmp_path), class_dir=str(REPO / "README.md"))
    assert problems_of(raw) == [
        Problem("data", "instance_dir", f"{tmp_path} has 0 image(s) (.png, .jpg, .jpeg, .webp, .bmp); personalization needs at least 3"),
        Problem("data", "class_dir", f"{REPO / 'README.md'} is a file; class images are generated into this folder")]


def test_from_card_names_a_card_holding_that_node(tmp_path: Path) -> None:
    card = str(REPO / "demos" / "cards" / "mini-qformer")
    raw = variant(QFORMER)
    raw["graph"]["qformer"]["from_card"] = card
    check_recipe(raw, "ok.yaml")
    raw["graph"]["qformer"]["from_card"] = {"card": card, "node": "projector"}
    assert the_problem(raw) == Problem("graph.qformer", "from_card", f"{card} has no trained node 'projector'; it holds: qformer")
    raw["graph"]["qformer"]["from_card"] = str(tmp_path)
    assert the_problem(raw).message == f"{tmp_path}: not a bridge card (missing bridge.safetensors, recipe.yaml, card.json)"
    raw["graph"]["qformer"]["from_card"] = str(tmp_path / "card")
    assert the_problem(raw) == Problem("graph.qformer", "from_card", f"no such folder: {tmp_path / 'card'}")


def test_checkpoints_and_tokenizers_local_zoo_or_hub() -> None:
    raw = tiny_recipe()
    raw["graph"]["llm"]["tokenizer"] = "./digits-tokenizer"  # looks local: must be here
    assert the_problem(raw).message.startswith("no such file or folder: ./digits-tokenizer")
    raw["graph"]["llm"]["tokenizer"] = "no-such-org/no-such-tokenizer"  # a hub id, offline and not cached: a note
    assert notes_of(raw) == ["graph.llm.tokenizer: hub id 'no-such-org/no-such-tokenizer' is not in the local cache and "
                             "HF_HUB_OFFLINE=1: it loads where the hub is reachable"]
    raw["graph"]["llm"]["tokenizer"] = "not a/hub id"
    assert the_problem(raw).message.startswith("'not a/hub id' is neither a local path nor a valid hub id")
    raw = variant(PERSONALIZE)
    raw["graph"]["sd"]["checkpoint"] = "zoo:digits-sdd"
    assert the_problem(raw) == Problem("graph.sd", "checkpoint", "'zoo:digits-sdd' is not in the miniature zoo; members: digits-clip, "
                                                                 "digits-dit, digits-lm, digits-points, digits-sd, fsdd-audiomae")
    raw = variant(QFORMER)
    raw["graph"]["llm"]["checkpoint"] = "mmadapt/zoo/digits-llm"  # two slashes: a path
    assert Problem("graph.llm", "checkpoint", f"no such file or folder: mmadapt/zoo/digits-llm (relative paths start at the current "
                                              f"folder, {Path.cwd()})") in problems_of(raw)
    raw = variant(QFORMER)
    raw["graph"]["qformer"]["init_from"] = "./blip2"
    assert the_problem(raw).field == "init_from"


def test_adapter_targets_exist_in_the_base_built_on_the_meta_device() -> None:
    raw = variant(QFORMER)
    raw["graph"]["llm"]["adapters"] = [{"type": "lora", "r": 4, "target_modules": ["q_proj", "v_projj"]}]
    assert the_problem(raw) == Problem("graph.llm.adapters[0]", "target_modules", "'v_projj' matches no module of llm.model "
                                       "(LlamaForCausalLM); its modules end in: embed_tokens, q_proj, k_proj, v_proj, o_proj, "
                                       "gate_proj, up_proj, down_proj, input_layernorm, post_attention_layernorm")
    raw["graph"]["llm"]["adapters"] = [{"type": "lokr", "r": 4}]  # none named: peft's defaults for llama (q_proj, v_proj) exist
    check_recipe(raw, "ok.yaml")
    raw = variant(QFORMER)  # open_clip's tower has no model type peft knows, and the node names no defaults
    raw["graph"]["vision"]["adapters"] = [{"type": "lora", "r": 4}]
    assert the_problem(raw).message.startswith("not given, and neither the node nor peft names defaults for vision.visual "
                                               "(VisionTransformer) (model type unknown); name some of its modules, e.g. conv1")
    raw = variant(PERSONALIZE)  # the node's defaults for its U-Net and text encoder exist
    raw["graph"]["sd"]["adapters"] = [{"type": "lokr", "r": 4}, {"type": "lora", "r": 4, "target": "text_encoder"}]
    check_recipe(raw, "ok.yaml")
    raw["graph"]["sd"]["adapters"] = [{"type": "lora", "r": 4, "target": "text_encodr"},
                                      {"type": "lora", "r": 4, "target": "text_encoder", "target_modules": ["to_q"]}]
    assert problems_of(raw) == [
        Problem("graph.sd.adapters[0]", "target", "'sd' has no inner model 'text_encodr' to adapt; it has: unet, vae, text_encoder"),
        Problem("graph.sd.adapters[1]", "target_modules", "'to_q' matches no module of sd.text_encoder (CLIPTextModel); its modules "
                "end in: token_embedding, position_embedding, k_proj, v_proj, q_proj, out_proj, layer_norm1, fc1, fc2, layer_norm2")]
