"""`mmadapt info`: one dummy forward pass recording each node's input and output shapes."""
from __future__ import annotations

from typing import Any

import torch

from mmadapt.data.collate import collator_for
from mmadapt.data.modalities import modality_of
from mmadapt.core.model import AssembledModel


def _shape(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return "(" + ", ".join(str(d) for d in value.shape) + ")"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_shape(v)}" for k, v in value.items() if k != "logits") + "}"
    return type(value).__name__


def node_table(model: AssembledModel) -> str:
    """A table of nodes: type, frozen or trainable, parameter counts, input and output shapes for B=1."""
    shapes: dict[str, tuple[str, str]] = {}

    def hook(name: str) -> Any:
        def record(module: Any, args: Any, kwargs: dict[str, Any], output: Any) -> None:
            inputs = ", ".join(f"{k}={_shape(v)}" for k, v in kwargs.items() if k not in ("attention_mask", "labels"))
            shapes[name] = (inputs, _shape(output))
        return record

    handles = [node.register_forward_hook(hook(n), with_kwargs=True) for n, node in model.nodes.items()]
    sample = {**model.generator.example_sample(), "key": "info", "id": 0}
    for name, encoder in model.encoders().items():  # each encoder's input: its modality's example value
        for ref in (r for refs in model.plan.inputs[name].values() for r in refs if r.is_data):
            sample.setdefault(ref.key, modality_of(encoder).example())
    batch = collator_for(model, max_tokens=8, skip_bad_samples=False)([sample])
    model.eval()
    with torch.no_grad():
        model(batch)
    for handle in handles:
        handle.remove()
    rows = [("node", "type", "state", "params", "trainable", "inputs", "output")]
    for name in model.order:
        node = model.nodes[name]
        total = sum(p.numel() for p in node.parameters())
        trainable = sum(p.numel() for p in node.parameters() if p.requires_grad)
        state = "trainable" if trainable and trainable == total else ("frozen+adapter" if trainable else "frozen")
        inputs, output = shapes.get(name, ("-", "-"))
        rows.append((name, model.recipe.nodes[name].type, state, f"{total:,}", f"{trainable:,}", inputs, output))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    total_trainable = sum(p.numel() for p in model.trainable_parameters().values())
    lines.append(f"trainable parameters: {total_trainable:,}")
    return "\n".join(lines)
