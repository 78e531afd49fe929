"""Several images in one sample: each goes through the tower and the bridge on its own, and its tokens go to its own
<image> marker, in order; the loss equals the LM's on the sequence spliced by hand."""
from __future__ import annotations

from typing import Any

import pytest
import torch

from conftest import build, tiny_recipe

IGNORE = -100


def graph() -> Any:
    raw = tiny_recipe("mlp_projector")
    raw["graph"]["llm"]["markers"] = {"mlp_projector": "<image>"}
    return build(raw).eval()


def samples() -> list[dict[str, Any]]:
    from mmadapt.data.digits import DigitsCaptions

    digits = DigitsCaptions(split="train", style="fixed")
    a, b, c = (digits[i]["image"] for i in range(3))
    return [{"image": [a, b], "prompt": "first <image> then <image>: which is larger?", "target": "the second",
             "text": "the second", "key": "pair", "id": 0},
            {"image": c, "prompt": "<image> what does it show?", "target": "a seven", "text": "a seven", "key": "one", "id": 1}]


def by_hand(model: Any, rows: list[dict[str, Any]]) -> torch.Tensor:
    """The LM's loss over each row's text with each image's projected tokens put where its marker stood."""
    generator = model.generator
    sequences, label_rows = [], []
    for sample in rows:
        images = sample["image"] if isinstance(sample["image"], list) else [sample["image"]]
        ids, places = generator.encode_marked(sample["prompt"])
        target = generator._tokens(sample["target"]) + [generator.eos_id]
        text = generator.embed(torch.tensor(ids + target))  # (T, D)
        labels = [IGNORE] * len(ids) + target
        pieces = []
        for image, at in zip(images, places["mlp_projector"]):
            pixels = model.nodes["vision"].transform_images([image])[0][None]  # (1, 3, H, W)
            pieces.append((at, model.nodes["mlp_projector"](model.nodes["vision"](pixels))[0]))  # (P, D)
        embeds, all_labels, last = [], [], 0
        for at, tokens in pieces:
            embeds += [text[last:at], tokens]
            all_labels += labels[last:at] + [IGNORE] * tokens.shape[0]
            last = at
        sequences.append(torch.cat(embeds + [text[last:]]))
        label_rows.append(torch.tensor(all_labels + labels[last:]))
    longest = max(s.shape[0] for s in sequences)
    embeds = torch.stack([torch.cat([s, s.new_zeros(longest - s.shape[0], s.shape[1])]) for s in sequences])
    mask = torch.stack([torch.arange(longest) < s.shape[0] for s in sequences]).long()
    labels = torch.stack([torch.cat([row, row.new_full((longest - row.shape[0],), IGNORE)]) for row in label_rows])
    return generator.model(inputs_embeds=embeds, attention_mask=mask, labels=labels).loss


def test_each_image_goes_to_its_own_marker() -> None:
    from mmadapt.data.collate import collator_for

    model = graph()
    batch = collator_for(model, max_tokens=64)(samples())
    assert batch["size"] == 2 and batch["node_inputs"]["vision"]["pixel_values"].shape[0] == 3  # 2 + 1 images
    assert batch["rows"]["vision"] == [0, 0, 1]
    with torch.no_grad():
        ours = model(batch)["loss"]
        theirs = by_hand(model, samples())
    assert abs(ours.item() - theirs.item()) < 1e-5, (ours.item(), theirs.item())
    swapped = samples()
    swapped[0]["image"] = swapped[0]["image"][::-1]
    with torch.no_grad():
        other = model(collator_for(model, max_tokens=64)(swapped))["loss"]
    assert abs(other.item() - ours.item()) > 1e-4  # the order of the images is the order of the markers


def test_generation_takes_several_images() -> None:
    from mmadapt.data.collate import collator_for

    model = graph()
    rows = samples()
    batch = collator_for(model, max_tokens=64)([dict(s, target="") for s in rows])
    texts = model.generate(batch, [s["prompt"] for s in rows], max_new_tokens=3)
    assert len(texts) == 2


def test_a_bad_image_in_a_list_skips_the_whole_sample(tmp_path: Any) -> None:
    from mmadapt.data.collate import collator_for

    model = graph()
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    rows = samples()
    rows[0]["image"] = [rows[0]["image"][0], str(broken)]
    batch = collator_for(model, max_tokens=64)(rows)
    assert batch["size"] == 1 and batch["bad"][0][0] == 0 and "broken.png" in batch["bad"][0][2]
    assert "rows" not in batch or batch["rows"].get("vision") in (None, [0])


@pytest.mark.parametrize("empty", [[], ()])
def test_an_empty_list_of_images_is_a_bad_sample(empty: Any) -> None:
    from mmadapt.data.collate import collator_for

    rows = samples()
    rows[0]["image"] = empty
    batch = collator_for(graph(), max_tokens=64)(rows)
    assert batch["size"] == 1 and "an empty list under 'image'" in batch["bad"][0][2]
