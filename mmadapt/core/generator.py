"""The generator contract: everything that depends on the kind of frozen generator (text, images, ...) lives behind it."""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Iterator

import torch

from mmadapt.core.nodes import Node, adapters_off

if TYPE_CHECKING:
    from mmadapt.core.model import AssembledModel


class Generator(Node):
    """A frozen generator that turns bridge outputs plus data into a loss, and can generate.

    The rest of mmadapt asks a generator through these methods and never branches on its kind: the collator through
    `prepare`/`collate`, the trainer through `forward` (the objective), `loss_items` and `examples`, cards through
    `export`, `mmadapt eval` through `evaluation`, the model through `tokens_by_source`. A new kind is one subclass.
    """

    role = "generator"
    # What `generate` returns, as the demos name it: "text" (strings) or "image" (PIL images). Demos pick cards by it;
    # nothing else reads it.
    output: ClassVar[str] = "text"
    # Dotted path of the function `mmadapt eval` runs on a card of this kind trained on labelled data:
    # f(model, card_dir, grid, limit) -> figures. None: eval reports the validation loss only.
    evaluation: ClassVar[str | None] = None

    # --- data ---
    def prepare(self, sample: dict[str, Any], max_tokens: int) -> Any:
        """One sample's generator data (token ids, a target image); a bad sample raises DataError and is skipped."""
        raise NotImplementedError

    def collate(self, rows: list[Any]) -> dict[str, torch.Tensor | None]:
        """Prepared rows -> the generator's data inputs for the batch, keyed by forward argument."""
        raise NotImplementedError

    def example_sample(self) -> dict[str, Any]:
        """The fields a dummy sample needs for this generator (the encoders' inputs come from the modality table):
        what `mmadapt info` runs one forward pass on."""
        return {"prompt": "", "target": "a", "text": "a"}

    # --- objective (forward returns {"loss": (,) mean over loss_items, ...}) ---
    def loss_items(self, inputs: dict[str, Any], batch_size: int) -> int:
        """How many items this micro-batch's mean loss runs over, from the generator's collated inputs: the trainer
        weights micro-batches by it so accumulation and DDP equal one big batch. Default: one per sample."""
        return batch_size

    def tokens_by_source(self) -> bool:
        """Whether bridge tokens reach this generator per source and row (RowTokens) even when every row has them,
        because where they go depends on their source (prompt markers)."""
        return False

    # --- generation ---
    def chats(self) -> bool:
        """Whether generation continues a conversation (LLaVA-format turns, formatted by a chat template), so that a
        demo keeps the history; else each prompt is asked on its own."""
        return False

    def generate(self, prompts: list[str], **inputs: Any) -> list[Any]:
        """Outputs for prompts, conditioned on the bridges' outputs keyed by the generator's ports."""
        raise NotImplementedError

    def examples(self, model: AssembledModel, batch: dict[str, Any], count: int, folder: Path, step: int,
                 write: bool = True, max_new_tokens: int = 16) -> list[dict[str, str]]:
        """A few generations for the training log, from a collated validation batch; files (if any) go under `folder`,
        and only when `write` (rank 0). Default: text (at most `max_new_tokens`) against the reference."""
        texts = model.generate(batch, batch["prompts"], max_new_tokens=max_new_tokens)
        return [{"reference": r, "generated": g} for r, g in zip(batch["texts"][:count], texts[:count])]

    @contextmanager
    def adapters_disabled(self) -> Iterator[None]:
        """The frozen base: every adapter inside this generator switched off for the block."""
        with adapters_off(self):
            yield

    # --- exports ---
    # Modules that can write a card of this kind as a stock model folder (`mmadapt export`), tried in order. Each has
    # `problem(model) -> str | None` (why the card does not fit its class) and `write(model, folder) -> list[str]`.
    stock_exports: ClassVar[tuple[str, ...]] = ()

    def export_stock(self, model: AssembledModel, folder: Path) -> list[str]:
        """Write the card as the first stock class that holds its graph; ExportError listing each class's reason if none."""
        import importlib

        from mmadapt.errors import ExportError

        reasons = []
        for path in self.stock_exports:
            exporter = importlib.import_module(path)
            reason = exporter.problem(model)
            if reason is None:
                return exporter.write(model, folder)
            reasons.append(f"{path.rsplit('.', 1)[-1]}: {reason}")
        if not reasons:
            raise ExportError(f"no stock class holds a {type(self).__name__} card; its files beside the card "
                              "(peft/, diffusers/) are what other libraries load")
        raise ExportError("no stock class holds this card's graph:\n" + "\n".join(f"  - {r}" for r in reasons))

    def export(self, model: AssembledModel, folder: Path) -> list[str]:
        """Write, beside a card, the files stock libraries load for this kind (e.g. diffusers' LoRA); return their
        names. peft folders for every adapted node are written by the card itself."""
        return []
