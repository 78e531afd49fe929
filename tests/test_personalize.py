"""Personalization on the miniature zoo: `mmadapt personalize` on slanted digits, its card, export and figures."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mmadapt.cli import main
from mmadapt.data.dreambooth import slanted, write_style_examples
from mmadapt.eval.personalization import style_score, unstyle
from mmadapt.eval.referee import read_digits
from test_sd3 import sd3_folder  # noqa: F401
from test_sdxl import sdxl_folder  # noqa: F401


def test_the_style_score_tells_slanted_from_plain_and_the_referee_reads_through_the_slant() -> None:
    from mmadapt.data.digits import digit_image, load_digits_arrays, split_indices

    images, labels = load_digits_arrays()
    test = split_indices("test")[:100]
    plain = [digit_image(images[i]).resize((16, 16), Image.Resampling.BICUBIC) for i in test]
    styled = [slanted(p) for p in plain]
    assert np.mean([style_score(p) for p in plain]) < 0.05 < 0.3 < np.mean([style_score(s) for s in styled])
    right = np.mean(np.array(read_digits([unstyle(s) for s in styled])) == labels[test])
    assert right >= 0.9  # undoing the style gives the referee back the digit


def test_personalize_needs_three_images(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    paths = write_style_examples(tmp_path / "few")
    for extra in paths[2:]:
        extra.unlink()
    assert main(["personalize", "--images", str(tmp_path / "few")]) == 2
    assert "has 2 image(s); personalization needs 3 to 5" in capsys.readouterr().err


@pytest.mark.slow  # opt-in: its style floor at 200 steps is not yet measured
def test_personalize_writes_a_card_the_stock_pipeline_loads(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A CI-sized run (200 steps, 8 class images): the export loads into StableDiffusionPipeline and the token frames."""
    import torch
    from diffusers import StableDiffusionPipeline

    from mmadapt.zoo import resolve_checkpoint

    write_style_examples(tmp_path / "images")
    code = main(["personalize", "--images", str(tmp_path / "images"), "--output-dir", str(tmp_path / "run"),
                 "train.steps=200", "data.num_class_images=8"])
    assert code == 0
    card = tmp_path / "run" / "card"
    exported = sorted(p.name for p in (card / "diffusers").iterdir())
    assert exported == ["learned_embeds.safetensors", "pytorch_lora_weights.safetensors"]
    assert len(list((tmp_path / "run" / "class_images").glob("*.png"))) == 8
    pipeline = StableDiffusionPipeline.from_pretrained(resolve_checkpoint("zoo:digits-sd"))
    pipeline.set_progress_bar_config(disable=True)
    pipeline.load_lora_weights(str(card / "diffusers"))
    pipeline.load_textual_inversion(str(card / "diffusers" / "learned_embeds.safetensors"))
    images = pipeline(["a <sks> seven"] * 4, num_inference_steps=10, guidance_scale=4.0,
                      generator=torch.Generator().manual_seed(0)).images
    plain = pipeline(["a handwritten seven"] * 4, num_inference_steps=10, guidance_scale=4.0,
                     generator=torch.Generator().manual_seed(0)).images
    assert images[0].size == (16, 16)
    assert np.mean([style_score(i) for i in images]) > np.mean([style_score(i) for i in plain]) + 0.1  # leans right as the examples do


@pytest.mark.parametrize("layout, exported", [("sdxl", ["learned_embeds.safetensors", "pytorch_lora_weights.safetensors"]),
                                              ("sd3", ["pytorch_lora_weights.safetensors"])])
def test_personalize_takes_a_checkpoint_of_each_layout(layout: str, exported: list[str], tmp_path: Path,
                                                       request: pytest.FixtureRequest) -> None:
    """--checkpoint picks the recipe and node type from the folder's model_index.json: SDXL learns the word in both
    encoders beside the LoRA; SD3 reads the word as written, so its export is the LoRA alone."""
    folder = request.getfixturevalue(f"{layout}_folder")
    write_style_examples(tmp_path / "images")
    code = main(["personalize", "--images", str(tmp_path / "images"), "--checkpoint", str(folder),
                 "--output-dir", str(tmp_path / "run"), "train.steps=2", "data.num_class_images=2", "train.batch_size=2"])
    assert code == 0
    assert sorted(p.name for p in (tmp_path / "run" / "card" / "diffusers").iterdir()) == exported


def test_personalize_names_a_checkpoint_of_no_known_layout(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_style_examples(tmp_path / "images")
    (tmp_path / "pipe").mkdir()
    (tmp_path / "pipe" / "model_index.json").write_text('{"_class_name": "FluxPipeline"}')
    assert main(["personalize", "--images", str(tmp_path / "images"), "--checkpoint", str(tmp_path / "pipe")]) == 2
    err = capsys.readouterr().err
    assert "--checkpoint" in err and "FluxPipeline" in err and "Traceback" not in err
