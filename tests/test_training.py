"""The training loop: exact resume, cache equivalence and invalidation, atomic saves, NaN stops, bad data."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from conftest import tiny_recipe
from mmadapt.errors import DataError, TrainingError
from mmadapt.training.trainer import Trainer, latest_checkpoint
from mmadapt.core.validate import check_recipe


def trainer_for(raw: dict) -> Trainer:
    recipe, plan = check_recipe(raw, "test")
    return Trainer(recipe, plan)


def losses(run_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


class Interrupt(Exception):
    pass


def test_resume_gives_the_same_losses_as_an_uninterrupted_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = {"steps": 6, "save_every": 2, "grad_accum": 2, "cache_dir": str(tmp_path / "cache")}
    whole = tiny_recipe("qformer", output_dir=str(tmp_path / "whole"), **settings)
    whole["data"]["style"] = "varied"  # captions drawn from the RNG: resume must restore it
    trainer_for(whole).train()
    split = dict(whole, train=dict(whole["train"], output_dir=str(tmp_path / "split")))
    original_log = Trainer._log

    def log_then_die(self: Trainer, record: dict) -> None:
        original_log(self, record)
        if record.get("step") == 5 and "loss" in record:
            raise Interrupt  # killed after step 5, whose checkpoint (step 4) is the last one on disk

    monkeypatch.setattr(Trainer, "_log", log_then_die)
    with pytest.raises(Interrupt):
        trainer_for(split).train()
    monkeypatch.setattr(Trainer, "_log", original_log)
    assert latest_checkpoint(tmp_path / "split").name == "step-0000004"
    trainer_for(split).train(resume=True)
    expected, resumed = losses(tmp_path / "whole"), losses(tmp_path / "split")
    assert sorted(resumed) == list(range(1, 7))
    for step in range(1, 7):
        assert resumed[step] == pytest.approx(expected[step], abs=1e-6), f"step {step}"
    whole_card = (tmp_path / "whole" / "card" / "bridge.safetensors").read_bytes()
    from safetensors.torch import load_file

    a, b = load_file(str(tmp_path / "whole" / "card" / "bridge.safetensors")), load_file(str(tmp_path / "split" / "card" / "bridge.safetensors"))
    assert whole_card and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert (tmp_path / "whole" / "loss.png").stat().st_size > 1000
    assert len(list((tmp_path / "whole" / "checkpoints").glob("step-*"))) == 2  # keep_checkpoints


def test_cache_gives_the_same_losses_and_is_reused(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    base = tiny_recipe("mlp_projector", steps=4, cache_dir=str(tmp_path / "cache"))
    base["data"]["style"] = "fixed"
    without = dict(base, train=dict(base["train"], output_dir=str(tmp_path / "plain")))
    with_cache = dict(base, train=dict(base["train"], output_dir=str(tmp_path / "cached"), cache_frozen_features=True))
    trainer_for(without).train()
    first = trainer_for(with_cache)
    assert first.cache is not None and first.cache.nodes == ["vision"]
    entries = list((tmp_path / "cache").rglob("*.safetensors"))
    assert len(entries) == 32  # one per training sample
    first.train()
    for step, loss in losses(tmp_path / "plain").items():
        assert losses(tmp_path / "cached")[step] == pytest.approx(loss, abs=1e-5)
    import logging

    with caplog.at_level(logging.INFO, logger="mmadapt.training.trainer"):
        trainer_for(with_cache)
    assert "built 0, reused 32" in caplog.text


def test_cache_key_changes_with_layer_weights_and_file(tmp_path: Path) -> None:
    from mmadapt.training.cache import FeatureCache
    from conftest import build

    raw = tiny_recipe("mlp_projector")
    digests = set()
    for layer, seed in ((-2, 0), (-1, 0), (-2, 1)):
        raw["graph"]["vision"].update(layer=layer, seed=seed)
        model = build(raw)
        digests.add(FeatureCache(tmp_path, model, ["vision"]).dirs["vision"].name)
    assert len(digests) == 3  # a different layer or different weights is a different cache
    from mmadapt.data.captions import file_key

    image = tmp_path / "a.png"
    Image.new("RGB", (8, 8), "white").save(image)
    before = file_key(image)
    Image.new("RGB", (8, 8), "black").save(image)
    assert file_key(image) != before  # same path, new content: a new entry


def test_a_crash_during_save_leaves_the_previous_checkpoint_loadable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import mmadapt.core.card as card_module

    raw = tiny_recipe("linear_projector", steps=4, save_every=2, output_dir=str(tmp_path / "run"))
    trainer = trainer_for(raw)
    original = card_module.save_file
    calls = {"n": 0}

    def failing_save(*args: object, **kwargs: object) -> None:
        calls["n"] += 1
        if calls["n"] == 2:  # the second checkpoint dies half-written
            raise OSError("disk full")
        original(*args, **kwargs)

    monkeypatch.setattr(card_module, "save_file", failing_save)
    with pytest.raises(OSError):
        trainer.train()
    folders = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert folders == ["step-0000002"]  # no half-written folder is left, the previous one is intact
    monkeypatch.setattr(card_module, "save_file", original)
    resumed = trainer_for(raw)
    assert resumed.resume()[0] == 2


def test_nan_loss_stops_with_a_message_and_keeps_the_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    raw = tiny_recipe("linear_projector", steps=5, save_every=2, output_dir=str(tmp_path / "run"))
    trainer = trainer_for(raw)
    decoder = trainer.model.generator
    original = type(decoder).forward
    calls = {"n": 0}

    def poisoned(self: object, *args: object, **kwargs: object) -> dict:
        calls["n"] += 1
        out = original(self, *args, **kwargs)
        return dict(out, loss=out["loss"] * float("nan")) if calls["n"] == 3 else out

    monkeypatch.setattr(type(decoder), "forward", poisoned)
    with pytest.raises(TrainingError, match=r"step 3: the loss is nan; training stopped. Last good checkpoint: .*step-0000002"):
        trainer.train()


def test_bad_images_are_skipped_and_counted_or_fail_fast(tmp_path: Path) -> None:
    rows = []
    for index in range(9):
        path = tmp_path / f"img{index}.png"
        if index == 4:
            path.write_bytes(b"not an image")
        else:
            Image.new("RGB", (16, 16), (index * 20, 0, 0)).save(path)
        rows.append({"image": path.name, "text": f"a picture number {index}"})
    (tmp_path / "data.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    raw = tiny_recipe("linear_projector", steps=3, batch_size=3, max_bad_fraction=0.2, output_dir=str(tmp_path / "run"))
    raw["data"] = {"type": "image_captions", "path": str(tmp_path / "data.jsonl")}
    raw.pop("val_data")
    trainer = trainer_for(raw)
    trainer.train()
    assert len(trainer.bad_samples) == 1
    assert "img4.png: not a readable image" in trainer.bad_samples.messages[0]
    raw["train"]["skip_bad_samples"] = False
    with pytest.raises(DataError, match="img4.png: not a readable image"):
        trainer_for(raw).train()


def test_a_batch_of_images_is_preprocessed_in_one_call_equal_to_one_at_a_time(tmp_path: Path) -> None:
    """The collator hands an image encoder the whole batch (one image-processor call); each tensor is bit-identical
    to preprocessing its image alone, and a bad file still fails alone, in its place."""
    import numpy as np

    from conftest import build

    model = build(tiny_recipe("qformer"))
    encoder = model.nodes["vision"]
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (20 + 4 * i, 24, 3), dtype=np.uint8)) for i in range(4)]
    (tmp_path / "bad.png").write_bytes(b"not an image")
    calls = []
    processor = encoder.processor
    encoder.processor = lambda **kwargs: calls.append(len(kwargs["images"])) or processor(**kwargs)
    results = encoder.preprocess_batch([images[0], images[1], tmp_path / "bad.png", images[2], images[3]])
    encoder.processor = processor
    assert calls == [4]  # the four good images, in one call
    assert isinstance(results[2], DataError) and "bad.png: not a readable image" in str(results[2])
    for image, tensor in zip(images, results[:2] + results[3:]):
        assert torch.equal(tensor, encoder.preprocess(image))


def test_malformed_data_file_names_file_and_line(tmp_path: Path) -> None:
    from mmadapt.data.captions import ImageCaptionDataset

    (tmp_path / "d.jsonl").write_text('{"image": "a.png", "text": "x"}\n{"image": "b.png"\n')
    with pytest.raises(DataError, match=r"d.jsonl:2: not valid JSON"):
        ImageCaptionDataset(str(tmp_path / "d.jsonl"))
    (tmp_path / "d.csv").write_text("image,caption\na.png,x\n")
    with pytest.raises(DataError, match=r"d.csv:2: each row needs 'image' and 'text'"):
        ImageCaptionDataset(str(tmp_path / "d.csv"))


def test_a_dataset_with_no_readable_image_stops_with_a_message(tmp_path: Path) -> None:
    (tmp_path / "data.jsonl").write_text("\n".join(json.dumps({"image": f"missing{i}.png", "text": "x"}) for i in range(6)))
    # At 1.0 the bad-data ceiling never stops a run, so this guard is the one left (below it, the ceiling stops first).
    raw = tiny_recipe("linear_projector", steps=2, batch_size=3, max_bad_fraction=1.0, output_dir=str(tmp_path / "run"))
    raw["data"] = {"type": "image_captions", "path": str(tmp_path / "data.jsonl")}
    raw.pop("val_data")
    with pytest.raises(DataError, match=r"no readable sample in a whole epoch.*missing\d.png: not a readable image"):
        trainer_for(raw).train()


# --- the ceiling on bad data (train.max_bad_fraction) ---
def image_data(folder: Path, count: int, bad: set[int]) -> dict:
    """An image_captions section of `count` rows; the rows in `bad` point at files that are not images."""
    rows = []
    for index in range(count):
        path = folder / f"img{index}.png"
        if index in bad:
            path.write_bytes(b"not an image")
        else:
            Image.new("RGB", (16, 16), (index * 10, 0, 0)).save(path)
        rows.append({"image": path.name, "text": f"a picture number {index}"})
    (folder / "data.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    return {"type": "image_captions", "path": str(folder / "data.jsonl")}


def epoch_order(count: int, seed: int = 0) -> list[int]:
    """The order the first epoch deals the samples in, on one process."""
    from mmadapt.training.trainer import EpochSampler

    return EpochSampler(count, seed, epoch=0, rank=0, world=1).indices


def test_past_the_bad_data_ceiling_the_cli_exits_2_before_any_step(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import yaml

    from mmadapt.cli import main

    count, batch_size = 10, 3
    bad = {0, 2, 3, 5, 7, 8}  # 60% unreadable, against the default ceiling of 5%
    raw = tiny_recipe("linear_projector", steps=4, batch_size=batch_size, output_dir=str(tmp_path / "run"))
    raw["data"] = image_data(tmp_path, count, bad)
    raw.pop("val_data")
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(raw))
    assert main(["train", str(tmp_path / "recipe.yaml")]) == 2
    error = capsys.readouterr().err
    # Checked batch by batch: the run stops in the first batch that holds a bad sample (0.05 x 10 allows none).
    order = epoch_order(count)
    first_batch = next(order[i: i + batch_size] for i in range(0, count, batch_size) if bad & set(order[i: i + batch_size]))
    met = [i for i in first_batch if i in bad]
    assert f"{len(met)} of the {count} training samples ({len(met) / count:.1%}) are unreadable" in error, error
    assert "train.max_bad_fraction = 0.05 (at most 0 of 10)" in error
    assert f"skipped {len(met)} bad-sample occurrences from {len(met)} distinct files" in error
    assert f"img{met[0]}.png: not a readable image" in error
    assert "Fix or remove those files, or raise train.max_bad_fraction" in error and "Traceback" not in error
    assert not (tmp_path / "run" / "metrics.jsonl").read_text()  # no step was trained
    assert not (tmp_path / "run" / "card").exists()


def test_the_run_stops_as_soon_as_the_ceiling_is_passed_and_keeps_its_checkpoint(tmp_path: Path) -> None:
    count, batch_size = 20, 2
    order = epoch_order(count)
    bad = {order[5], order[9]}  # met in batches 3 and 5 of the first epoch; 0.05 x 20 allows one
    raw = tiny_recipe("linear_projector", steps=20, batch_size=batch_size, save_every=1, output_dir=str(tmp_path / "run"))
    raw["data"] = image_data(tmp_path, count, bad)
    raw.pop("val_data")
    stop_step = 9 // batch_size + 1  # the step that would train on the batch holding the second bad sample
    with pytest.raises(TrainingError) as info:
        trainer_for(raw).train()
    message = str(info.value)
    assert f"2 of the {count} training samples (10.0%) are unreadable" in message
    assert "skipped 2 bad-sample occurrences from 2 distinct files" in message
    assert all(f"img{order[i]}.png: not a readable image" in message for i in (5, 9))
    assert message.endswith(f"step-{stop_step - 1:07d}")  # the last good checkpoint, named and intact
    assert latest_checkpoint(tmp_path / "run").name == f"step-{stop_step - 1:07d}"
    assert max(losses(tmp_path / "run")) == stop_step - 1


@pytest.mark.parametrize("cached", [False, True])
def test_below_the_ceiling_the_summary_counts_distinct_files_and_occurrences(tmp_path: Path, cached: bool, caplog: pytest.LogCaptureFixture) -> None:
    count, batch_size, epochs = 8, 4, 3
    bad = {2, 5}
    raw = tiny_recipe("linear_projector", steps=epochs * count // batch_size, batch_size=batch_size, max_bad_fraction=0.3,
                      cache_frozen_features=cached, cache_dir=str(tmp_path / "cache"), output_dir=str(tmp_path / "run"))
    raw["data"] = image_data(tmp_path, count, bad)
    raw.pop("val_data")
    with caplog.at_level("WARNING", logger="mmadapt.training.trainer"):
        trainer = trainer_for(raw)
        trainer.train()
    # Every sample is dealt once an epoch (8 divides into batches of 4); the cache build meets each bad one once more.
    occurrences = len(bad) * (epochs + cached)
    assert len(trainer.bad_samples) == len(bad) and trainer.bad_samples.occurrences == occurrences
    summary = next(r.getMessage() for r in caplog.records if "bad-sample occurrences" in r.getMessage())
    assert f"training data: skipped {occurrences} bad-sample occurrences from {len(bad)} distinct files; first: " in summary
    # The reason is the file's own, even where training met it as a missing cache entry.
    assert summary.count("not a readable image") == len(bad) and "no cache entry" not in summary


def test_a_card_export_that_fails_loses_no_training(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The final card's stock exports fail: the run says so and where the trained tensors are (the last checkpoint,
    which carries no exports), and --resume writes the card without another step."""
    from typing import Any

    from safetensors.torch import load_file

    from mmadapt.generators.causal_lm import CausalLM

    raw = tiny_recipe("qformer", output_dir=str(tmp_path / "run"), steps=3, save_every=0)
    original = CausalLM.export

    def failing(self: CausalLM, model: Any, folder: Path) -> list[str]:
        raise RuntimeError("disk full")

    monkeypatch.setattr(CausalLM, "export", failing)
    trainer = trainer_for(raw)
    with pytest.raises(TrainingError, match=r"training finished, but writing the card to .*card failed \(RuntimeError: disk full\); "
                                            r"the trained tensors and the optimizer state are in .*step-0000003"):
        trainer.train()
    trained = {k: p.detach().clone() for k, p in trainer.model.trainable_parameters().items()}
    assert not (tmp_path / "run" / "card").exists()
    monkeypatch.setattr(CausalLM, "export", original)
    again = trainer_for(raw)
    again.train(resume=True)
    assert len(losses(tmp_path / "run")) == 3  # no step trained twice
    card = load_file(str(tmp_path / "run" / "card" / "bridge.safetensors"))
    assert all(torch.equal(card[k], v) for k, v in trained.items())
