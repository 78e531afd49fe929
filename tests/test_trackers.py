"""train.log_with: accelerate's trackers get the numbers metrics.jsonl gets; a tracker whose package is missing is
refused at validate, naming the field."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from conftest import tiny_recipe
from mmadapt.core.validate import check_recipe
from mmadapt.errors import RecipeError
from mmadapt.training.trainer import Trainer


def test_tensorboard_receives_every_logged_loss_beside_metrics_jsonl(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    raw = tiny_recipe("linear_projector", steps=4, output_dir=str(tmp_path / "run"), log_with=["tensorboard"])
    Trainer(*check_recipe(raw, "test")).train()
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    logged = {r["step"]: r["loss"] for r in records if "loss" in r}
    events = sorted((tmp_path / "run" / "trackers").rglob("events.out.tfevents.*"))
    assert events, "no tensorboard event file under the run's trackers/ folder"
    scalars: dict[int, float] = {}
    for path in events:
        accumulator = EventAccumulator(str(path.parent))
        accumulator.Reload()
        if "loss" in accumulator.Tags()["scalars"]:
            scalars.update({e.step: e.value for e in accumulator.Scalars("loss")})
    assert sorted(scalars) == sorted(logged) == [1, 2, 3, 4]
    assert all(scalars[s] == pytest.approx(logged[s], rel=1e-6) for s in logged)  # stored as float32


def test_a_tracker_without_its_package_is_refused_naming_the_field(monkeypatch: pytest.MonkeyPatch) -> None:
    found = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else found(name, *a))
    with pytest.raises(RecipeError, match=r"train.log_with: 'mlflow' needs the mlflow package, which is not installed here"):
        check_recipe(tiny_recipe("linear_projector", log_with=["mlflow"]), "test")
    with pytest.raises(RecipeError, match=r"train.log_with"):
        check_recipe(tiny_recipe("linear_projector", log_with=["comet"]), "test")  # not a tracker accelerate names here


def test_bf16_on_a_cpu_without_bfloat16_units_is_refused_before_loading(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """On such a CPU (this machine's kind: AMD EPYC without AVX512-BF16/AMX) torch emulates bf16 products; train says
    so by field before any model loads, and validate notes it (the real-size bf16 recipes validate anywhere)."""
    import torch

    from mmadapt.core.validate import check_recipe as check

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    raw = tiny_recipe("linear_projector", precision="bf16", output_dir=str(tmp_path / "run"))
    _, plan = check(raw, "test")
    assert any(n.startswith("train.precision: bf16 needs a GPU or a CPU with bfloat16 matrix units") for n in plan.notes)
    with pytest.raises(RecipeError, match=r"train.precision: bf16 needs a GPU or a CPU with bfloat16 matrix units .* use precision: fp32"):
        Trainer(*check(raw, "test"))
    assert not (tmp_path / "run").exists()
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)  # a CPU with AMX: no note
    assert not check(raw, "test")[1].notes
