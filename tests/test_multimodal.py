"""One graph, several modalities: mixed batches, prompt markers, and a bridge loaded from another modality's card."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import TINY_LMS, TINY_VISION, build
from mmadapt.generators.causal_lm import IGNORE_INDEX, CausalLM
from mmadapt.errors import MMAdaptError, RecipeError
from mmadapt.core.nodes import RowTokens

TINY_POINTS = dict(trans_dim=32, depth=1, num_heads=2, num_group=8, group_size=8, encoder_dims=24, pointnet_widths=[16, 32, 40],
                   pos_hidden=16, num_points=64)
IMAGE_PROMPT = "<image>Question: What does it show? Answer:"
POINTS_PROMPT = "<points>Question: What does it show? Answer:"


def joint_recipe(tmp_path: Path, **train: object) -> dict:
    """A tiny CLIP tower and a tiny Point-BERT, a projector each, one LM; digits as images and as point clouds, mixed."""
    return {"name": "tiny-joint", "graph": {
        "vision": {"type": "hf_vision", "config": dict(TINY_VISION)},
        "points": {"type": "point_bert", "config": dict(TINY_POINTS)},
        "image_bridge": {"type": "linear_projector", "inputs": {"x": "vision"}},
        "points_bridge": {"type": "linear_projector", "inputs": {"x": "points"}},
        "llm": {"type": "causal_lm", "config": dict(TINY_LMS["llama"]), "tokenizer": "bytes",
                "markers": {"image_bridge": "<image>", "points_bridge": "<points>"},
                "inputs": {"prefix_embeds": ["image_bridge", "points_bridge"]}}},
        "data": {"type": "mixture", "parts": [
            {"type": "digits_captions", "split": "train", "limit": 6, "style": "fixed", "template": "raw", "prompt": IMAGE_PROMPT},
            {"type": "digits_points", "split": "train", "limit": 6, "style": "fixed", "template": "raw", "prompt": POINTS_PROMPT}]},
        "train": {"lr": 1e-2, "batch_size": 4, "steps": 3, "log_every": 1, "output_dir": str(tmp_path / "run"), **train}}


def test_row_tokens_at_the_default_place_equal_the_batched_prefix() -> None:
    decoder = CausalLM(config=TINY_LMS["llama"], tokenizer="bytes", seed=1, prefix_after_bos=True).eval()
    batch = decoder.collate([decoder.prepare({"prompt": p, "target": t}, 64) for p, t in [("Question: odd? Answer:", " yes"), ("", "two")]])
    prefix = torch.randn(2, 3, decoder.embed_dim)  # (B, P, D)
    batched = decoder(prefix_embeds=prefix, **batch)
    per_row = decoder(prefix_embeds=RowTokens([[("a", prefix[0])], [("a", prefix[1])]]), **batch)
    assert torch.allclose(batched["loss"], per_row["loss"], atol=1e-6)


def test_markers_put_each_source_where_the_prompt_says_and_rows_without_tokens_keep_their_text() -> None:
    decoder = CausalLM(config=TINY_LMS["llama"], tokenizer="bytes", seed=1, markers={"img": "<image>", "pts": "<points>"}).eval()
    bos = len(decoder.encode_marked("")[0])  # 0: the byte tokenizer has no bos
    ids, positions = decoder.encode_marked("ab<points>cd")
    assert positions == {"pts": [bos + 2]} and ids == decoder.encode_marked("abcd")[0]  # after 'ab'; the marker text removed
    rows = [decoder.prepare({"prompt": "ab<points>cd", "target": "x"}, 64), decoder.prepare({"prompt": "<image>cd", "target": "x"}, 64),
            decoder.prepare({"prompt": "cd", "target": "x"}, 64)]
    batch = decoder.collate(rows)
    assert batch["marker_positions"].tolist() == [[[-1], [bos + 2]], [[bos], [-1]], [[-1], [-1]]]  # (B, markers, occurrences)
    img, pts = torch.randn(2, decoder.embed_dim), torch.randn(3, decoder.embed_dim)
    with torch.no_grad():  # every position's logits: a full forward
        out = decoder(prefix_embeds=RowTokens([[("pts", pts)], [("img", img)], []]), **batch)
    embeds = decoder.embed(batch["input_ids"])
    n = [int(m.sum()) for m in batch["attention_mask"]]  # prompt + target + eos per row
    by_hand = [torch.cat([embeds[0, : bos + 2], pts, embeds[0, bos + 2: n[0]]]), torch.cat([embeds[1, :bos], img, embeds[1, bos: n[1]]]),
               embeds[2, : n[2]]]
    for row, expected in enumerate(by_hand):  # the LM's own logits on the hand-built sequence match row by row
        alone = decoder.model(inputs_embeds=expected[None]).logits[0]
        assert torch.allclose(out["logits"][row, : len(expected)], alone, atol=1e-5)
    loss_rows = decoder._splice_rows(embeds, batch["attention_mask"], batch["labels"], RowTokens([[("pts", pts)], [("img", img)], []]),
                                     batch["marker_positions"])[2]
    assert (loss_rows[0, : bos + 4 + 3] == IGNORE_INDEX).all() and loss_rows[0, bos + 4 + 3] != IGNORE_INDEX  # prompt + tokens unscored
    assert (loss_rows[1, : bos + 2 + 2] == IGNORE_INDEX).all() and loss_rows[1, bos + 2 + 2] != IGNORE_INDEX


def test_mixed_batches_train_each_bridge_on_its_own_rows_and_the_cache_gives_the_same_losses(tmp_path: Path) -> None:
    from mmadapt.training.trainer import Trainer
    from mmadapt.core.validate import check_recipe

    losses = {}
    for cached in (False, True):
        raw = joint_recipe(tmp_path / str(cached), cache_frozen_features=cached, cache_dir=str(tmp_path / "cache"))
        trainer = Trainer(*check_recipe(raw, "test"))
        nodes = trainer.model.nodes
        frozen = {k: v.clone() for k, v in list(nodes["vision"].state_dict().items()) + list(nodes["points"].state_dict().items())}
        bridges = {n: {k: v.clone() for k, v in nodes[n].state_dict().items()} for n in ("image_bridge", "points_bridge")}
        trainer.train()
        after = {**nodes["vision"].state_dict(), **nodes["points"].state_dict()}
        assert all(torch.equal(v, after[k]) for k, v in frozen.items())
        for name, before in bridges.items():  # both bridges learned: mixed batches reached both
            assert any(not torch.equal(v, nodes[name].state_dict()[k]) for k, v in before.items()), name
        records = [json.loads(line) for line in (tmp_path / str(cached) / "run" / "metrics.jsonl").read_text().splitlines()]
        losses[cached] = [r["loss"] for r in records if "loss" in r]
    assert len(list((tmp_path / "cache").rglob("*.safetensors"))) == 12  # 6 images for the tower, 6 clouds for Point-BERT
    assert losses[True] == pytest.approx(losses[False], abs=1e-5)


def test_a_mixed_batch_gives_each_row_the_loss_it_has_alone(tmp_path: Path) -> None:
    from mmadapt.data.collate import collator_for, build_dataset

    model = build(joint_recipe(tmp_path)).eval()
    dataset = build_dataset(model.recipe.data)
    samples = [dataset[0], dataset[7], dataset[1]]  # image, points, image
    assert samples[1]["fields_absent"] == ["image"] and samples[0]["fields_absent"] == ["points"]
    collate = collator_for(model, max_tokens=64)
    mixed = collate(samples)
    assert mixed["rows"] == {"vision": [0, 2], "points": [1]}
    with torch.no_grad():
        logits = model(mixed)["logits"]
        for row, sample in enumerate(samples):
            alone = model(collate([sample]))["logits"][0]
            assert torch.allclose(logits[row, : alone.shape[0]], alone, atol=1e-5)


def test_a_bridge_from_another_cards_graph_loads_beside_a_new_one(tmp_path: Path) -> None:
    from mmadapt.training.trainer import Trainer
    from mmadapt.core.validate import check_recipe

    single = joint_recipe(tmp_path / "points-only")
    single["graph"] = {k: v for k, v in single["graph"].items() if k in ("points", "points_bridge", "llm")}
    single["graph"]["llm"].update(inputs={"prefix_embeds": "points_bridge"}, markers={"points_bridge": "<points>"})
    single["data"] = single["data"]["parts"][1]
    card = Trainer(*check_recipe(single, "test")).train()
    trained = load_file(str(Path(card) / "bridge.safetensors"))

    joint = joint_recipe(tmp_path / "joint")
    joint["graph"]["points_bridge"].update(from_card=str(card), trainable=False)
    model = build(joint)
    assert all(torch.equal(p, trained[f"points_bridge.{k}"]) for k, p in model.nodes["points_bridge"].named_parameters())
    assert not any(p.requires_grad for p in model.nodes["points_bridge"].parameters())
    assert set(model.trainable_parameters()) == {"image_bridge.proj.weight", "image_bridge.proj.bias"}

    joint["graph"]["points_bridge"]["from_card"] = {"card": str(card), "node": "qformer"}
    with pytest.raises(RecipeError, match="graph.points_bridge.from_card.*has no trained node 'qformer'; it holds: points_bridge"):
        build(joint)
    joint["graph"]["points_bridge"]["from_card"] = str(card)
    joint["graph"]["points"]["config"] = {**TINY_POINTS, "depth": 2}
    with pytest.raises(RecipeError, match="was not trained on this graph's 'points'"):
        build(joint)


def test_a_card_that_started_from_another_card_loads_without_it_unless_it_keeps_that_bridge_frozen(tmp_path: Path) -> None:
    import shutil

    from mmadapt.core.card import save_card
    from mmadapt.serve.inference import load_card
    from mmadapt.training.trainer import Trainer
    from mmadapt.core.validate import check_recipe

    single = joint_recipe(tmp_path / "points-only")
    single["graph"] = {k: v for k, v in single["graph"].items() if k in ("points", "points_bridge", "llm")}
    single["graph"]["llm"].update(inputs={"prefix_embeds": "points_bridge"}, markers={"points_bridge": "<points>"})
    single["data"] = single["data"]["parts"][1]
    source = Path(Trainer(*check_recipe(single, "test")).train())
    further = dict(single, train={**single["train"], "output_dir": str(tmp_path / "further")})
    further["graph"] = {**single["graph"], "points_bridge": {**single["graph"]["points_bridge"], "from_card": str(source)}}
    trained_further = Path(Trainer(*check_recipe(further, "test")).train())  # stage 2: the bridge trains on
    frozen = joint_recipe(tmp_path / "joint")
    frozen["graph"]["points_bridge"].update(from_card=str(source), trainable=False)
    kept_frozen = save_card(build(frozen), tmp_path / "frozen-card")
    shutil.move(source, tmp_path / "moved")  # the stage-1 card is gone (another machine, another folder)

    model = load_card(trained_further)  # its own tensors for that bridge: where it started is not needed
    stored = load_file(str(trained_further / "bridge.safetensors"))
    assert all(torch.equal(p, stored[f"points_bridge.{k}"]) for k, p in model.nodes["points_bridge"].named_parameters())
    with pytest.raises(RecipeError, match="graph.points_bridge.from_card"):  # a frozen bridge lives only in its source card
        load_card(kept_frozen)


def test_inference_skips_modalities_a_sample_lacks_but_refuses_a_sample_with_none(tmp_path: Path) -> None:
    from mmadapt.data.collate import build_dataset
    from mmadapt.serve.inference import generate_for_samples

    model = build(joint_recipe(tmp_path)).eval()
    points_sample = build_dataset(model.recipe.data["parts"][1])[0]
    assert "fields_absent" not in points_sample
    (text,) = generate_for_samples(model, [points_sample], POINTS_PROMPT, max_new_tokens=3)
    assert isinstance(text, str)
    with pytest.raises(MMAdaptError, match=r"carries none of the fields the card's encoders read \(image, points\)"):
        generate_for_samples(model, [{"text": "x", "key": "k", "id": 0}], "Question: ?", max_new_tokens=3)


def test_a_marker_places_the_tokens_of_a_graph_with_one_bridge_mid_prompt(tmp_path: Path) -> None:
    """With every row carrying the modality the bridge's output is a plain (B, P, D) batch; it still goes where the marker stood."""
    from mmadapt.data.collate import collator_for, build_dataset

    raw = joint_recipe(tmp_path)
    del raw["graph"]["points"], raw["graph"]["points_bridge"]
    raw["graph"]["llm"].update(inputs={"prefix_embeds": "image_bridge"}, markers={"image_bridge": "<image>"})
    raw["data"] = {"type": "digits_captions", "split": "train", "limit": 2, "style": "fixed", "template": "raw", "prompt": "Look: <image> Answer:"}
    model = build(raw).eval()
    batch = collator_for(model, max_tokens=64)([build_dataset(model.recipe.data)[i] for i in range(2)])
    assert "rows" not in batch and batch["node_inputs"]["llm"]["marker_positions"].tolist() == [[[6]], [[6]]]  # after "Look: "
    with torch.no_grad():
        logits = model(batch)["logits"]
        tokens = model.run_nodes(batch, until_generator=True)["image_bridge"]  # (B, P, D)
        inputs = batch["node_inputs"]["llm"]
        embeds = model.generator.embed(inputs["input_ids"])
        for row in range(2):
            n = int(inputs["attention_mask"][row].sum())
            by_hand = torch.cat([embeds[row, :6], tokens[row], embeds[row, 6:n]])[None]  # the tokens where "<image>" stood
            assert torch.allclose(logits[row, : by_hand.shape[1]], model.generator.model(inputs_embeds=by_hand).logits[0], atol=1e-5)
