"""`train.compile`: torch.compile of the parts a training step back-propagates through (bridges, the frozen generator)."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch._inductor.config

if TYPE_CHECKING:
    from mmadapt.core.model import AssembledModel


def compile_nodes(model: AssembledModel) -> list[str]:
    """Compile in place (nn.Module.compile: parameter names and state dicts stay as they are, so cards and checkpoints
    do not change) each node a step back-propagates through: a bridge whole, and in a frozen node the backbone of each
    outermost transformers or diffusers model (a causal LM's body, which its head-at-targets loss calls directly; a
    U-Net or transformer). Nodes upstream of every bridge run without autograd and are left alone. Returns what was
    compiled, as node.path names."""
    from diffusers import ModelMixin
    from transformers import PreTrainedModel

    # Dropout in a trainable bridge draws from torch's own generator, as uncompiled (inductor's faster generator would
    # give other masks), so a compiled run repeats an uncompiled one and resumes as it does.
    torch._inductor.config.fallback_random = True
    compiled = []
    for name, node in model.nodes.items():
        if not model.needs_grad[name]:
            continue
        if all(p.requires_grad for p in node.parameters()):  # a bridge
            node.compile()
            compiled.append(name)
            continue
        found = [(path, m) for path, m in node.named_modules() if isinstance(m, (PreTrainedModel, ModelMixin))]
        outermost = [(path, m) for path, m in found if not any(path.startswith(other + ".") for other, _ in found if other)]
        for path, module in outermost:
            body = module.base_model if isinstance(module, PreTrainedModel) else module
            body.compile()
            compiled.append(".".join(p for p in (name, path, "" if body is module else module.base_model_prefix) if p))
    return compiled

