"""Packing for a training step: a batch's rows laid end to end in fewer rows, each sample attending only to itself.

transformers builds the block-diagonal causal mask itself when it is given no attention mask and position ids that
restart at 0 where a sample starts (`masking_utils.find_packed_sequence_indices`, the format of its
`DataCollatorWithFlattening`); this module only lays the rows out. Each sample keeps the positions 0..n-1 it has
unpacked, and the label of its first token, which no position of its own predicts, is cleared, so the token before it
(the previous sample's last) predicts nothing: the loss is the unpacked loss.
"""
from __future__ import annotations

import sys

import torch

from mmadapt.generators.chat import IGNORE_INDEX


def bins(lengths: list[int]) -> list[list[int]]:
    """Row indices grouped first-fit-decreasing into bins as long as the longest row: never more rows than the batch,
    and never a longer one, so packing removes padding work and adds none."""
    capacity = max(lengths)
    groups: list[list[int]] = []
    room: list[int] = []
    for row in sorted(range(len(lengths)), key=lambda r: (-lengths[r], r)):
        for index, free in enumerate(room):
            if lengths[row] <= free:
                groups[index].append(row)
                room[index] -= lengths[row]
                break
        else:
            groups.append([row])
            room.append(capacity - lengths[row])
    return groups


def pack(embeds: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded (B, L, D) embeddings with their (B, L) mask and labels -> packed (R, L', D) embeddings, (R, L')
    position ids and (R, L') labels, R <= B, L' <= L. The tail of a bin is padding with positions of its own from 0,
    which transformers reads as one more sample: it attends to itself only and carries no label."""
    lengths = attention_mask.sum(1).tolist()  # (B,) the rows are right-padded: the first n tokens are real
    groups = bins(lengths)
    width = max(sum(lengths[r] for r in group) for group in groups)
    rows, positions, targets = [], [], []
    for group in groups:
        used = sum(lengths[r] for r in group)
        rows.append(torch.cat([embeds[r, : lengths[r]] for r in group] + [embeds.new_zeros(width - used, embeds.shape[-1])]))
        positions.append(torch.cat([torch.arange(lengths[r]) for r in group] + [torch.arange(width - used)]))
        row_labels = [labels[r, : lengths[r]].clone() for r in group]
        for piece in row_labels:
            piece[:1] = IGNORE_INDEX  # predicted by the previous sample's last token once packed; by nothing unpacked
        targets.append(torch.cat(row_labels + [labels.new_full((width - used,), IGNORE_INDEX)]))
    device = embeds.device
    return torch.stack(rows), torch.stack(positions).to(device), torch.stack(targets)


class _Reached(Exception):
    """Raised by the probe's stand-in mask builder: the forward got as far as the mask, nothing more is needed."""


def packing_problem(model: torch.nn.Module) -> str | None:
    """Why the LM cannot take a packed batch, or None. Its backbone must hand `position_ids` to transformers'
    `create_causal_mask`, which then sees where samples restart (OPT, for one, builds its mask without them, so packed
    samples would attend to each other). Probed by running the backbone on two tokens up to its mask: an embedding
    lookup, no layer."""
    backbone = model.base_model
    module = sys.modules.get(type(backbone).__module__)
    builder = getattr(module, "create_causal_mask", None)
    name = type(backbone).__name__
    if builder is None:
        return f"{name} does not build its attention mask with transformers' create_causal_mask, so it cannot read packed position ids"
    seen: dict[str, object] = {}

    def probe(*args: object, **kwargs: object) -> None:
        seen.update(kwargs)
        raise _Reached

    width = model.get_input_embeddings().embedding_dim
    setattr(module, "create_causal_mask", probe)
    try:
        with torch.no_grad():
            backbone(inputs_embeds=torch.zeros(1, 2, width, dtype=model.dtype, device=model.device),
                     position_ids=torch.zeros(1, 2, dtype=torch.long, device=model.device), use_cache=False)
    except _Reached:
        pass
    except Exception as exc:  # noqa: BLE001 - any failure before the mask means the layout is not the one probed for
        return f"{name} could not be probed for packing ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
    finally:
        setattr(module, "create_causal_mask", builder)
    if seen.get("position_ids") is None:
        return f"{name} builds its attention mask without the position ids, so packed samples would attend to each other"
    return None
