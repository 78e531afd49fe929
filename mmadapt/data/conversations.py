"""Multi-turn visual instruction data in LLaVA's JSON format: files as LLaVA publishes them, and a synthetic digits set."""
from __future__ import annotations

import hashlib
import json
import random
import re
from collections import Counter
from pathlib import Path
from typing import Any, ClassVar

from torch.utils.data import Dataset

from mmadapt.core.params import PositiveInt
from mmadapt.core.semantics import Finding, file_and_root_findings
from mmadapt.data.captions import CAPTION_FIELDS
from mmadapt.data.digits import NUMBER_WORDS, REASONED, WORDS, Split, caption_for, digit_image, load_digits_arrays, split_indices
from mmadapt.data.modalities import content_key
from mmadapt.errors import DataError

ROLES = ("human", "gpt", "system")  # the `from` values LLaVA's preprocessing knows
IMAGE = "<image>"  # LLaVA's placeholder: where each image's tokens go, in order


def turn_value(turns: list[dict[str, Any]], role: str, last: bool = False) -> str:
    """The first (or last) turn of a role's text."""
    values = [turn["value"] for turn in turns if turn["from"] == role]
    return values[-1] if last else values[0]


class Conversations(Dataset):
    """Rows of {"id", "image" (a path, a list of paths, or none), "conversations": [{"from", "value"}, ...]} from a JSON
    list (LLaVA-Instruct-150K, llava_v1_5_mix665k) or a JSONL file; image paths are relative to image_root.

    prompt is the first human turn and target/text the last gpt turn, as written (LLaVA's "<image>\\n" kept). key is the
    images' content hash (what the feature cache stores; samples of one image share it), or "text:<id>" for a
    text-only sample; sample_id is the row's id (its index when it has none). A row is checked when it is read, so a bad
    one is a DataError the collator counts and skips.
    """

    fields: ClassVar[frozenset[str]] = CAPTION_FIELDS | {"image", "conversations", "sample_id"}  # image: absent from text-only rows

    @classmethod
    def param_problems(cls, params: dict[str, Any]) -> list[Finding]:
        """The file and the image folder exist; relative paths start at the current folder, as the dataset opens them."""
        return file_and_root_findings(params, "image_root")

    def __init__(
        self,
        path: str,  # a .json list of samples (as LLaVA publishes them) or .jsonl, one sample per line
        image_root: str | None = None,  # where relative image paths start; default: the file's folder
        limit: PositiveInt | None = None,  # use only the first N rows (quick tests)
        image_marker: str = IMAGE,  # the placeholder; each sample has as many as it has images
    ) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise DataError(f"{self.path}: data file not found")
        if not image_marker:
            raise DataError("image_marker must not be empty")
        self.root = Path(image_root) if image_root else self.path.parent
        self.marker = image_marker
        records = self._read_records()
        counts = Counter(str(r["id"]) for _, r in records if r.get("id") is not None)
        self.repeated = {i for i, n in counts.items() if n > 1}  # ids several rows share (LLaVA-665K has some)
        self.records = records[:limit]

    def _read_records(self) -> list[tuple[str, dict[str, Any]]]:
        """(where, row) pairs: 'row N' in a JSON list, 'row N (line L)' in JSONL."""
        text = self.path.read_text(encoding="utf-8")
        if text.lstrip().startswith("["):
            try:
                rows = json.loads(text)
            except json.JSONDecodeError as exc:
                raise DataError(f"{self.path}:{exc.lineno}: not valid JSON ({exc.msg})") from None
            records = [(f"row {i}", row) for i, row in enumerate(rows)]
        else:
            records = []
            for number, line in enumerate(text.splitlines(), start=1):
                if not line.strip():
                    continue
                try:
                    records.append((f"row {len(records)} (line {number})", json.loads(line)))
                except json.JSONDecodeError as exc:
                    whole = self._whole(text)
                    if whole is not None:
                        raise DataError(f"{self.path}: expected a JSON list of samples or JSONL (one object a line); "
                                        f"the file is one JSON {type(whole).__name__}") from None
                    raise DataError(f"{self.path}:{number}: not valid JSON ({exc.msg})") from None
        for where, row in records:
            if not isinstance(row, dict):
                raise DataError(f"{self.path}: {where}: expected an object with 'conversations', got {type(row).__name__}")
        if not records:
            raise DataError(f"{self.path}: no samples")
        return records

    @staticmethod
    def _whole(text: str) -> Any:
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            return None

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        """The sample, or for a bad row a stand-in carrying its `problem`: the collator skips and counts it (raising here
        would stop the DataLoader, and with it the run)."""
        try:
            return self.read(index)
        except DataError as exc:
            return {"problem": str(exc), "id": index, "key": f"bad:{index}", "prompt": "", "target": "", "text": "",
                    "fields_absent": ["image"]}

    def read(self, index: int) -> dict[str, Any]:
        """Row `index` as a sample; DataError naming the file, row and what is wrong."""
        where, row = self.records[index]
        named = f" (id {row['id']})" if row.get("id") is not None else ""

        def bad(problem: str) -> DataError:
            return DataError(f"{self.path}: {where}{named}: {problem}")

        turns = row.get("conversations")
        if turns is None:
            raise bad("no 'conversations'")
        if not isinstance(turns, list):
            raise bad(f"'conversations' must be a list of turns, got {type(turns).__name__}")
        if not turns:
            raise bad("'conversations' is empty")
        for number, turn in enumerate(turns):
            if not isinstance(turn, dict) or turn.get("from") not in ROLES or not isinstance(turn.get("value"), str):
                raise bad(f"turn {number} must be {{\"from\": {' | '.join(ROLES)}, \"value\": text}}, got {turn!r:.80}")
        if not any(turn["from"] == "gpt" for turn in turns):
            raise bad("no gpt turn: nothing to learn")
        if not any(turn["from"] == "human" for turn in turns):
            raise bad("no human turn")
        images = self._images(row.get("image"), bad)
        markers = sum(turn["value"].count(self.marker) for turn in turns)
        if markers != len(images):
            raise bad(f"{markers} '{self.marker}' placeholder(s) but {len(images)} image(s)")
        sample_id = str(row["id"]) if row.get("id") is not None else str(index)
        answer = turn_value(turns, "gpt", last=True)
        sample: dict[str, Any] = {"conversations": [dict(turn) for turn in turns], "prompt": turn_value(turns, "human"),
                                  "target": answer, "text": answer, "id": index, "sample_id": sample_id}
        if images:
            keys = [content_key(p) for p in images]  # an unreadable file gets a key that fails later, naming it
            sample["key"] = keys[0] if len(keys) == 1 else hashlib.sha1(" ".join(keys).encode()).hexdigest()
            sample["image"] = images[0] if len(images) == 1 else images
        else:
            sample["key"] = f"text:{sample_id}" if sample_id not in self.repeated else f"text:{sample_id}@{index}"
            sample["fields_absent"] = ["image"]
        return sample

    def _images(self, value: Any, bad: Any) -> list[str]:
        if value is None or value == []:
            return []
        paths = value if isinstance(value, list) else [value]
        if not all(isinstance(p, str) and p for p in paths):
            raise bad(f"'image' must be a path or a list of paths, got {value!r:.80}")
        return [str(self.root / p) for p in paths]


# --- the synthetic digits set ---
KINDS = ("shows", "even", "plus_one", "larger", "sum")
SINGLE_KINDS = ("shows", "even", "plus_one")  # about one image ({ref}: "it", or "the first one"/"the second one" of a pair)
PAIR_KINDS = ("larger", "sum")  # about both images of a pair
# The phrasings of each kind that train and val use; the test split uses these and HELD_OUT_PHRASINGS.
PHRASINGS: dict[str, tuple[str, ...]] = {
    "shows": ("What does {ref} show?", "What is written in {ref}?", "Which digit is {ref}?", "What number do you see in {ref}?",
              "What digit is shown in {ref}?", "Tell me what {ref} shows.", "Can you read {ref}?", "What is in {ref}?",
              "Which number is drawn in {ref}?", "What can you see in {ref}?", "Describe {ref}.", "Say what {ref} is.",
              "What do you make of {ref}?", "What do you think {ref} is?", "How do you read {ref}?"),
    "even": ("Is {ref} even?", "Is {ref} an even number?", "Is {ref} divisible by two?", "Does {ref} show an even number?",
             "Is the number in {ref} even?", "Tell me whether {ref} is even.", "Even or odd: what about {ref}?"),
    "plus_one": ("What is {ref} plus one?", "What do you get if you add one to {ref}?", "What number comes right after {ref}?",
                 "What is one more than {ref}?", "Add one to {ref}: what do you get?", "Which number follows {ref}?",
                 "Which number is one greater than {ref}?", "If you increase {ref} by one, what is the result?"),
    "larger": ("Which of the two is larger?", "Which one is the bigger number?", "Which digit is greater, the first or the second?",
               "Which is larger?", "Which of them is greater?", "Which picture shows the bigger digit?",
               "Which number is larger, the first or the second?", "Which of the two digits is the largest?"),
    "sum": ("What is their sum?", "What do the two add up to?", "What do you get if you add them together?",
            "Add the two digits.", "What is the first one plus the second one?", "What is the total of the two?",
            "Sum them up.", "What do they add up to?"),
}
# Phrasings only the test split asks: held_out marks the turns that use one.
HELD_OUT_PHRASINGS: dict[str, tuple[str, ...]] = {
    "shows": ("What would you say {ref} depicts?",),
    "even": ("Would you call {ref} an even digit?",),
    "plus_one": ("If you count one up from {ref}, which number do you reach?",),
    "larger": ("Of these two, which number is higher?",),
    "sum": ("How much are the two digits together?",),
}
HELD_OUT_SHARE = 0.25  # of the test split's questions: enough held-out turns (~190 of 300 conversations' ~750) to measure
# Unordered digit pairs only the test split shows together: a sum or comparison of them was never trained.
HELD_OUT_PAIRS: frozenset[frozenset[int]] = frozenset(frozenset(p) for p in ((0, 9), (1, 6), (2, 7), (3, 8), (4, 5), (6, 9)))
HELD_OUT_PAIR_SHARE = 0.3  # of the test split's pairs
# Politeness around any question, so that a kind is told by its content words, not its frame ("would you", "tell me").
FRAMES = ("Tell me, {q}", "Can you tell me: {q}", "Please answer: {q}", "Quick question: {q}", "I want to know: {q}")
FRAMED_SHARE = 0.3
PAIR_SHARE = 0.6  # of conversations: a pair's questions (which one, their sum) are the harder half
SINGLE_INTROS = (IMAGE + "\n{q}", "{q}\n" + IMAGE)  # LLaVA puts the placeholder before or after the first question
PAIR_INTROS = ("Here are two digits: " + IMAGE + " and " + IMAGE + ". {q}", IMAGE + "\n" + IMAGE + "\n{q}",
               "The first picture: " + IMAGE + "\nThe second picture: " + IMAGE + "\n{q}")
FOLLOW_UPS = ("", "And ", "Now, ")  # what a later question may start with; the phrasing's first letter is then lower-cased
REFS = ("the first one", "the second one")  # a pair's images, in their placeholders' order
SUM_WORDS = NUMBER_WORDS + ("twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen")
NUMBERS = {word: value for value, word in enumerate(SUM_WORDS)}


def answer_for(kind: str, digits: list[int], rng: random.Random) -> str:
    """A gpt turn, in the digits corpus' reasoned style: the digit named first, the answer last. Sums are number words."""
    if kind == "shows":
        return caption_for(digits[0], "varied", rng)  # a caption phrasing: "a handwritten seven", "the digit 7", ...
    if kind == "even":
        return REASONED["Is it even?"](digits[0])  # "seven is odd, so no"
    if kind == "plus_one":
        return REASONED["What is it plus one?"](digits[0])  # "seven plus one is eight"
    a, b = digits
    if kind == "sum":  # a sum the LM has no word for (twelve and up: spelled in pieces, which derailed it) is a numeral
        return f"{WORDS[a]} plus {WORDS[b]} is {NUMBER_WORDS[a + b] if a + b < len(NUMBER_WORDS) else a + b}"
    if kind == "larger":  # the LM's own "is bigger than five" pattern, in picture order: equal digits are "not bigger"
        return f"{WORDS[a]} is {'bigger' if a > b else 'not bigger'} than {WORDS[b]}"
    raise DataError(f"unknown question kind '{kind}'; kinds: {', '.join(KINDS)}")


def _words(answer: str) -> list[str]:
    """The first sentence's words, lower-case, without punctuation ('the first one' keeps 'one': callers skip it)."""
    sentence = next((s for s in re.split(r"[.\n]", answer.lower()) if s.strip()), "")
    return re.sub(r"[^a-z0-9 ]", " ", sentence).split()


def _numbers(words: list[str]) -> list[int]:
    """The numbers named, in order: words up to nineteen or numerals; 'one' after first/second/this/which is a pronoun."""
    found = []
    for i, word in enumerate(words):
        if word == "one" and i and words[i - 1] in ("first", "second", "this", "that", "which", "each", "other", "the"):
            continue
        if word in NUMBERS:
            found.append(NUMBERS[word])
        elif word.isdigit():
            found.append(int(word))
    return found


def _last_of(words: list[str], choices: dict[str, str]) -> str | None:
    return next((choices[w] for w in reversed(words) if w in choices), None)


def answer_is_right(kind: str, answer: str, labels: list[int]) -> bool:
    """Whether a generated answer to a turn of `kind` is right, read loosely from its first sentence. `labels` are the
    digits the turn asks about (a sample's turn_labels[i]; one digit for shows/even/plus_one, the pair for larger/sum).

    shows: it names that digit (word or numeral) and no other. even: its last yes/no (else even/odd) is right, and a digit
    it names first is that digit. plus_one: the last number it names is right, and a digit named before "plus" is that
    digit. sum: the last number it names is right. larger: its last first/second/equal is right, else "A is (not)
    bigger than B" names both digits in picture order and the right relation.
    """
    words = _words(answer)
    if kind == "shows":
        return set(n for n in _numbers(words) if n < 10) == {labels[0]}
    numbers = _numbers(words)
    if kind == "even":  # and a digit it names first is the one asked about ("seven is odd, so no" of a five is wrong)
        verdict = _last_of(words, {"yes": "yes", "no": "no"}) or _last_of(words, {"even": "yes", "odd": "no"})
        return verdict == ("yes" if labels[0] % 2 == 0 else "no") and numbers[:1] in ([], [labels[0]])
    if kind == "plus_one":  # and the digit before "plus", if it names one, is the one asked about
        before = _numbers(words[: words.index("plus")]) if "plus" in words else []
        return bool(numbers) and numbers[-1] == labels[0] + 1 and before[-1:] in ([], [labels[0]])
    if kind == "sum":
        return bool(numbers) and numbers[-1] == labels[0] + labels[1]
    if kind == "larger":
        a, b = labels[:2]
        verdict = _last_of(words, {"first": "first", "second": "second", "equal": "equal", "same": "equal"})
        if verdict is not None:
            return verdict == ("first" if a > b else "second" if a < b else "equal")
        # "A is (not) bigger than B": both digits named in picture order, and the relation right
        relation = next((w for w in words if w in ("bigger", "larger", "greater", "smaller")), None)
        if relation is None or numbers[:2] != [a, b]:
            return False
        negated = "not" in words
        if relation == "smaller":
            return a >= b if negated else a < b
        return a <= b if negated else a > b
    raise DataError(f"unknown question kind '{kind}'; kinds: {', '.join(KINDS)}")


class DigitsConversations(Dataset):
    """Multi-turn (2-3 rounds) LLaVA-format conversations about one or two scikit-learn digits of one stored split.

    The first human turn holds one <image> per image; later turns refer back ("And is it even?"). Per gpt turn a sample
    says its kind (turn_kinds), the digits it asks about (turn_labels) and which pictures they are (turn_pictures), whether its phrasing is one train never sees
    (held_out), and whether it asks about both digits of a pair train never shows together (held_pair); both are test
    only, val asks as train does. The samples are drawn once, at construction, from (split, seed): the same arguments
    give the same list.
    """

    judge = staticmethod(lambda kind, answer, labels: answer_is_right(kind, answer, labels))  # what `mmadapt eval` asks
    pair_kinds = PAIR_KINDS  # the questions about two images

    fields: ClassVar[frozenset[str]] = CAPTION_FIELDS | {"image", "conversations", "turn_kinds", "turn_labels", "held_out",
                                                         "held_pair", "turn_pictures", "labels"}

    def __init__(
        self,
        split: Split = "train",  # train | val | test of the stored digits split; only that split's scans are used
        count: PositiveInt = 2000,  # samples to draw
        seed: int = 0,  # another seed draws other conversations over the same scans
        limit: PositiveInt | None = None,  # use only the first N samples (quick tests)
    ) -> None:
        self.split = split
        self.pool = split_indices(split)  # DataError on an unknown split
        rng = random.Random(f"digits_conversations:{split}:{seed}")
        self.samples = [self._draw(rng) for _ in range(count)][:limit]

    def _phrasing(self, kind: str, rng: random.Random) -> tuple[str, bool]:
        """A phrasing of `kind` and whether it is held out (only the test split draws those)."""
        if self.split == "test" and rng.random() < HELD_OUT_SHARE:
            return rng.choice(HELD_OUT_PHRASINGS[kind]), True
        return rng.choice(PHRASINGS[kind]), False

    def _pair(self, rng: random.Random) -> list[int]:
        """Two scans of the split; a held-out digit pair only in test (HELD_OUT_PAIR_SHARE of its pairs)."""
        labels_of = load_digits_arrays()[1]
        if self.split == "test" and rng.random() < HELD_OUT_PAIR_SHARE:
            a, b = rng.sample(sorted(sorted(p) for p in HELD_OUT_PAIRS), 1)[0]
            a, b = (a, b) if rng.random() < 0.5 else (b, a)
            return [rng.choice([i for i in self.pool if labels_of[i] == d]) for d in (a, b)]
        while True:
            indices = [rng.choice(self.pool) for _ in range(2)]
            if frozenset(int(labels_of[i]) for i in indices) not in HELD_OUT_PAIRS:
                return indices

    def _draw(self, rng: random.Random) -> dict[str, Any]:
        labels_of = load_digits_arrays()[1]
        pair = rng.random() < PAIR_SHARE
        indices = self._pair(rng) if pair else [rng.choice(self.pool)]
        digits = [int(labels_of[i]) for i in indices]
        rounds = rng.choice((2, 3))
        if pair:
            options = [(k, "") for k in PAIR_KINDS] + [(k, r) for k in SINGLE_KINDS for r in REFS]
            first = rng.choice([o for o in options if o[0] in PAIR_KINDS])  # the first question is about both
            asked = [first] + rng.sample([o for o in options if o != first], rounds - 1)
        else:
            asked = [(k, "it") for k in rng.sample(SINGLE_KINDS, rounds)]
        turns, kinds, held_out, held_pairs, turn_labels, turn_pictures = [], [], [], [], [], []
        for number, (kind, ref) in enumerate(asked):
            phrasing, held = self._phrasing(kind, rng)
            question = phrasing.format(ref=ref)
            if rng.random() < FRAMED_SHARE:
                question = rng.choice(FRAMES).format(q=question[0].lower() + question[1:])
            if number == 0:
                question = rng.choice(PAIR_INTROS if pair else SINGLE_INTROS).format(q=question)
            else:
                lead = rng.choice(FOLLOW_UPS)
                question = lead + (question[0].lower() + question[1:] if lead else question)
            asks = digits if kind in PAIR_KINDS else [digits[REFS.index(ref)] if pair else digits[0]]
            turns += [{"from": "human", "value": question}, {"from": "gpt", "value": answer_for(kind, asks, rng)}]
            kinds.append(kind)
            held_out.append(held)
            held_pairs.append(kind in PAIR_KINDS and frozenset(digits) in HELD_OUT_PAIRS)
            turn_labels.append(asks)
            turn_pictures.append([0, 1] if kind in PAIR_KINDS else [REFS.index(ref)] if pair else [0])
        return {"indices": indices, "labels": digits, "conversations": turns, "turn_kinds": kinds, "held_out": held_out,
                "held_pair": held_pairs, "turn_labels": turn_labels, "turn_pictures": turn_pictures}

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, position: int) -> dict[str, Any]:
        drawn = self.samples[position]
        pixels = load_digits_arrays()[0]
        images = [digit_image(pixels[i]) for i in drawn["indices"]]
        keys = [hashlib.sha1(b"sklearn-digits" + pixels[i].tobytes()).hexdigest() for i in drawn["indices"]]  # DigitsCaptions' keys
        turns = [dict(turn) for turn in drawn["conversations"]]
        answer = turns[-1]["value"]
        return {"image": images[0] if len(images) == 1 else images, "conversations": turns,
                "prompt": turns[0]["value"], "target": answer, "text": answer,
                "key": keys[0] if len(keys) == 1 else hashlib.sha1(" ".join(keys).encode()).hexdigest(), "id": position,
                "labels": list(drawn["labels"]), "turn_kinds": list(drawn["turn_kinds"]),
                "turn_labels": [list(t) for t in drawn["turn_labels"]], "held_out": list(drawn["held_out"]),
                "held_pair": list(drawn["held_pair"]), "turn_pictures": [list(t) for t in drawn["turn_pictures"]]}
