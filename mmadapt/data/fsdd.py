"""The Free Spoken Digit Dataset: real recordings of spoken digits, read from a folder the user names."""
from __future__ import annotations

import functools
import os
import random
import re
import subprocess
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, get_args

import numpy as np
from torch.utils.data import Dataset

from mmadapt.data.captions import CAPTION_FIELDS, Template, format_sample
from mmadapt.data.digits import WORDS, Style, checked_spelled_text, digit_image, load_digits_arrays, spell, split_indices
from mmadapt.errors import DataError, MMAdaptError
from mmadapt.core.params import OneOf, PositiveInt
from mmadapt.core.semantics import Finding

ENV_VAR = "MMADAPT_FSDD"
REPOSITORY = "https://github.com/Jakobovski/free-spoken-digit-dataset.git"
FILE_NAME = re.compile(r"^(\d)_([a-z]+)_(\d+)\.wav$")
# FSDD's own convention: indices 0-4 of each digit and speaker are test. We hold 5-9 out of the rest for validation.
SPLIT_INDICES = {"test": range(0, 5), "val": range(5, 10), "train": range(10, 50), "train_all": range(5, 50)}
FSDDSplit = Annotated[str, OneOf(tuple(SPLIT_INDICES))]
CAPTION_FORMATS = ("the number {word}", "the digit {number}", "the spoken number {word}")


def fsdd_root(root: str | Path | None = None) -> Path:
    """The folder holding `recordings/`: the argument, else $MMADAPT_FSDD; there is no default place."""
    given = root or os.environ.get(ENV_VAR)
    if not given:
        raise DataError(f"FSDD: no folder given; pass root:, set {ENV_VAR}, or fetch it with `mmadapt data fsdd DIR`")
    folder = Path(given).expanduser()
    if (folder / "recordings").is_dir():
        return folder
    raise DataError(
        f"FSDD not found at {folder} (no recordings/ folder); pass root:, set {ENV_VAR}, "
        "or fetch it with `mmadapt data fsdd DIR`"
    )


def fsdd_available(root: str | Path | None = None) -> bool:
    try:
        fsdd_root(root)
    except DataError:
        return False
    return True


@functools.cache
def recordings(root: Path) -> tuple[tuple[Path, int, str, int], ...]:
    """(path, digit, speaker, index) for every recording, sorted by file name so positions never move."""
    found = []
    for path in sorted((root / "recordings").iterdir()):
        match = FILE_NAME.match(path.name)
        if match:
            found.append((path, int(match[1]), match[2], int(match[3])))
    if not found:
        raise DataError(f"{root / 'recordings'}: no files named like 7_jackson_32.wav")
    return tuple(found)


def fetch_fsdd(folder: str | Path) -> Path:
    """Clone the public FSDD repository (needs internet; the recordings are CC BY-SA 4.0)."""
    folder = Path(folder)
    if (folder / "recordings").is_dir():
        return folder
    try:
        subprocess.run(["git", "clone", "--depth", "1", REPOSITORY, str(folder)], check=True)
    except (OSError, subprocess.CalledProcessError) as exc:
        raise MMAdaptError(f"could not clone {REPOSITORY} into {folder} ({exc}); is there internet and git?") from None
    return fsdd_root(folder)


def scans_by_digit(split: str) -> dict[int, list[np.ndarray]]:
    """The 8x8 scans of a digits split, grouped by the digit they show."""
    pixels, labels = load_digits_arrays()
    grouped: dict[int, list[np.ndarray]] = {digit: [] for digit in range(10)}
    for index in split_indices(split):
        grouped[int(labels[index])].append(pixels[index])
    return grouped


class FSDDCaptions(Dataset):
    """Each sample: one recording of a spoken digit and a caption naming the number."""

    digit_labels = True  # `mmadapt eval` measures cards trained on it by the digit their output names
    fields: ClassVar[frozenset[str]] = CAPTION_FIELDS | {"audio", "label", "speaker"}  # every sample's keys, spelled_text aside

    @classmethod
    def fields_for(cls, params: dict[str, Any]) -> frozenset[str]:
        """With paired_image, each recording also carries the scan of its digit."""
        return cls.fields | ({"image"} if params.get("paired_image") else set())

    @classmethod
    def param_problems(cls, params: dict[str, Any]) -> list[Finding]:
        """The FSDD folder (root:, else $MMADAPT_FSDD) holds recordings/. Named nowhere, or missing together with the folder
        above it, it is a note: the data is fetched on the machine that trains (`mmadapt data fsdd DIR`)."""
        root = params.get("root")
        if root is not None and not isinstance(root, str):
            return []  # the type is checked from the annotation
        try:
            fsdd_root(root)
        except DataError as exc:
            given = root or os.environ.get(ENV_VAR)
            if not given:
                return [Finding("root", str(exc), note=True)]
            origin = "the recipe's root" if root else f"${ENV_VAR}"
            folder = Path(given).expanduser()
            elsewhere = not folder.is_dir() and not folder.parent.is_dir()  # another machine's place
            return [Finding("root", f"{exc} (the place named by {origin})", note=elsewhere)]
        return []

    def __init__(
        self,
        split: FSDDSplit = "train",  # test (indices 0-4), val (5-9), train (10-49) or train_all (5-49), per digit and speaker
        root: str | None = None,  # the FSDD folder; default $MMADAPT_FSDD
        style: Style = "varied",  # varied: several caption phrasings; fixed: always "the number <word>"
        template: Template = "caption",  # a name in mmadapt.data.captions.TEMPLATES
        prompt: str = "",  # the question, for the instruction template
        limit: PositiveInt | None = None,  # only the first N samples, spread over digits and speakers (quick tests)
        text: str | None = None,  # one text for every sample, e.g. "a handwritten <*>" for a token bridge
        speakers: list[str] | None = None,  # keep only these speakers (e.g. to hold one out)
        # "digits": each recording also carries a handwritten scan of its digit (from the digits split of the same
        # name; train_all draws from train), the picture a diffusion generator learns to draw for it. AudioToken pairs
        # a clip with a frame of its own video; FSDD has no pictures, so the digit is what the two share.
        paired_image: Literal["digits"] | None = None,
        # What a generator's text_alignment pulls toward ({word}, {number}): "a handwritten {word}" for a diffusion prompt's
        # placeholder, "The picture shows a {word}." for an LM prefix (a sentence digits-lm read before its answers)
        spelled_text: str | None = None,
    ) -> None:
        if split not in SPLIT_INDICES:
            raise DataError(f"FSDD split '{split}' unknown; splits: {', '.join(SPLIT_INDICES)}")
        if style not in get_args(Style):
            raise DataError(f"style must be varied or fixed, got {style!r}")
        format_sample(template, "", "")
        if paired_image not in (None, "digits"):
            raise DataError(f"paired_image must be 'digits' or left out, got {paired_image!r}")
        self.paired_scans = scans_by_digit("train" if split == "train_all" else split) if paired_image else None
        self.root = fsdd_root(root)
        every = recordings(self.root)
        known = sorted({speaker for _, _, speaker, _ in every})
        unknown = sorted(set(speakers or []) - set(known))
        if unknown:
            raise DataError(f"speakers {unknown} are not in {self.root}; speakers there: {', '.join(known)}")
        kept = [r for r in every if r[3] in SPLIT_INDICES[split] and (speakers is None or r[2] in speakers)]
        kept.sort(key=lambda r: (r[3], r[2], r[1]))  # interleaved, so a limit still covers every digit and speaker
        self.rows = kept[:limit]
        self.style, self.template, self.prompt, self.text, self.spelled_text = style, template, prompt, text, checked_spelled_text(spelled_text)
        self.rng = random.Random()  # reseeded from the global RNG state each draw so resume repeats it

    def __len__(self) -> int:
        return len(self.rows)

    def label(self, position: int) -> int:
        return self.rows[position][1]

    def group(self, position: int) -> str:
        """The speaker: eval reports accuracy per speaker."""
        return self.rows[position][2]

    def caption(self, label: int) -> str:
        if self.style == "fixed":
            return f"the number {WORDS[label]}"
        return self.rng.choice(CAPTION_FORMATS).format(word=WORDS[label], number=label)

    def __getitem__(self, position: int) -> dict[str, Any]:
        from mmadapt.data.modalities import content_key

        self.rng.seed(random.getrandbits(64))
        path, label, speaker, _ = self.rows[position]
        text = self.text if self.text is not None else self.caption(label)
        prompt, target = format_sample(self.template, text, self.prompt)
        sample = {"audio": path, "prompt": prompt, "target": target, "text": text, "key": content_key(path),
                  "id": position, "label": label, "speaker": speaker}
        if self.spelled_text is not None:
            sample["spelled_text"] = spell(self.spelled_text, label)
        if self.paired_scans is not None:
            sample["image"] = digit_image(self.rng.choice(self.paired_scans[label]))
        return sample
