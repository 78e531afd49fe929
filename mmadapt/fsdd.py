"""The Free Spoken Digit Dataset: real recordings of spoken digits, read from a folder the user names."""
from __future__ import annotations

import functools
import os
import random
import re
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from mmadapt.data import format_sample
from mmadapt.digits import WORDS, checked_spelled_text, digit_image, load_digits_arrays, spell, split_indices
from mmadapt.errors import DataError, MMAdaptError

ENV_VAR = "MMADAPT_FSDD"
# Beside the checkout, where this workplace keeps it; users point MMADAPT_FSDD or `root:` elsewhere.
DEFAULT_ROOT = Path(__file__).resolve().parents[2] / "shared" / "data" / "fsdd"
REPOSITORY = "https://github.com/Jakobovski/free-spoken-digit-dataset.git"
FILE_NAME = re.compile(r"^(\d)_([a-z]+)_(\d+)\.wav$")
# FSDD's own convention: indices 0-4 of each digit and speaker are test. We hold 5-9 out of the rest for validation.
SPLIT_INDICES = {"test": range(0, 5), "val": range(5, 10), "train": range(10, 50), "train_all": range(5, 50)}
CAPTION_FORMATS = ("the number {word}", "the digit {number}", "the spoken number {word}")


def fsdd_root(root: str | Path | None = None) -> Path:
    """The folder holding `recordings/`: the argument, else $MMADAPT_FSDD, else ../shared/data/fsdd."""
    folder = Path(root or os.environ.get(ENV_VAR) or DEFAULT_ROOT).expanduser()
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

    def __init__(
        self,
        split: str = "train",  # test (indices 0-4), val (5-9), train (10-49) or train_all (5-49), per digit and speaker
        root: str | None = None,  # the FSDD folder; default $MMADAPT_FSDD, then ../shared/data/fsdd
        style: str = "varied",  # varied: several caption phrasings; fixed: always "the number <word>"
        template: str = "caption",  # a name in mmadapt.data.TEMPLATES
        prompt: str = "",  # the question, for the instruction template
        limit: int | None = None,  # only the first N samples, spread over digits and speakers (quick tests)
        text: str | None = None,  # one text for every sample, e.g. "a handwritten <*>" for a token bridge
        speakers: list[str] | None = None,  # keep only these speakers (e.g. to hold one out)
        # "digits": each recording also carries a handwritten scan of its digit (from the digits split of the same
        # name; train_all draws from train), the picture a diffusion decoder learns to draw for it. AudioToken pairs
        # a clip with a frame of its own video; FSDD has no pictures, so the digit is what the two share.
        paired_image: str | None = None,
        # What a decoder's text_alignment pulls toward ({word}, {number}): "a handwritten {word}" for a diffusion prompt's
        # placeholder, "The picture shows a {word}." for an LM prefix (a sentence digits-lm read before its answers)
        spelled_text: str | None = None,
    ) -> None:
        if split not in SPLIT_INDICES:
            raise DataError(f"FSDD split '{split}' unknown; splits: {', '.join(SPLIT_INDICES)}")
        if style not in ("varied", "fixed"):
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
        from mmadapt.encoders.audio import audio_key

        self.rng.seed(random.getrandbits(64))
        path, label, speaker, _ = self.rows[position]
        text = self.text if self.text is not None else self.caption(label)
        prompt, target = format_sample(self.template, text, self.prompt)
        sample = {"audio": path, "prompt": prompt, "target": target, "text": text, "key": audio_key(path),
                  "id": position, "label": label, "speaker": speaker}
        if self.spelled_text is not None:
            sample["spelled_text"] = spell(self.spelled_text, label)
        if self.paired_scans is not None:
            sample["image"] = digit_image(self.rng.choice(self.paired_scans[label]))
        return sample
