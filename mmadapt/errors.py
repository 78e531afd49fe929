"""User-facing errors: every problem names its file, node and field, and says what was expected."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a recipe, card or input, located precisely enough to fix."""

    where: str  # e.g. "graph.qformer" or "train"
    field: str  # e.g. "num_queries"; "" when the whole entry is at fault
    message: str

    def __str__(self) -> str:
        location = f"{self.where}.{self.field}" if self.field else self.where
        return f"{location}: {self.message}"


class MMAdaptError(Exception):
    """An error whose message is meant for the user as it stands; the CLI prints it without a traceback."""


class RecipeError(MMAdaptError):
    """A recipe has one or more problems; all are reported at once."""

    def __init__(self, problems: list[Problem], source: str = "recipe") -> None:
        self.problems = list(problems)
        self.source = source
        lines = [f"{source}: {len(self.problems)} problem(s):"] + [f"  - {p}" for p in self.problems]
        super().__init__("\n".join(lines))


class CardError(MMAdaptError):
    """A bridge card cannot be loaded onto the graph it was given; the message says what differs."""


class DataError(MMAdaptError):
    """A data file or sample is unusable; the message names the file and the row."""


class TrainingError(MMAdaptError):
    """Training stopped on purpose (e.g. a NaN loss); the last good checkpoint is kept."""


class ExportError(MMAdaptError):
    """A card cannot be written as a stock model folder (no stock class holds its graph); the message says why."""
