"""The CLI end to end on the tiny recipe: info's table, train's run directory, generate from the card."""
from __future__ import annotations

import json
from pathlib import Path

from conftest import REPO
from test_validate import run_cli

TINY = str(REPO / "recipes" / "tiny" / "qformer-random.yaml")


def test_info_prints_every_node_with_state_params_and_shapes() -> None:
    result = run_cli("info", TINY)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    table = {line.split()[0]: line for line in lines[2:] if line and not line.startswith("trainable")}
    assert set(table) == {"vision", "qformer", "llm"}
    assert "frozen" in table["vision"] and "pixel_values=(1, 3, 32, 32)" in table["vision"] and "(1, 16, 32)" in table["vision"]
    assert "trainable" in table["qformer"] and "context=(1, 16, 32)" in table["qformer"] and "(1, 4, 48)" in table["qformer"]
    assert "frozen" in table["llm"] and "prefix_embeds=(1, 4, 48)" in table["llm"]
    assert lines[-1] == "trainable parameters: 35,760"


def test_train_then_generate(tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = run_cli("train", TINY, f"train.output_dir={out}", "train.steps=4", "train.save_every=2")
    assert result.returncode == 0, result.stderr[-2000:]
    assert (out / "card" / "bridge.safetensors").is_file() and (out / "loss.png").is_file()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]
    assert any("val_loss" in r for r in records)
    assert "qformer: QFormer, trainable" in result.stderr and "vision: HFVisionTower, frozen" in result.stderr
    from mmadapt.data.digits import DigitsCaptions

    image = tmp_path / "digit.png"
    DigitsCaptions("test")[0]["image"].save(image)
    result = run_cli("generate", str(out / "card"), "--image", str(image), "--max-new-tokens", "4")
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith(f"{image}: ")
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    result = run_cli("generate", str(out / "card"), "--image", str(bad))
    assert result.returncode == 2 and f"{bad}: not a readable image" in result.stderr and "Traceback" not in result.stderr
