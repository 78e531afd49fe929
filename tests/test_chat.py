"""Chat-template tokenization: exact assistant-only label masks, marker places and truncation, on the digits-lm BPE."""
from __future__ import annotations

import copy
import re

import pytest
from tokenizers import pre_tokenizers
from transformers import AutoTokenizer

from mmadapt.generators.chat import (CHAT_TEMPLATES, IGNORE_INDEX, encode_chat, encode_generation_prompt,
                               messages_from_llava, resolve_template)
from mmadapt.errors import DataError, MMAdaptError

ZOO_LM = "mmadapt/zoo/digits-lm"
FAMILIES = ["llama3", "chatml", "vicuna", "mistral"]
# The control tokens each family's vocabulary has; vicuna's <s>/</s> are already digits-lm's bos/eos.
SPECIALS = {"llama3": ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
            "chatml": ["<|im_start|>", "<|im_end|>"], "vicuna": [], "mistral": ["[INST]", "[/INST]"]}
END = {"llama3": "<|eot_id|>", "chatml": "<|im_end|>", "vicuna": "</s>", "mistral": "</s>"}
IMAGE = "<image>"

ROUNDS = [("<image>\nWhat digit is this?", "It is a 7."), ("Is it odd?", "Yes, 7 is odd."),
          ("And 7+1?", "8, which is even.")]


def conversation(rounds=ROUNDS, system: str | None = None) -> list[dict]:
    messages = [{"role": "system", "content": system}] if system else []
    for question, answer in rounds:
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return messages


@pytest.fixture(scope="module")
def stock():
    return AutoTokenizer.from_pretrained(ZOO_LM)


@pytest.fixture(scope="module")
def plain(stock):
    """digits-lm without the byte-level prefix space, as Llama-3's and Qwen2's BPEs are: decode(ids) then gives back
    the rendered text exactly, so every check below can compare strings."""
    tokenizer = copy.deepcopy(stock)
    tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    return tokenizer


def with_specials(tokenizer, family: str):
    tokenizer = copy.deepcopy(tokenizer)
    if SPECIALS[family]:
        tokenizer.add_special_tokens({"additional_special_tokens": SPECIALS[family]})
    return tokenizer


def expected_answers(family: str, messages: list[dict]) -> list[str]:
    """What the labels must spell per assistant turn, written from the family's format, not from chat.py's spans."""
    space = " " if family == "vicuna" else ""  # vicuna's prompt is "ASSISTANT:", the answer starts with the space
    return [space + m["content"] + END[family] for m in messages if m["role"] == "assistant"]


def labelled_runs(encoded) -> list[list[int]]:
    runs, current = [], []
    for token, label in zip(encoded.ids, encoded.labels):
        assert label in (token, IGNORE_INDEX)
        if label != IGNORE_INDEX:
            current.append(token)
        elif current:
            runs, current = runs + [current], []
    return runs + [current] if current else runs


def check_exact(tokenizer, family: str, messages: list[dict], encoded) -> None:
    """The mask is exact: the labelled runs are exactly the answers plus end text; the ids spell the render (markers
    cut out); each marker place is where the text was split."""
    text = tokenizer.apply_chat_template(messages, chat_template=CHAT_TEMPLATES[family], tokenize=False)
    assert tokenizer.decode(encoded.ids) == text.replace(IMAGE, "")
    assert [tokenizer.decode(run) for run in labelled_runs(encoded)] == expected_answers(family, messages)
    starts = [m.start() for m in re.finditer(re.escape(IMAGE), text)]
    assert [name for name, _ in encoded.markers] == [IMAGE] * len(starts)
    for (_, place), start in zip(encoded.markers, starts):
        assert tokenizer.decode(encoded.ids[:place]) == text[:start].replace(IMAGE, "")


@pytest.mark.parametrize("family", FAMILIES)
def test_masks_exact_with_special_tokens(plain, family):
    tokenizer = with_specials(plain, family)
    messages = conversation()
    encoded = encode_chat(tokenizer, messages, CHAT_TEMPLATES[family], [IMAGE], 10_000)
    assert encoded.turns_dropped == 0
    check_exact(tokenizer, family, messages, encoded)
    # The template's control tokens came out as the tokenizer's own single ids, and none of the headers is labelled.
    controls = {tokenizer.convert_tokens_to_ids(t) for t in SPECIALS[family] if t != END[family]}
    assert controls <= set(encoded.ids)
    assert not controls & {label for label in encoded.labels if label != IGNORE_INDEX}
    end_id = tokenizer.convert_tokens_to_ids(END[family])
    assert sum(label == end_id for label in encoded.labels) == 3
    assert encoded.ids[0] == tokenizer.convert_tokens_to_ids({"llama3": "<|begin_of_text|>", "chatml": "<|im_start|>"}
                                                             .get(family, "<s>"))


@pytest.mark.parametrize("family", ["llama3", "chatml"])
def test_masks_exact_without_special_tokens(plain, family):
    """The end and header tokens are spelled in several pieces: the labels must still be exactly the answers and
    their end text, and nothing of the pieces of the next header."""
    assert len(plain(END[family], add_special_tokens=False)["input_ids"]) > 1
    messages = conversation()
    encoded = encode_chat(plain, messages, CHAT_TEMPLATES[family], [IMAGE], 10_000)
    check_exact(plain, family, messages, encoded)


def test_tokens_straddling_a_turn_edge(plain):
    """A template whose prompt ends in a space ("bot: ") and whose end text ("bye") runs into the next header ("rq"):
    tokenized whole, " It" and "er" would cross the assistant text's edges. The labels must still be exact."""
    template = ("{% for m in messages %}{% if m['role'] == 'user' %}{{ 'rq: ' + m['content'] + '\\n' }}"
                "{% else %}{{ 'bot: ' + m['content'] + ' bye' }}{% endif %}{% endfor %}"
                "{% if add_generation_prompt %}{{ 'bot: ' }}{% endif %}")
    messages = conversation([("What is it?", "It is a 7."), ("Odd?", "Yes.")])
    text = plain.apply_chat_template(messages, chat_template=template, tokenize=False)
    whole = plain(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    start, end = text.index("It is"), text.index("bye") + 3  # the first answer's edges
    assert any(s < start < e for s, e in whole) and any(s < end < e for s, e in whole)
    encoded = encode_chat(plain, messages, template, [], 10_000)
    assert plain.decode(encoded.ids) == text
    assert [plain.decode(run) for run in labelled_runs(encoded)] == [m["content"] + " bye" for m in messages[1::2]]
    prompt, _ = encode_generation_prompt(plain, messages[:3], template, [])
    assert encoded.ids[:len(prompt)] == prompt


@pytest.mark.parametrize("family", ["chatml", "mistral"])
def test_stock_tokenizer_with_prefix_space(stock, family):
    """The stock digits-lm adds a byte-level prefix space to every piece tokenized on its own; the labels are still
    the answers (up to that leading space) and nothing of a header."""
    tokenizer = with_specials(stock, family)
    messages = conversation()
    encoded = encode_chat(tokenizer, messages, CHAT_TEMPLATES[family], [IMAGE], 10_000)
    runs = [tokenizer.decode(run).strip() for run in labelled_runs(encoded)]
    assert runs == [answer.strip() for answer in expected_answers(family, messages)]
    assert encoded.markers == [(IMAGE, encoded.markers[0][1])]
    assert tokenizer.decode(encoded.ids[encoded.markers[0][1]:]).startswith(" \nWhat digit")  # " ": the prefix space


@pytest.mark.parametrize("family", FAMILIES)
def test_two_markers_in_different_turns(plain, family):
    tokenizer = with_specials(plain, family)
    rounds = [ROUNDS[0], ("Now this one: <image> which digit?", "A 3."), ROUNDS[2]]
    messages = conversation(rounds, system="Answer briefly.")
    encoded = encode_chat(tokenizer, messages, CHAT_TEMPLATES[family], [IMAGE], 10_000)
    check_exact(tokenizer, family, messages, encoded)
    assert len(encoded.markers) == 2 and encoded.markers[0][1] < encoded.markers[1][1]


def test_longest_marker_first(plain):
    tokenizer = with_specials(plain, "chatml")
    messages = conversation([("<image_2> then <image>", "ok")])
    encoded = encode_chat(tokenizer, messages, CHAT_TEMPLATES["chatml"], ["<image>", "<image_2>"], 10_000)
    assert [name for name, _ in encoded.markers] == ["<image_2>", "<image>"]
    assert "image" not in tokenizer.decode(encoded.ids)


@pytest.mark.parametrize("family", FAMILIES)
def test_truncation_drops_whole_rounds(plain, family):
    tokenizer = with_specials(plain, family)
    template, messages = CHAT_TEMPLATES[family], conversation()
    two_rounds = encode_chat(tokenizer, messages[:4], template, [IMAGE], 10_000)
    full = encode_chat(tokenizer, messages, template, [IMAGE], 10_000)
    assert len(full.ids) > len(two_rounds.ids) + 2
    encoded = encode_chat(tokenizer, messages, template, [IMAGE], len(two_rounds.ids) + 2 + 5, reserved=5)
    assert encoded.turns_dropped == 2  # one (user, assistant) round
    assert (encoded.ids, encoded.labels, encoded.markers) == (two_rounds.ids, two_rounds.labels, two_rounds.markers)
    check_exact(tokenizer, family, messages[:4], encoded)
    # reserved counts against max_tokens: the whole conversation fits without it and not with it.
    assert encode_chat(tokenizer, messages, template, [IMAGE], len(full.ids)).turns_dropped == 0
    assert encode_chat(tokenizer, messages, template, [IMAGE], len(full.ids), reserved=1).turns_dropped == 2


def test_truncation_errors(plain):
    tokenizer = with_specials(plain, "llama3")
    template, messages = CHAT_TEMPLATES["llama3"], conversation()
    first = encode_chat(tokenizer, messages[:2], template, [IMAGE], 10_000)
    with pytest.raises(DataError, match=f"cannot fit .* in max_text_tokens {len(first.ids) - 1}"):
        encode_chat(tokenizer, messages, template, [IMAGE], len(first.ids) - 1)
    with pytest.raises(DataError, match="cannot fit"):
        encode_chat(tokenizer, messages, template, [IMAGE], len(first.ids) + 3, reserved=4)
    # A marker in the last round: cutting it would leave its image nowhere to go.
    late = conversation([("Hello.", "Hi."), ROUNDS[1], ("And this <image>?", "A 2.")])
    two = encode_chat(tokenizer, late[:4], template, [IMAGE], 10_000)
    with pytest.raises(DataError, match="marker '<image>'"):
        encode_chat(tokenizer, late, template, [IMAGE], len(two.ids) + 1)


def test_resolve_template(plain):
    with pytest.raises(MMAdaptError, match="digits-lm.*no chat_template.*chatml, llama3, mistral, vicuna"):
        resolve_template(plain, None)
    assert resolve_template(plain, "vicuna") == CHAT_TEMPLATES["vicuna"]
    assert resolve_template(plain, "{{ messages[0]['content'] }}") == "{{ messages[0]['content'] }}"
    with pytest.raises(MMAdaptError, match="unknown chat template 'alpaca'.*chatml, llama3"):
        resolve_template(plain, "alpaca")
    own = copy.deepcopy(plain)
    own.chat_template = CHAT_TEMPLATES["chatml"]
    assert resolve_template(own, None) == CHAT_TEMPLATES["chatml"]


def test_messages_from_llava():
    llava = [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "<image>\nWhat?"},
             {"from": "gpt", "value": "A 7."}]
    assert messages_from_llava(llava) == [{"role": "system", "content": "Be brief."},
                                          {"role": "user", "content": "<image>\nWhat?"},
                                          {"role": "assistant", "content": "A 7."}]
    with pytest.raises(DataError, match="turn 1: unknown 'from' 'bot'"):
        messages_from_llava([{"from": "human", "value": "q"}, {"from": "bot", "value": "a"}])
    with pytest.raises(DataError, match="turn 0: content must be a string"):
        messages_from_llava([{"from": "human", "value": ["q"]}])
    with pytest.raises(DataError, match="turn 2: expected a 'assistant' turn"):
        messages_from_llava([{"from": "system", "value": "s"}, {"from": "human", "value": "q"},
                             {"from": "human", "value": "q"}])
    with pytest.raises(DataError, match="turn 0: expected a 'user' turn"):
        messages_from_llava([{"from": "gpt", "value": "a"}])


def test_bad_conversations_and_templates(plain):
    tokenizer = with_specials(plain, "chatml")
    template = CHAT_TEMPLATES["chatml"]
    with pytest.raises(DataError, match="turn 1"):
        encode_chat(tokenizer, [{"role": "user", "content": "q"}, {"role": "user", "content": "q"}], template, [], 99)
    with pytest.raises(DataError, match="turn 2: a training conversation must end with an assistant turn"):
        encode_chat(tokenizer, conversation()[:3], template, [], 10_000)
    with pytest.raises(DataError, match="inside an assistant turn"):
        encode_chat(tokenizer, conversation([("q", "see <image>")]), template, [IMAGE], 10_000)
    # A template that writes the number of turns first re-renders differently for every prefix.
    unstable = "{{ messages | length }}" + template
    with pytest.raises(MMAdaptError, match="not prefix-stable at turn 1"):
        encode_chat(tokenizer, conversation(), unstable, [], 10_000)
    with pytest.raises(MMAdaptError, match="failed to render"):
        encode_chat(tokenizer, conversation(), "{% for m in messages %}", [], 10_000)


@pytest.mark.parametrize("family", FAMILIES)
def test_generation_prompt(plain, family):
    """The prompt `generate` continues is exactly the start of the training ids, so inference sees what training saw."""
    tokenizer = with_specials(plain, family)
    template, messages = CHAT_TEMPLATES[family], conversation()
    ids, markers = encode_generation_prompt(tokenizer, messages[:5], template, [IMAGE])
    text = tokenizer.apply_chat_template(messages[:5], chat_template=template, tokenize=False,
                                         add_generation_prompt=True)
    assert tokenizer.decode(ids) == text.replace(IMAGE, "")
    full = encode_chat(tokenizer, messages, template, [IMAGE], 10_000)
    assert full.ids[:len(ids)] == ids and markers == full.markers
    # Inside the prompt only the earlier answers are labelled; the last answer starts right after it.
    assert full.labels[len(ids) - 1] == IGNORE_INDEX and full.labels[len(ids)] != IGNORE_INDEX
    prompt_labels = type(full)(full.ids[:len(ids)], full.labels[:len(ids)], [])
    assert [tokenizer.decode(run) for run in labelled_runs(prompt_labels)] == expected_answers(family, messages[:4])
    with pytest.raises(DataError, match="must follow a user turn"):
        encode_generation_prompt(tokenizer, messages, template, [IMAGE])
