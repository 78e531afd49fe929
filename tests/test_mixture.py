"""mmadapt.data.mixture on its own: parts end to end, each sample found where its part puts it and tagged with the fields
it lacks; draws repeat by seed; the sampler gives each part its share; bad parts are refused naming their index."""
from __future__ import annotations

import random
from collections import Counter

import numpy as np
import pytest

from mmadapt.data.mixture import MixtureDataset
from mmadapt.errors import DataError

IMAGES = {"type": "digits_captions", "limit": 5, "style": "fixed"}
POINTS = {"type": "digits_points", "limit": 3, "num_points": 16, "style": "fixed"}


@pytest.fixture(scope="module")
def mixture() -> MixtureDataset:
    return MixtureDataset([dict(IMAGES), dict(POINTS)])


def test_parts_are_laid_end_to_end(mixture: MixtureDataset) -> None:
    assert len(mixture) == 8 and mixture.starts == [0, 5]
    assert [mixture.locate(i) for i in range(8)] == [(0, 0), (0, 1), (0, 2), (0, 3), (0, 4), (1, 0), (1, 1), (1, 2)]
    assert (mixture.part_range(0), mixture.part_range(1)) == (range(0, 5), range(5, 8))
    assert [len(p) for p in mixture.parts] == [5, 3]


def test_each_sample_is_its_parts_sample_with_a_unique_id_its_part_and_the_fields_it_lacks(mixture: MixtureDataset) -> None:
    assert mixture.fields == [{"image"}, {"points"}] and mixture.all_fields == ["image", "points"]
    for position in range(len(mixture)):
        part, inner = mixture.locate(position)
        sample, own = mixture[position], mixture.parts[part][inner]
        assert (sample["id"], sample["part"]) == (position, part)
        assert sample["fields_absent"] == (["points"] if part == 0 else ["image"])
        assert sample["label"] == own["label"] and sample["text"] == own["text"]  # fixed captions: the same text each draw
        assert ("image" in sample, "points" in sample) == ((True, False) if part == 0 else (False, True))
        if part == 1:
            assert np.array_equal(sample["points"], own["points"])  # seeded clouds: the same each draw
    assert mixture[5]["label"] == mixture.parts[1][0]["label"] != None  # noqa: E711 - position 5 is the points part's first


def test_one_part_is_a_mixture_of_one_with_nothing_absent() -> None:
    single = MixtureDataset([dict(POINTS)])
    assert len(single) == 3 and single.starts == [0]
    assert [single[i]["fields_absent"] for i in range(3)] == [[], [], []]


def test_draws_repeat_by_seed() -> None:
    varied = MixtureDataset([{"type": "digits_captions", "limit": 12, "style": "varied"},
                             dict(POINTS, seed=4)])

    def texts(seed: int) -> list[str]:
        random.seed(seed)  # the captions' phrasing is drawn from the global RNG, as the trainer seeds it
        return [varied[i]["text"] for i in range(len(varied))]

    first = texts(7)
    assert texts(7) == first
    assert texts(8) != first
    assert len(set(first[:12])) > 1  # varied phrasings, so the comparison above means something
    again = MixtureDataset([dict(POINTS, seed=4)])
    other = MixtureDataset([dict(POINTS, seed=5)])
    assert np.array_equal(again[0]["points"], varied[12]["points"])
    assert not np.array_equal(other[0]["points"], varied[12]["points"])


def test_the_sampler_gives_each_part_its_share_and_repeats_by_seed(mixture: MixtureDataset) -> None:
    from mmadapt.training.trainer import EpochSampler

    size = len(mixture)
    for epoch in range(20):  # a whole epoch holds each part exactly as often as it has samples
        order = list(EpochSampler(size, seed=3, epoch=epoch, rank=0, world=1))
        assert sorted(order) == list(range(size))
    counts: Counter[int] = Counter()
    draws = 0
    for epoch in range(1500):  # the first half-batch of every epoch: the share holds over many draws, not only per epoch
        for position in list(EpochSampler(size, seed=3, epoch=epoch, rank=0, world=1))[:3]:
            counts[mixture.locate(position)[0]] += 1
            draws += 1
    assert counts[0] / draws == pytest.approx(5 / 8, abs=0.03)
    assert counts[1] / draws == pytest.approx(3 / 8, abs=0.03)
    assert list(EpochSampler(size, 3, 0, 0, 1)) == list(EpochSampler(size, 3, 0, 0, 1))
    assert [list(EpochSampler(size, s, 0, 0, 1)) for s in range(4)] != [list(EpochSampler(size, 3, 0, 0, 1))] * 4
    ranks = [list(EpochSampler(size, 3, 0, r, 2)) for r in range(2)]  # two processes: disjoint halves of one order
    assert sorted(ranks[0] + ranks[1]) == list(range(size)) and len(ranks[0]) == len(ranks[1]) == 4


# --- refusals ---
@pytest.mark.parametrize("parts", [[], None, {"type": "digits_captions"}, [dict(IMAGES), "digits_points"], [dict(IMAGES), None]])
def test_parts_that_are_not_a_nonempty_list_of_sections_are_refused(parts: object) -> None:
    with pytest.raises(DataError, match=r"^mixture: parts must be a non-empty list of data sections, each with a type$"):
        MixtureDataset(parts)  # type: ignore[arg-type]


def test_a_part_its_dataset_refuses_is_named_by_index_and_type() -> None:
    with pytest.raises(DataError, match=r"^mixture.parts\[1\] \(digits_points\): views and num_points must be at least 1, got 1 and 0$"):
        MixtureDataset([dict(IMAGES), dict(POINTS, num_points=0)])
    with pytest.raises(DataError, match=r"^mixture.parts\[0\] \(digits_captions\): style must be varied or fixed, got 'fancy'$"):
        MixtureDataset([dict(IMAGES, style="fancy"), dict(POINTS)])


def test_a_part_without_samples_is_refused_naming_it() -> None:
    with pytest.raises(DataError, match=r"^mixture.parts\[1\] \(digits_captions\): no samples$"):
        MixtureDataset([dict(POINTS), dict(IMAGES, limit=0)])


# --- what `validate` asks of a mixture without building it ---
def test_fields_are_the_union_of_the_parts_or_unknown_when_a_part_does_not_say() -> None:
    fields = MixtureDataset.fields_for({"parts": [dict(IMAGES), dict(POINTS)]})
    assert fields is not None and {"image", "points", "prompt", "target", "label"} <= fields
    assert "audio" not in fields
    assert MixtureDataset.fields_for({"parts": [dict(IMAGES), {"type": "plugin_pkg.Data"}]}) is None
    assert MixtureDataset.fields_for({"parts": []}) is None and MixtureDataset.fields_for({}) is None


def test_each_parts_own_findings_are_located_by_index() -> None:
    found = MixtureDataset.param_problems({"parts": [dict(IMAGES), {"type": "image_captions", "path": "/no/such.jsonl",
                                                                     "image_root": "/no/such/dir"}]})
    assert [f.field for f in found] == ["parts[1].path", "parts[1].image_root"]
    assert "/no/such.jsonl" in found[0].message and "/no/such/dir" in found[1].message
    assert not any(f.note for f in found)
    assert MixtureDataset.param_problems({"parts": "nonsense"}) == []
