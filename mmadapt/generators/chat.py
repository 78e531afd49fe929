"""Chat-template tokenization with exact assistant-only label masks and marker places, for visual instruction tuning."""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from mmadapt.errors import DataError, MMAdaptError

IGNORE_INDEX = -100  # what torch's cross-entropy skips

# The public templates, written as Jinja for `tokenizer.apply_chat_template`. Each one writes the sequence's start token
# itself where its family uses one (llama3: <|begin_of_text|>; vicuna, mistral: bos_token; chatml: none), because
# `encode_chat` tokenizes with add_special_tokens=False: the caller must not add another bos.
# End of an assistant turn (labelled, so the model learns to stop) -> what follows it (unlabelled):
#   llama3: content|trim + <|eot_id|>          -> next <|start_header_id|>
#   chatml: content + <|im_end|>               -> "\n" then next <|im_start|> (the newline is never generated)
#   vicuna: " " + content + eos_token (</s>)   -> next "USER: " (FastChat v1.1, sep2 = </s>)
#   mistral: content + eos_token (</s>)        -> next "[INST] " (HF Mistral-Instruct-v0.1 layout)
CHAT_TEMPLATES: dict[str, str] = {
    # Llama-3 instruct; the generation prompt is the assistant header.
    "llama3": (
        "{{ '<|begin_of_text|>' }}"
        "{% for message in messages %}"
        "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
        " + message['content'] | trim + '<|eot_id|>' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
    ),
    # Qwen2 ChatML, with Qwen2's behaviour: a default system turn when the conversation has none.
    "chatml": (
        "{% for message in messages %}"
        "{% if loop.first and message['role'] != 'system' %}"
        "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
        "{% endif %}"
        "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    ),
    # Vicuna v1.1 (FastChat): "<s>SYSTEM USER: q ASSISTANT: a</s>USER: ..."; the default system line when none is
    # given. The generation prompt is "ASSISTANT:" without a trailing space: the space starts the answer's first
    # token, as it does when the whole conversation is tokenized.
    "vicuna": (
        "{% if messages and messages[0]['role'] == 'system' %}"
        "{% set system = messages[0]['content'] %}{% set turns = messages[1:] %}"
        "{% else %}"
        "{% set system = \"A chat between a curious user and an artificial intelligence assistant. "
        "The assistant gives helpful, detailed, and polite answers to the user's questions.\" %}"
        "{% set turns = messages %}"
        "{% endif %}"
        "{{ bos_token + system + ' ' }}"
        "{% for message in turns %}"
        "{% if message['role'] == 'user' %}{{ 'USER: ' + message['content'] + ' ' }}"
        "{% elif message['role'] == 'assistant' %}{{ 'ASSISTANT: ' + message['content'] + eos_token }}{% endif %}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
    ),
    # Mistral-Instruct v0.1: "<s>[INST] q [/INST]a</s>[INST] q2 [/INST]". Its generation prompt is empty: a user
    # turn already ends with [/INST]. A system message is put before the first user message (prefix-stable, unlike
    # the later templates that put it before the last one).
    "mistral": (
        "{% if messages and messages[0]['role'] == 'system' %}"
        "{% set system = messages[0]['content'] + '\\n\\n' %}{% set turns = messages[1:] %}"
        "{% else %}{% set system = '' %}{% set turns = messages %}{% endif %}"
        "{{ bos_token }}"
        "{% for message in turns %}"
        "{% if message['role'] == 'user' %}"
        "{{ '[INST] ' + (system if loop.first else '') + message['content'] + ' [/INST]' }}"
        "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}{% endif %}"
        "{% endfor %}"
    ),
}

LLAVA_ROLES = {"human": "user", "gpt": "assistant", "system": "system"}


def _names() -> str:
    return ", ".join(sorted(CHAT_TEMPLATES))


def _tokenizer_name(tokenizer: Any) -> str:
    return getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__


def resolve_template(tokenizer: Any, template: str | None) -> str:
    """The Jinja text for `template`: None -> the tokenizer's own; a CHAT_TEMPLATES name; or a Jinja string itself."""
    if template is None:
        own = getattr(tokenizer, "chat_template", None)
        if isinstance(own, dict):  # a tokenizer may carry several named templates; "default" is the chat one
            own = own.get("default")
        if not own:
            raise MMAdaptError(f"tokenizer '{_tokenizer_name(tokenizer)}' has no chat_template; "
                               f"name one of: {_names()} (or give a Jinja template)")
        return own
    if template in CHAT_TEMPLATES:
        return CHAT_TEMPLATES[template]
    if "{%" in template or "{{" in template:
        return template
    raise MMAdaptError(f"unknown chat template '{template}': expected one of {_names()}, or a Jinja template")


def _check_turns(messages: list[dict]) -> None:
    """Roles alternate user/assistant after an optional leading system turn; contents are strings."""
    expected = "user"
    for index, message in enumerate(messages):
        role, content = message.get("role"), message.get("content")
        if not isinstance(content, str):
            raise DataError(f"turn {index}: content must be a string, got {type(content).__name__}")
        if index == 0 and role == "system":
            continue
        if role != expected:
            raise DataError(f"turn {index}: expected a '{expected}' turn (roles alternate user/assistant after an "
                            f"optional leading system turn), got '{role}'")
        expected = "assistant" if role == "user" else "user"


def messages_from_llava(conversation: list[dict]) -> list[dict]:
    """LLaVA's [{"from": "human"|"gpt"|"system", "value": ...}] as chat messages [{"role", "content"}]."""
    messages = []
    for index, turn in enumerate(conversation):
        source = turn.get("from") if isinstance(turn, dict) else None
        if source not in LLAVA_ROLES:
            raise DataError(f"turn {index}: unknown 'from' {source!r}; expected one of {', '.join(LLAVA_ROLES)}")
        messages.append({"role": LLAVA_ROLES[source], "content": turn.get("value")})
    _check_turns(messages)
    return messages


@dataclass
class EncodedChat:
    """Text ids of a conversation, its labels and where each marker's input goes.

    labels: IGNORE_INDEX except the tokens of each assistant turn's text, from the end of the generation prompt up to
    and including the end-of-turn text (<|eot_id|>, <|im_end|>, </s>) but not the whitespace after it (chatml's
    "\\n"), which belongs to the separator and is never generated. markers: (marker text, index in ids where that
    input's tokens go), in order. turns_dropped: messages (turns, two per round) cut from the end to fit max_tokens.
    """

    ids: list[int]
    labels: list[int]
    markers: list[tuple[str, int]]
    turns_dropped: int = 0


def _render(tokenizer: Any, messages: list[dict], template: str, generation_prompt: bool) -> str:
    try:
        return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                             add_generation_prompt=generation_prompt)
    except Exception as error:  # a Jinja syntax error or raise_exception() in the template
        raise MMAdaptError(f"chat template failed to render: {error}") from error


def _marker_pattern(markers: list[str]) -> re.Pattern | None:
    # Longest first, so a marker that contains another ("<image_1>" vs "<image>") is matched whole.
    names = sorted({m for m in markers if m}, key=len, reverse=True)
    return re.compile("|".join(re.escape(m) for m in names)) if names else None


def _tokens(tokenizer: Any, text: str, start: int, end: int, cuts: list[int]) -> list[tuple[int, int, int]]:
    """(id, char start, char end) of text[start:end]. Where a token would straddle an assistant-span edge (e.g. an
    end token the tokenizer spells in pieces, merged with the next header's first characters), that piece is
    tokenized in two at the edge: a token can't be half labelled, and the mask must be exact."""
    if start >= end:
        return []
    encoding = tokenizer(text[start:end], add_special_tokens=False, return_offsets_mapping=True)
    found = [(i, start + s, start + e) for i, (s, e) in zip(encoding["input_ids"], encoding["offset_mapping"])]
    straddled = sorted({c for c in cuts if start < c < end and any(s < c < e for _, s, e in found)})
    if not straddled:
        return found
    inner = [c for c in cuts if start < c < end and c not in straddled]
    pieces = zip([start, *straddled], [*straddled, end])
    return [token for a, b in pieces for token in _tokens(tokenizer, text, a, b, inner)]


def _encode_text(tokenizer: Any, text: str, spans: list[tuple[int, int]],
                 pattern: re.Pattern | None) -> EncodedChat:
    """Tokenize `text` piece by piece between marker occurrences (dropping the markers), labelling assistant spans."""
    ids: list[int] = []
    labels: list[int] = []
    places: list[tuple[str, int]] = []
    cuts = sorted({edge for span in spans for edge in span})
    position = 0
    occurrences = list(pattern.finditer(text)) if pattern else []
    for piece_end, match in [(m.start(), m) for m in occurrences] + [(len(text), None)]:
        for token, s, _ in _tokens(tokenizer, text, position, piece_end, cuts):
            ids.append(token)
            # No token straddles an edge (see _tokens), so its start decides; zero-width tokens count by position.
            labels.append(token if any(a <= s < b for a, b in spans) else IGNORE_INDEX)
        if match is not None:
            places.append((match.group(), len(ids)))
            position = match.end()
    return EncodedChat(ids, labels, places)


def _assistant_spans(tokenizer: Any, messages: list[dict], template: str, text: str) -> list[tuple[int, int, int]]:
    """(label start, label end, end of the turn's render) per assistant turn, from renders of the prefixes."""
    spans = []
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = _render(tokenizer, messages[:index], template, True)
        through = _render(tokenizer, messages[:index + 1], template, False)
        if not (text.startswith(prompt) and text.startswith(through) and len(prompt) <= len(through)):
            raise MMAdaptError(f"the chat template is not prefix-stable at turn {index}: rendering the conversation "
                               "up to that turn (with or without the generation prompt) is not a prefix of the whole "
                               "render, so the assistant text cannot be located")
        # The trailing whitespace is the separator before the next turn (chatml's "\n"), not something to emit.
        end = max(len(prompt), len(through.rstrip()))
        spans.append((len(prompt), end, len(through)))
    return spans


def encode_chat(tokenizer: Any, messages: list[dict], template: str, markers: list[str], max_tokens: int,
                reserved: int = 0) -> EncodedChat:
    """Token ids, assistant-only labels and marker places of a conversation ending in an assistant turn.

    `template` is Jinja text (see resolve_template). Markers (e.g. "<image>") are cut out of the text; each one's
    input goes at its recorded index. `reserved` is the number of tokens the markers' inputs will add, counted
    against max_tokens with the text ids. Whole trailing (user, assistant) rounds are dropped to fit; DataError when
    the first round does not fit or a dropped round holds a marker. The ids start as the template starts (with
    bos when it writes one): do not add another.
    """
    _check_turns(messages)
    if not messages or messages[-1]["role"] != "assistant":
        raise DataError(f"turn {len(messages) - 1}: a training conversation must end with an assistant turn")
    pattern = _marker_pattern(markers)
    text = _render(tokenizer, messages, template, False)
    rounds = _assistant_spans(tokenizer, messages, template, text)
    spans = [(a, b) for a, b, _ in rounds]
    for match in pattern.finditer(text) if pattern else []:
        if any(a <= match.start() < b for a, b in spans):
            # The model cannot be trained to emit an input, and a marker inside a label span has no defined label.
            raise DataError(f"marker '{match.group()}' is inside an assistant turn; markers belong in user turns")
    encoded = _encode_text(tokenizer, text, spans, pattern)
    if len(encoded.ids) + reserved <= max_tokens:
        return encoded
    turn_of_round = [index for index, m in enumerate(messages) if m["role"] == "assistant"]
    for kept in range(len(rounds) - 1, 0, -1):
        cut = rounds[kept - 1][2]  # the render of the first `kept` rounds is exactly text[:cut] (prefix-stable)
        shorter = _encode_text(tokenizer, text[:cut], spans[:kept], pattern)
        if len(shorter.ids) + reserved > max_tokens:
            continue
        lost = pattern.search(text, cut) if pattern else None
        if lost is not None:
            raise DataError(f"the conversation fits max_text_tokens {max_tokens} only without turns "
                            f"{turn_of_round[kept] - 1}.., which hold marker '{lost.group()}': its input would "
                            "have no place")
        shorter.turns_dropped = len(messages) - 1 - turn_of_round[kept - 1]
        return shorter
    first = _encode_text(tokenizer, text[:rounds[0][2]], spans[:1], pattern)
    raise DataError(f"cannot fit the first round ({len(first.ids)} text tokens + {reserved} reserved for markers) "
                    f"in max_text_tokens {max_tokens}")


def encode_generation_prompt(tokenizer: Any, messages: list[dict], template: str,
                             markers: list[str]) -> tuple[list[int], list[tuple[str, int]]]:
    """Ids of a conversation ending in a user turn plus the generation prompt (what `generate` continues), and the
    markers' places. As in encode_chat, the template writes any bos; do not add another."""
    _check_turns(messages)
    if not messages or messages[-1]["role"] != "user":
        raise DataError(f"turn {len(messages) - 1}: a generation prompt must follow a user turn")
    text = _render(tokenizer, messages, template, True)
    # The earlier answers' edges cut the text as in encode_chat, so a multi-turn prompt is tokenized as training saw it.
    spans = [(a, b) for a, b, _ in _assistant_spans(tokenizer, messages, template, text)]
    encoded = _encode_text(tokenizer, text, spans, _marker_pattern(markers))
    return encoded.ids, encoded.markers
