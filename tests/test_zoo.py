"""The shipped miniature zoo: each member loads with its library's own loader and keeps its quality figure."""
from __future__ import annotations

import json

import pytest

from mmadapt.data.digits import load_digits_arrays, make_split, split_indices
from mmadapt.errors import MMAdaptError
from mmadapt.zoo import ZOO_DIR, resolve_checkpoint, zoo_members


def test_split_is_stored_fixed_disjoint_and_complete() -> None:
    splits = {name: split_indices(name) for name in ("train", "val", "test")}
    assert splits == make_split()  # the stored file is what the seeded code makes
    everything = [i for indices in splits.values() for i in indices]
    assert len(everything) == len(set(everything)) == len(load_digits_arrays()[1]) == 1797


def test_zoo_fits_its_budget_and_resolves_by_name() -> None:
    assert {"digits-clip", "digits-lm", "digits-sd"} <= set(zoo_members())
    size = sum(p.stat().st_size for p in ZOO_DIR.rglob("*") if p.is_file() and p.suffix != ".py")
    assert size <= 40 * 1024 * 1024, f"the zoo is {size / 2**20:.1f} MB"
    assert resolve_checkpoint("zoo:digits-lm") == str(ZOO_DIR / "digits-lm")
    with pytest.raises(MMAdaptError, match="not in the miniature zoo; members: digits-clip"):
        resolve_checkpoint("zoo:digits-gpt")


def test_digits_clip_zero_shot_accuracy_on_the_test_split() -> None:
    from mmadapt.zoo.build import digits_clip

    model, preprocess, tokenizer = digits_clip.load(ZOO_DIR / "digits-clip")  # open_clip's own local-dir loader
    accuracy = digits_clip.zero_shot_accuracy(model, preprocess, tokenizer, "test")
    assert accuracy >= 0.95
    recorded = json.loads((ZOO_DIR / "digits-clip" / "quality.json").read_text())["zero_shot_test"]
    assert accuracy == pytest.approx(recorded, abs=1e-9)  # the shipped weights are the ones measured


def test_digits_lm_answers_from_text_context() -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mmadapt.zoo.build import digits_lm

    folder = ZOO_DIR / "digits-lm"
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    seen = digits_lm.qa_accuracy(model, tokenizer, held_out=False)
    assert seen["Is it even?"] >= 0.95 and seen["What is it plus one?"] >= 0.95
    recorded = json.loads((folder / "quality.json").read_text())["qa_seen_contexts"]
    assert seen == pytest.approx(recorded, abs=1e-9)
    assert digits_lm.answer_greedy(model, tokenizer, ["a handwritten seven. Question: Is it even? Answer:"]) == ["no"]


def test_digits_sd_draws_the_prompted_digit_through_the_stock_pipeline() -> None:
    from mmadapt.zoo.build import digits_sd

    folder = ZOO_DIR / "digits-sd"
    figures = digits_sd.quality(folder)  # StableDiffusionPipeline.from_pretrained(folder), judged by the SVC referee
    assert figures["referee_accuracy"] >= 0.85
    recorded = json.loads((folder / "quality.json").read_text())["referee_accuracy"]
    assert figures["referee_accuracy"] == pytest.approx(recorded, abs=0.02)  # the shipped weights are the ones measured


def test_digits_dit_draws_the_prompted_digit_through_the_stock_sd3_pipeline() -> None:
    from mmadapt.zoo.build import digits_dit

    folder = ZOO_DIR / "digits-dit"
    figures = digits_dit.quality(folder)  # StableDiffusion3Pipeline.from_pretrained(folder), judged by the SVC referee
    assert figures["referee_accuracy"] >= 0.95  # issue 20's target for the transformer layout's zoo member
    recorded = json.loads((folder / "quality.json").read_text())["referee_accuracy"]
    assert figures["referee_accuracy"] == pytest.approx(recorded, abs=0.02)  # the shipped weights are the ones measured
