"""The point-cloud half: FPS/kNN against brute force, the Point-BERT node, checkpoint key maps, files, the 3D digits and zoo member."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import REPO, TINY_LMS, bad_files_are_skipped_then_fail_fast, build, train_recipe
from mmadapt.encoders.point_cloud import (PointBERT, PointBERTBackbone, PointBERTConfig, farthest_point_sample, group_points,
                                          knn_indices)
from mmadapt.errors import DataError, MMAdaptError
from mmadapt.data.points import DigitsPoints, PointCaptionDataset, load_point_cloud, save_ply

TINY_POINTS = dict(trans_dim=32, depth=2, num_heads=2, num_group=8, group_size=8, encoder_dims=24, pointnet_widths=[16, 32, 40],
                   pos_hidden=16, num_points=64)


def tiny_points_recipe(bridge: str = "qformer", **train: object) -> dict:
    graph = {
        "points": {"type": "point_bert", "config": dict(TINY_POINTS)},
        "bridge": {"type": bridge, "inputs": {"context" if bridge == "qformer" else "x": "points"}},
        "llm": {"type": "causal_lm", "config": dict(TINY_LMS["llama"]), "tokenizer": "bytes", "inputs": {"prefix_embeds": "bridge"}},
    }
    if bridge == "qformer":
        graph["bridge"].update(num_queries=4, hidden_size=32, num_layers=1, num_heads=2, cross_attention_every=1)
    settings = {"lr": 1e-2, "batch_size": 4, "steps": 2, "log_every": 1, **train}
    return {"name": "tiny-points", "graph": graph, "data": {"type": "digits_points", "split": "train", "limit": 16, "style": "fixed"},
            "train": settings}


# ---------------------------------------------------------------------------------------------------------------
# Sampling and grouping against plain-Python references


def brute_force_fps(xyz: np.ndarray, count: int) -> list[int]:
    chosen = [0]
    for _ in range(count - 1):
        farthest = max(range(len(xyz)), key=lambda i: (min(float(((xyz[i] - xyz[c]) ** 2).sum()) for c in chosen), -i))
        chosen.append(farthest)
    return chosen


def test_farthest_point_sampling_and_knn_match_brute_force() -> None:
    generator = torch.Generator().manual_seed(3)
    xyz = torch.rand(3, 50, 3, generator=generator)
    picked = farthest_point_sample(xyz, 7)
    for b in range(3):
        assert picked[b].tolist() == brute_force_fps(xyz[b].numpy().astype(np.float64), 7)
    centers = xyz[:, :5]
    neighbours = knn_indices(xyz, centers, 6)
    for b in range(3):
        for g in range(5):
            distances = [float(((xyz[b, i] - centers[b, g]) ** 2).sum()) for i in range(50)]
            assert neighbours[b, g].tolist() == sorted(range(50), key=lambda i: distances[i])[:6]
    groups, found_centers = group_points(torch.cat([xyz, torch.rand(3, 50, 3, generator=generator)], -1), 7, 6)  # xyz + RGB
    assert groups.shape == (3, 7, 6, 6) and found_centers.shape == (3, 7, 3)
    b, g = 1, 4
    index = knn_indices(xyz, found_centers, 6)[b, g]
    assert torch.allclose(groups[b, g, :, :3], xyz[b, index] - found_centers[b, g])  # relative coordinates
    assert torch.equal(found_centers[b], xyz[b, picked[b]])


# ---------------------------------------------------------------------------------------------------------------
# The node


def test_shapes_widths_and_features() -> None:
    clouds = torch.stack([PointBERT(config=TINY_POINTS).preprocess(DigitsPoints(limit=2)[i]["points"]) for i in range(2)])
    assert clouds.shape == (2, 64, 3)
    for feature, keep_cls, shape in (("patch", False, (2, 8, 32)), ("patch", True, (2, 9, 32)), ("pooled", False, (2, 1, 64))):
        encoder = PointBERT(config=TINY_POINTS, feature=feature, keep_cls=keep_cls).eval()
        assert encoder(clouds).shape == shape
        assert PointBERT.config_widths({"config": TINY_POINTS, "feature": feature}) == encoder.widths() == {"output": shape[-1]}
    with pytest.raises(MMAdaptError, match="unknown config key 'num_groups' for PointBERTConfig \\(did you mean 'num_group'\\?\\)"):
        PointBERT(config={**TINY_POINTS, "num_groups": 4})
    with pytest.raises(MMAdaptError, match="must not exceed num_points"):
        PointBERT(config={**TINY_POINTS, "num_group": 100})


def test_frozen_encoder_is_bit_identical_after_training_and_the_cache_gives_the_same_losses(tmp_path: Path) -> None:
    from mmadapt.training.trainer import Trainer
    from mmadapt.core.validate import check_recipe

    losses = {}
    for cached in (False, True):
        raw = tiny_points_recipe(output_dir=str(tmp_path / f"run{cached}"), cache_frozen_features=cached, cache_dir=str(tmp_path / "cache"))
        trainer = Trainer(*check_recipe(raw, "test"))
        encoder = trainer.model.nodes["points"]
        before = {k: v.clone() for k, v in encoder.state_dict().items()}  # BatchNorm running stats included
        bridge_before = {k: v.clone() for k, v in trainer.model.nodes["bridge"].state_dict().items()}
        trainer.train()
        assert all(torch.equal(before[k], v) for k, v in encoder.state_dict().items())
        assert not any(p.requires_grad for p in encoder.parameters())
        assert any(not torch.equal(bridge_before[k], v) for k, v in trainer.model.nodes["bridge"].state_dict().items())
        records = [json.loads(line) for line in (tmp_path / f"run{cached}" / "metrics.jsonl").read_text().splitlines()]
        losses[cached] = [r["loss"] for r in records if "loss" in r]
    assert len(list((tmp_path / "cache").rglob("*.safetensors"))) == 16
    assert losses[True] == pytest.approx(losses[False], abs=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# Checkpoint layouts, written out key by key as Point-BERT's modules name them (not derived from ours)


def point_bert_keys(config: PointBERTConfig) -> dict[str, tuple[int, ...]]:
    """Point-BERT's PointTransformer state dict (models/Point_BERT.py + dvae.Encoder), names and shapes."""
    d, e, (w1, w2, w3), c = config.trans_dim, config.encoder_dims, config.pointnet_widths, config.point_dims
    bn = lambda name, n: {f"{name}.weight": (n,), f"{name}.bias": (n,), f"{name}.running_mean": (n,), f"{name}.running_var": (n,),  # noqa: E731
                          f"{name}.num_batches_tracked": ()}
    keys = {"encoder.first_conv.0.weight": (w1, c, 1), "encoder.first_conv.0.bias": (w1,), **bn("encoder.first_conv.1", w1),
            "encoder.first_conv.3.weight": (w2, w1, 1), "encoder.first_conv.3.bias": (w2,),
            "encoder.second_conv.0.weight": (w3, 2 * w2, 1), "encoder.second_conv.0.bias": (w3,), **bn("encoder.second_conv.1", w3),
            "encoder.second_conv.3.weight": (e, w3, 1), "encoder.second_conv.3.bias": (e,),
            "reduce_dim.weight": (d, e), "reduce_dim.bias": (d,), "cls_token": (1, 1, d), "cls_pos": (1, 1, d),
            "pos_embed.0.weight": (config.pos_hidden, 3), "pos_embed.0.bias": (config.pos_hidden,),
            "pos_embed.2.weight": (d, config.pos_hidden), "pos_embed.2.bias": (d,), "norm.weight": (d,), "norm.bias": (d,)}
    hidden = int(d * config.mlp_ratio)
    for i in range(config.depth):
        keys.update({f"blocks.blocks.{i}.norm1.weight": (d,), f"blocks.blocks.{i}.norm1.bias": (d,),
                     f"blocks.blocks.{i}.attn.qkv.weight": (3 * d, d),  # qkv_bias=False in Point-BERT
                     f"blocks.blocks.{i}.attn.proj.weight": (d, d), f"blocks.blocks.{i}.attn.proj.bias": (d,),
                     f"blocks.blocks.{i}.norm2.weight": (d,), f"blocks.blocks.{i}.norm2.bias": (d,),
                     f"blocks.blocks.{i}.mlp.fc1.weight": (hidden, d), f"blocks.blocks.{i}.mlp.fc1.bias": (hidden,),
                     f"blocks.blocks.{i}.mlp.fc2.weight": (d, hidden), f"blocks.blocks.{i}.mlp.fc2.bias": (d,)})
    return keys


def synthetic(config: PointBERTConfig, seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {k: (torch.randint(0, 9, s, generator=generator) if k.endswith("num_batches_tracked") else torch.rand(s, generator=generator) + 0.5)
            for k, s in point_bert_keys(config).items()}


LAYOUTS = {  # how each project stores the transformer, with the heads and other towers beside it that must be ignored
    "point-bert-pretrain": lambda t, o: {"base_model": {**{f"module.transformer_q.{k}": v for k, v in t.items()},
                                                        **{f"module.transformer_k.{k}": v for k, v in o.items()},
                                                        "module.transformer_q.mask_token": torch.zeros(1, 1, 32),
                                                        "module.transformer_q.lm_head.weight": torch.zeros(5, 32),
                                                        "module.transformer_q.cls_head.0.weight": torch.zeros(4, 32),
                                                        "module.dvae.encoder.first_conv.0.weight": torch.zeros(16, 3, 1)},
                                         "epoch": 300},
    "point-bert-finetuned": lambda t, o: {"base_model": {**{f"module.{k}": v for k, v in t.items()},
                                                         "module.cls_head_finetune.0.weight": torch.zeros(256, 64)}},
    "ulip": lambda t, o: {"state_dict": {**{f"module.point_encoder.{k}": v for k, v in t.items()},
                                         "module.pc_projection": torch.zeros(64, 512), "module.logit_scale": torch.zeros(()),
                                         "module.visual.conv1.weight": torch.zeros(8, 3, 4, 4)}, "epoch": 10},
    "pointllm": lambda t, o: {**{f"model.point_backbone.{k}": v for k, v in t.items()},
                              "model.point_proj.0.weight": torch.zeros(16, 32), "model.embed_tokens.weight": torch.zeros(10, 16)},
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_checkpoint_layouts_load_through_the_key_map(layout: str, tmp_path: Path) -> None:
    config = PointBERTConfig.build(TINY_POINTS, "test")
    tensors, other = synthetic(config, 0), synthetic(config, 1)
    path = tmp_path / "ckpt.pth"
    torch.save(LAYOUTS[layout](tensors, other), path)
    encoder = PointBERT(checkpoint=str(path), config=TINY_POINTS)
    own = encoder.model.state_dict()
    assert len(own) == len(tensors)
    for key, value in tensors.items():
        assert torch.equal(own[key.replace("blocks.blocks.", "blocks.")], value.to(own[key.replace("blocks.blocks.", "blocks.")].dtype)), key
    assert encoder.describe()["source"] == str(path)


def test_checkpoint_that_does_not_fit_names_the_keys(tmp_path: Path) -> None:
    config = PointBERTConfig.build(TINY_POINTS, "test")
    tensors = synthetic(config, 0)
    path = tmp_path / "wide.pth"
    torch.save({"base_model": {f"module.{k}": v for k, v in tensors.items()}}, path)
    with pytest.raises(MMAdaptError, match=r"wide.pth: checkpoint does not fit.*shape \(checkpoint vs config\).*blocks.0.attn.proj.weight \(32, 32\) vs \(48, 48\)"):
        PointBERT(checkpoint=str(path), config={**TINY_POINTS, "trans_dim": 48, "depth": 2})
    del tensors["norm.weight"]
    torch.save({"state_dict": {f"module.point_encoder.{k}": v for k, v in tensors.items()}}, path)
    with pytest.raises(MMAdaptError, match="missing norm.weight"):
        PointBERT(checkpoint=str(path), config=TINY_POINTS)
    torch.save({"state_dict": {"visual.proj": torch.zeros(2)}}, path)
    with pytest.raises(MMAdaptError, match="not a Point-BERT/ULIP checkpoint"):
        PointBERT(checkpoint=str(path), config=TINY_POINTS)


def test_folder_layout_round_trips_and_random_control_differs(tmp_path: Path) -> None:
    from mmadapt.encoders.point_cloud import save_backbone

    original = PointBERTBackbone(PointBERTConfig.build(TINY_POINTS, "test"))
    save_backbone(original, tmp_path / "member")
    loaded = PointBERT(checkpoint=str(tmp_path / "member"))
    assert all(torch.equal(v, loaded.model.state_dict()[k]) for k, v in original.state_dict().items())
    control = PointBERT(checkpoint=str(tmp_path / "member"), load_weights=False)
    assert control.cache_identity()["weights"] != loaded.cache_identity()["weights"]
    assert loaded.cache_identity() != PointBERT(checkpoint=str(tmp_path / "member"), feature="pooled").cache_identity()


# ---------------------------------------------------------------------------------------------------------------
# Files


def test_each_file_format_loads_the_same_points_and_preprocess_normalizes(tmp_path: Path) -> None:
    points = np.random.default_rng(0).normal(size=(100, 3)).astype(np.float32) * 5 + 3
    np.save(tmp_path / "a.npy", points)
    save_ply(tmp_path / "a.ply", points, binary=True)
    save_ply(tmp_path / "b.ply", points, binary=False)
    np.savetxt(tmp_path / "a.xyz", points)
    for name in ("a.npy", "a.ply", "b.ply", "a.xyz"):
        assert np.allclose(load_point_cloud(tmp_path / name), points, atol=1e-5), name
    coloured = np.concatenate([points, np.full((100, 3), 255.0, dtype=np.float32)], axis=1)
    save_ply(tmp_path / "c.ply", coloured)
    assert load_point_cloud(tmp_path / "c.ply").shape == (100, 6)
    encoder = PointBERT(config=TINY_POINTS)
    for source, count in ((tmp_path / "a.ply", 64), (str(tmp_path / "a.npy"), 64)):
        cloud = encoder.preprocess(source)
        assert cloud.shape == (count, 3)
        assert torch.allclose(cloud.norm(dim=-1).max(), torch.tensor(1.0)) or cloud.norm(dim=-1).max() <= 1.0
    few = PointBERT(config={**TINY_POINTS, "num_points": 300}).preprocess(tmp_path / "a.xyz")
    assert few.shape == (300, 3) and torch.unique(few, dim=0).shape[0] == 100  # resampled up: every point kept, some repeated
    assert torch.equal(encoder.preprocess(tmp_path / "a.npy"), encoder.preprocess(tmp_path / "a.npy"))  # deterministic: cacheable
    whole = torch.from_numpy(points - points.mean(0))
    assert torch.allclose(PointBERT(config={**TINY_POINTS, "num_points": 100}).preprocess(tmp_path / "a.npy"), whole / whole.norm(dim=-1).max(), atol=1e-5)
    rgb = PointBERT(config={**TINY_POINTS, "point_dims": 6}).preprocess(tmp_path / "c.ply")
    assert rgb.shape == (64, 6) and torch.allclose(rgb[:, 3:], torch.ones(64, 3))  # 0..255 colours read as 0..1
    with pytest.raises(DataError, match="a.ply: has 3 columns; this encoder reads 6"):
        PointBERT(config={**TINY_POINTS, "point_dims": 6}).preprocess(tmp_path / "a.ply")


def bad_files(folder: Path) -> dict[str, str]:
    """file -> the message it must get."""
    np.save(folder / "empty.npy", np.zeros((0, 3), np.float32))
    nan = np.ones((10, 3), np.float32)
    nan[4, 1] = np.nan
    np.save(folder / "nan.npy", nan)
    np.save(folder / "flat.npy", np.ones(12, np.float32))
    np.save(folder / "objects.npy", np.array([{"x": 1}], dtype=object), allow_pickle=True)
    np.save(folder / "same.npy", np.ones((5, 3), np.float32))
    save_ply(folder / "whole.ply", np.random.default_rng(0).normal(size=(200, 3)).astype(np.float32))
    (folder / "truncated.ply").write_bytes((folder / "whole.ply").read_bytes()[:-1000])
    (folder / "image.ply").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(200))
    (folder / "truncated.xyz").write_text("1 2 3\n4 5 6\n7 8\n")
    (folder / "words.xyz").write_text("a b c\n")
    (folder / "empty.xyz").write_text("")
    (folder / "mesh.obj").write_text("v 1 2 3\n")
    return {"empty.npy": "point cloud is empty", "nan.npy": "1 of 10 points with NaN", "flat.npy": r"must have shape \(N, 3\)",
            "objects.npy": "not a readable .npy array", "same.npy": "all 5 points coincide", "truncated.ply": "not a readable PLY file",
            "image.ply": "not a readable PLY file", "truncated.xyz": "rows have different numbers of columns",
            "words.xyz": ".xyz rows must be numbers", "empty.xyz": "point cloud is empty", "mesh.obj": "expected a point cloud file",
            "missing.npy": "point cloud file not found"}


def test_bad_files_get_one_message_naming_the_file(tmp_path: Path) -> None:
    encoder = PointBERT(config=TINY_POINTS)
    for name, message in bad_files(tmp_path).items():
        with pytest.raises(DataError, match=message) as info:
            encoder.preprocess(tmp_path / name)
        assert str(info.value).startswith(str(tmp_path / name)), info.value
    with pytest.raises(DataError, match=r"point cloud array of shape \(2, 2\): point cloud must have shape"):
        encoder.preprocess(np.zeros((2, 2)))


def test_bad_files_in_a_dataset_are_skipped_and_counted_or_fail_fast(tmp_path: Path) -> None:
    bad_files(tmp_path)
    rng = np.random.default_rng(0)
    rows = []
    for index in range(8):
        np.save(tmp_path / f"good{index}.npy", rng.normal(size=(80, 3)).astype(np.float32))
        rows.append({"points": f"good{index}.npy", "text": f"cloud {index}"})
    rows[2]["points"], rows[5]["points"] = "nan.npy", "truncated.ply"
    (tmp_path / "clouds.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    raw = tiny_points_recipe("linear_projector", steps=2, batch_size=4, output_dir=str(tmp_path / "run"))
    raw["data"] = {"type": "point_captions", "path": str(tmp_path / "clouds.jsonl")}
    bad_files_are_skipped_then_fail_fast(raw, ["nan.npy: point cloud has 1 of 10 points with NaN",
                                               "truncated.ply: not a readable PLY file"])
    with pytest.raises(DataError, match="clouds.jsonl:1: each row needs 'points' and 'text'"):
        (tmp_path / "clouds.jsonl").write_text('{"image": "good0.npy", "text": "x"}\n')
        PointCaptionDataset(str(tmp_path / "clouds.jsonl"))


# ---------------------------------------------------------------------------------------------------------------
# The 3D digits and the zoo member


def test_digits_points_samples_are_fixed_per_position_and_follow_the_digits_split() -> None:
    from mmadapt.data.digits import WORDS, load_digits_arrays, split_indices

    assert len(DigitsPoints(split="test", views=2)) == len(split_indices("test"))  # extra poses are for training only
    data = DigitsPoints(split="train", style="fixed", template="instruction", prompt="What does it show?", views=2)
    assert len(data) == 2 * len(split_indices("train"))
    first, again, other_view = data[0], data[0], data[len(split_indices("train"))]
    assert np.array_equal(first["points"], again["points"]) and first["key"] == again["key"]
    assert first["label"] == other_view["label"] and first["key"] != other_view["key"]
    assert first["points"].shape == (128, 3) and np.isfinite(first["points"]).all()
    assert first["label"] == data.label(0) == int(load_digits_arrays()[1][split_indices("train")[0]])
    assert first["prompt"] == "Question: What does it show? Answer:" and first["target"] == f" a handwritten {WORDS[first['label']]}"
    assert {"points", "prompt", "target", "text", "key", "id", "label"} == set(first) and DigitsPoints.digit_labels
    flat = DigitsPoints(split="test", augment=False, limit=1).cloud(0)
    assert np.abs(flat[:, 2]).max() <= 0.25 and np.abs(flat[:, :2]).max() <= 1.0  # the page, with ink depth, before any pose
    spelled = DigitsPoints(split="test", limit=20, spelled_text="It is a {word} ({number}).")
    assert all(s["spelled_text"] == f"It is a {WORDS[s['label']]} ({s['label']})." for s in (spelled[i] for i in range(20)))
    with pytest.raises(DataError, match=r"spelled_text 'It is a \{wrod\}\.' may name only \{word\} and \{number\}"):
        DigitsPoints(split="test", spelled_text="It is a {wrod}.")


def test_zoo_member_reproduces_its_recorded_linear_probe() -> None:
    from mmadapt.zoo import ZOO_DIR
    from mmadapt.zoo.build.digits_points import linear_probe, load

    recorded = json.loads((ZOO_DIR / "digits-points" / "quality.json").read_text())
    measured = linear_probe(load(ZOO_DIR / "digits-points"))
    assert measured["linear_probe_test"] == pytest.approx(recorded["linear_probe_test"], abs=0.02)
    assert measured["linear_probe_test"] > recorded["linear_probe_test_random_init"] + 0.1  # pretraining, not the architecture
    model = build({"name": "zoo-points", "graph": {
        "points": {"type": "point_bert", "checkpoint": "zoo:digits-points"},
        "proj": {"type": "linear_projector", "inputs": {"x": "points"}},
        "llm": {"type": "causal_lm", "checkpoint": "zoo:digits-lm", "inputs": {"prefix_embeds": "proj"}}},
        "data": {"type": "digits_points", "split": "train", "limit": 4}})
    assert model.plan.bridge_dims["proj"] == {"in_dim": 96, "out_dim": 128}


@pytest.mark.slow
def test_points_recipe_reaches_its_target(tmp_path: Path) -> None:
    """Opt-in (`pytest -m slow`, about 8 min): digits-lm names the digit of at least 90% of the 300 test clouds
    (measured 92.0%; seeds 1 and 2: 91.7%, 91.3%) and answers the zero-shot questions well above chance."""
    from mmadapt.eval.evaluate import evaluate_digits

    figures = evaluate_digits(train_recipe(REPO / "recipes" / "mini" / "points-qformer.yaml", tmp_path).model)
    assert figures["caption_accuracy"] >= 0.90
    assert min(figures["zero_shot"].values()) >= 0.80  # measured 94.0% ("even") and 90.3% ("plus one")
