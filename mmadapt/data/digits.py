"""scikit-learn's 1,797 handwritten digits as an image-caption dataset with a fixed, stored split."""
from __future__ import annotations

import functools
import hashlib
import json
import random
import re
from pathlib import Path
from typing import Any, Callable, ClassVar, Literal, get_args

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from mmadapt.data.captions import CAPTION_FIELDS, Template, format_sample
from mmadapt.errors import DataError
from mmadapt.core.params import PositiveInt

SPLIT_FILE = Path(__file__).resolve().parent / "digits_split.json"
Split = Literal["train", "val", "test"]  # the splits stored in SPLIT_FILE
Style = Literal["varied", "fixed"]  # varied: several caption phrasings; fixed: always one
WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
NUMBER_WORDS = WORDS + ("ten", "eleven")
# Questions about a digit and their one-word answers: the LM learns them from text, bridges are asked them zero-shot.
QUESTIONS: dict[str, Callable[[int], str]] = {
    "Is it even?": lambda d: "yes" if d % 2 == 0 else "no",
    "Is it odd?": lambda d: "yes" if d % 2 else "no",
    "What is it plus one?": lambda d: NUMBER_WORDS[d + 1],
    "What is it plus two?": lambda d: NUMBER_WORDS[d + 2],
    "Is it bigger than five?": lambda d: "yes" if d > 5 else "no",
    "What number is it?": lambda d: NUMBER_WORDS[d],
}
# How the LM's corpus answers: it names the digit first, then reasons in words. The final word is the answer.
REASONED: dict[str, Callable[[int], str]] = {
    "Is it even?": lambda d: f"{WORDS[d]} is {'even' if d % 2 == 0 else 'odd'}, so {QUESTIONS['Is it even?'](d)}",
    "Is it odd?": lambda d: f"{WORDS[d]} is {'odd' if d % 2 else 'even'}, so {QUESTIONS['Is it odd?'](d)}",
    "What is it plus one?": lambda d: f"{WORDS[d]} plus one is {NUMBER_WORDS[d + 1]}",
    "What is it plus two?": lambda d: f"{WORDS[d]} plus two is {NUMBER_WORDS[d + 2]}",
    "Is it bigger than five?": lambda d: f"{WORDS[d]} is {'bigger' if d > 5 else 'not bigger'} than five, so {QUESTIONS['Is it bigger than five?'](d)}",
    "What number is it?": lambda d: f"it is {WORDS[d]}",
}
CAPTION_FORMATS = (
    "a handwritten {word}",
    "the digit {number}",
    "a scan of the number {word}",
    "the number {word}, written by hand",
    "a picture of a {word}",
)


@functools.cache
def load_digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return bunch.images.astype(np.float32), bunch.target.astype(np.int64)  # (1797, 8, 8) in 0..16, (1797,)


def make_split(seed: int = 0, val: int = 200, test: int = 300) -> dict[str, list[int]]:
    """The split stored in digits_split.json; kept as code so the file can be checked and rebuilt."""
    order = np.random.RandomState(seed).permutation(len(load_digits_arrays()[1])).tolist()
    return {"test": sorted(order[:test]), "val": sorted(order[test: test + val]), "train": sorted(order[test + val:])}


@functools.cache
def split_indices(split: str) -> list[int]:
    splits = json.loads(SPLIT_FILE.read_text())
    if split not in splits:
        raise DataError(f"digits split '{split}' unknown; splits: {', '.join(splits)}")
    return splits[split]


def digit_image(pixels: np.ndarray) -> Image.Image:
    """An 8x8 scan (0..16, ink high) as an RGB image, black ink on white like paper."""
    gray = (255 - pixels * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    return Image.fromarray(gray, mode="L").convert("RGB")


def question_prompt(question: str) -> str:
    """The instruction template's prompt for a question."""
    return format_sample("instruction", "", question)[0]


def answer_word(text: str) -> str:
    """The last word of an answer's first sentence, lower-case: 'seven is odd, so no.' -> 'no'."""
    words = re.sub(r"[^a-z0-9 ]", " ", text.lower().split(".")[0]).split()
    return words[-1] if words else ""


def checked_spelled_text(spelled_text: str | None) -> str | None:
    """A spelled-text template ({word}, {number}), tried now: a misspelt field would otherwise stop training at the first sample."""
    if spelled_text is not None:
        try:
            spelled_text.format(word="zero", number=0)
        except (KeyError, IndexError, ValueError) as exc:
            raise DataError(f"spelled_text '{spelled_text}' may name only {{word}} and {{number}} ({type(exc).__name__}: {exc})") from None
    return spelled_text


def spell(spelled_text: str, label: int) -> str:
    """The text a bridge's tokens stand for, for one digit: what a generator's text_alignment pulls toward."""
    return spelled_text.format(word=WORDS[label], number=label)


def caption_for(label: int, style: str, rng: random.Random) -> str:
    if style == "fixed":
        return f"a handwritten {WORDS[label]}"
    return rng.choice(CAPTION_FORMATS).format(word=WORDS[label], number=label)


class DigitsCaptions(Dataset):
    """Each sample: a digit image and a caption naming it ('varied' draws one of several phrasings)."""

    digit_labels = True  # `mmadapt eval` measures cards trained on it by the digit their output names
    fields: ClassVar[frozenset[str]] = CAPTION_FIELDS | {"image", "label"}  # every sample's keys (spelled_text only when set)

    def __init__(
        self,
        split: Split = "train",  # train | val | test, from the stored split
        style: Style = "varied",  # varied: several caption phrasings; fixed: always "a handwritten <word>"
        template: Template = "caption",  # a name in mmadapt.data.captions.TEMPLATES
        prompt: str = "",  # the question, for the instruction template
        limit: PositiveInt | None = None,  # use only the first N samples of the split (quick tests)
        text: str | None = None,  # one text for every sample instead of a caption, e.g. "a handwritten <*>" for a token bridge
        spelled_text: str | None = None,  # what a generator's text_alignment pulls toward, e.g. "The picture shows a {word}."
    ) -> None:
        if style not in get_args(Style):
            raise DataError(f"style must be varied or fixed, got {style!r}")
        self.indices = split_indices(split)[:limit]
        self.style, self.template, self.prompt, self.text = style, template, prompt, text
        self.spelled_text = checked_spelled_text(spelled_text)
        format_sample(template, "", "")
        self.rng = random.Random()  # reseeded from the global RNG state each draw so resume repeats it
        load_digits_arrays()  # import sklearn now: its first import draws from the global RNG

    def __len__(self) -> int:
        return len(self.indices)

    def label(self, position: int) -> int:
        return int(load_digits_arrays()[1][self.indices[position]])

    def __getitem__(self, position: int) -> dict[str, Any]:
        self.rng.seed(random.getrandbits(64))
        images, labels = load_digits_arrays()
        index = self.indices[position]
        text = self.text if self.text is not None else caption_for(int(labels[index]), self.style, self.rng)
        prompt, target = format_sample(self.template, text, self.prompt)
        key = hashlib.sha1(b"sklearn-digits" + images[index].tobytes()).hexdigest()
        sample = {"image": digit_image(images[index]), "prompt": prompt, "target": target, "text": text,
                  "key": key, "id": position, "label": int(labels[index])}
        if self.spelled_text is not None:
            sample["spelled_text"] = spell(self.spelled_text, int(labels[index]))
        return sample
