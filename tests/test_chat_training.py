"""Conversation data through a graph: the chat template decides ids and labels (assistant turns only), each picture's
tokens go to its own <image>, a bad row is skipped and counted, and generation continues a conversation."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from conftest import build, tiny_recipe

IGNORE = -100
TWO_IMAGES = [{"from": "human", "value": "Here are <image> and <image>. Which is larger?"},
              {"from": "gpt", "value": "the second"},
              {"from": "human", "value": "And is the first one even?"},
              {"from": "gpt", "value": "one is odd, so no"}]


def chat_graph(tokenizer: Path, template: str = "chatml") -> Any:
    raw = tiny_recipe("mlp_projector")
    raw["graph"]["llm"].update(tokenizer=str(tokenizer), prefix_after_bos=True, markers={"mlp_projector": "<image>"},
                               chat_template=template)
    return build(raw).eval()


def digits(count: int) -> list[Any]:
    from mmadapt.data.digits import DigitsCaptions

    data = DigitsCaptions(split="train", style="fixed")
    return [data[i]["image"] for i in range(count)]


def test_the_loss_scores_every_assistant_turn_with_each_picture_at_its_marker(word_tokenizer_dir: Path) -> None:
    from mmadapt.generators.chat import CHAT_TEMPLATES, encode_chat, messages_from_llava
    from mmadapt.data.collate import collator_for

    model = chat_graph(word_tokenizer_dir)
    generator = model.generator
    images = digits(2)
    sample = {"image": images, "conversations": TWO_IMAGES, "prompt": "", "target": "", "text": "", "key": "k", "id": 0}
    batch = collator_for(model, max_tokens=512)([sample])
    encoded = encode_chat(generator.tokenizer, messages_from_llava(TWO_IMAGES), CHAT_TEMPLATES["chatml"], ["<image>"], 512)
    llm = batch["node_inputs"]["llm"]
    assert llm["input_ids"][0].tolist() == encoded.ids and llm["labels"][0].tolist() == encoded.labels
    scored = generator.tokenizer.decode([i for i, label in zip(encoded.ids, encoded.labels) if label != IGNORE])
    assert scored.replace(" ", "") == "thesecond<|im_end|>oneisodd,sono<|im_end|>"  # both answers, nothing else
    with torch.no_grad():
        ours = model(batch)["loss"]
        text = generator.embed(torch.tensor(encoded.ids))  # (T, D)
        pieces, labels, last = [], [], 0
        for (_, at), image in zip(encoded.markers, images):
            tokens = model.nodes["mlp_projector"](model.nodes["vision"](model.nodes["vision"].transform_images([image])[0][None]))[0]
            pieces += [text[last:at], tokens]
            labels += encoded.labels[last:at] + [IGNORE] * tokens.shape[0]
            last = at
        embeds = torch.cat(pieces + [text[last:]])[None]
        theirs = generator.model(inputs_embeds=embeds, labels=torch.tensor([labels + encoded.labels[last:]])).loss
    assert abs(ours.item() - theirs.item()) < 1e-5


def test_a_bad_row_of_a_conversation_file_is_skipped_and_counted(word_tokenizer_dir: Path, tmp_path: Path) -> None:
    from mmadapt.data.collate import build_dataset, collator_for

    digits(1)[0].save(tmp_path / "a.png")
    rows = [{"id": "good", "image": "a.png", "conversations": [{"from": "human", "value": "<image> What is it?"},
                                                                {"from": "gpt", "value": "a one"}]},
            {"id": "bad", "image": "a.png", "conversations": [{"from": "human", "value": "no marker here"},
                                                               {"from": "gpt", "value": "a one"}]}]
    (tmp_path / "chat.json").write_text(json.dumps(rows))
    dataset = build_dataset({"type": "conversations", "path": str(tmp_path / "chat.json")})
    batch = collator_for(chat_graph(word_tokenizer_dir), max_tokens=512)([dataset[0], dataset[1]])
    assert batch["size"] == 1 and [report[0] for report in batch["bad"]] == [1]
    assert "0 '<image>' placeholder(s) but 1 image(s)" in batch["bad"][0][2]


def test_generation_continues_a_conversation_and_stops_at_the_end_of_turn(word_tokenizer_dir: Path) -> None:
    from mmadapt.data.collate import collator_for

    model = chat_graph(word_tokenizer_dir)
    history = TWO_IMAGES[:3]
    sample = {"image": digits(2), "conversations": history, "prompt": "", "target": "", "text": "", "key": "k", "id": 0}
    batch = collator_for(model, max_tokens=512)([sample])
    answers = model.generate(batch, [history], max_new_tokens=4)
    assert len(answers) == 1 and isinstance(answers[0], str)
    end = model.generator.tokenizer("</s>", add_special_tokens=False)["input_ids"]
    assert model.generator._stop_ids()[: len(end)] == end[:1]  # eos first; the template's end of turn where it is one token


def test_a_streamed_reply_grows_token_by_token_to_the_generated_one_and_a_failure_is_raised(word_tokenizer_dir: Path) -> None:
    import pytest

    from mmadapt.errors import MMAdaptError
    from mmadapt.serve.inference import generate_reply, stream_reply

    model = chat_graph(word_tokenizer_dir)
    history, pictures = TWO_IMAGES[:3], {"image": digits(2)}
    whole = generate_reply(model, history, pictures, max_new_tokens=8)
    parts = list(stream_reply(model, history, pictures, max_new_tokens=8))
    assert whole and parts[-1] == whole and len(parts) >= 3, parts
    assert all(whole.startswith(part) for part in parts)
    assert model.generator.chats()
    with pytest.raises(MMAdaptError, match="ends with the user's turn"):  # raised from the generation thread, not a hang
        list(stream_reply(model, TWO_IMAGES, pictures, max_new_tokens=8))


def test_the_training_log_asks_a_conversation_s_last_question_after_its_history(word_tokenizer_dir: Path) -> None:
    from mmadapt.data.collate import collator_for

    model = chat_graph(word_tokenizer_dir)
    sample = {"image": digits(2), "conversations": TWO_IMAGES, "prompt": TWO_IMAGES[0]["value"], "target": "t",
              "text": TWO_IMAGES[-1]["value"], "key": "k", "id": 0}
    batch = collator_for(model, max_tokens=512)([sample])
    assert batch["prompts"] == [TWO_IMAGES[:3]] and batch["texts"] == ["one is odd, so no"]
    examples = model.generator.examples(model, batch, 1, Path("unused"), 0, write=False, max_new_tokens=4)
    assert examples[0]["reference"] == "one is odd, so no" and isinstance(examples[0]["generated"], str)
