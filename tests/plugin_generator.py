"""An outside generator kind: a frozen linear head that names one of the ten digits from bridge tokens. It joins a graph
through its dotted path (plugin_generator.DigitClassifier), with no registration, and keeps mmadapt's Generator
contract: its data from each sample (prepare/collate), a loss from forward, strings from generate."""
from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

from mmadapt.core.generator import Generator
from mmadapt.core.identity import config_hash
from mmadapt.core.nodes import RowTokens
from mmadapt.core.params import PositiveInt
from mmadapt.data.digits import WORDS
from mmadapt.errors import DataError, MMAdaptError

UNLABELLED = -1  # a sample to classify, not to train on (generation passes samples without a label)


def argument(cls: type, params: dict[str, Any], name: str) -> Any:
    """A constructor argument as the constructor will see it: the recipe's, else the signature's default."""
    return params.get(name, inspect.signature(cls.__init__).parameters[name].default)


class DigitClassifier(Generator):
    """tokens (B, N, D) -> mean over N -> frozen Linear(D, 10) -> cross-entropy against each sample's `label`."""

    output = "text"  # generate returns class names
    evaluation = None  # `mmadapt eval` reports the validation loss
    default_inputs = {"labels": "data.labels"}  # filled by collate; the bridge's tokens come in on `tokens`

    def __init__(
        self,
        width: PositiveInt = 16,  # D: the width of the tokens the head reads (the bridge's out_dim is inferred from it)
        seed: int = 0,  # init seed of the random head, so a card rebuilds the same frozen weights
    ) -> None:
        super().__init__()
        self.width, self.seed = width, seed
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            self.head = nn.Linear(width, len(WORDS))

    # --- widths: the port `tokens` takes width D, known from the recipe alone ---
    @classmethod
    def config_widths(cls, params: dict[str, Any]) -> dict[str, int]:
        return {"tokens": int(argument(cls, params, "width"))}

    def widths(self) -> dict[str, int]:
        return {"tokens": self.width}

    def describe(self) -> dict[str, Any]:
        return {"source": "inline-config", "config_hash": config_hash({"class": "DigitClassifier", "width": self.width, "seed": self.seed})}

    # --- data ---
    def prepare(self, sample: dict[str, Any], max_tokens: int) -> int:
        """The sample's label, 0..9; a sample without one (to classify) is UNLABELLED; any other value is a DataError."""
        if "label" not in sample or sample["label"] is None:
            return UNLABELLED
        label = sample["label"]
        if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < len(WORDS):
            raise DataError(f"sample {sample.get('id', '?')} (key {sample.get('key', '?')}): label must be an integer "
                            f"0..{len(WORDS) - 1}, got {label!r}")
        return label

    def collate(self, rows: list[int]) -> dict[str, torch.Tensor | None]:
        labelled = [row != UNLABELLED for row in rows]
        if any(labelled) and not all(labelled):
            raise MMAdaptError("some samples of a batch carry a label and some do not; the classifier trains on labelled ones only")
        return {"labels": torch.tensor(rows, dtype=torch.long) if all(labelled) else None}  # (B,)

    def example_sample(self) -> dict[str, Any]:
        return {"prompt": "", "target": WORDS[3], "text": WORDS[3], "label": 3}

    # --- objective ---
    def pooled(self, tokens: torch.Tensor | RowTokens) -> torch.Tensor:
        """(B, D): the mean token of each row (a mixed batch's rows: over all their pieces)."""
        if isinstance(tokens, RowTokens):
            return torch.stack([torch.cat([t for _, t in row]).mean(0) for row in tokens.rows])
        return tokens.mean(dim=1)

    def logits(self, tokens: torch.Tensor | RowTokens) -> torch.Tensor:
        pooled = self.pooled(tokens)
        return self.head(pooled.to(self.head.weight.dtype))  # (B, 10)

    def forward(self, tokens: torch.Tensor | RowTokens | None = None, labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        if tokens is None:
            raise MMAdaptError("the digit classifier needs bridge tokens on its 'tokens' input")
        if labels is None:
            raise MMAdaptError("the digit classifier trains on labelled samples; this batch has no label")
        logits = self.logits(tokens)
        return {"loss": nn.functional.cross_entropy(logits.float(), labels), "logits": logits}

    # --- generation ---
    @torch.no_grad()
    def generate(self, prompts: list[str], tokens: torch.Tensor | RowTokens | None = None, **settings: Any) -> list[str]:
        """The class name each row's tokens score highest; the prompt and decoding settings do not apply."""
        if tokens is None:
            raise MMAdaptError("the digit classifier needs bridge tokens to name a digit")
        return [WORDS[int(i)] for i in self.logits(tokens).argmax(dim=-1)]
