"""LoRA inside a frozen node, through peft: the adapter weights are the node's trainable tensors."""
from __future__ import annotations

from typing import Any

from mmadapt.core.nodes import Adapter
from mmadapt.core.params import Dropout, PositiveInt


class LoRA(Adapter):
    """peft's LoraConfig injected into the node's inner model; peft picks target modules when none are named."""

    def __init__(
        self,
        r: PositiveInt = 8,
        alpha: PositiveInt = 16,  # scale = alpha / r; saved in the card's peft config so it is never lost
        dropout: Dropout = 0.0,
        target_modules: list[str] | None = None,  # e.g. [q_proj, v_proj]; None = the node's default, else peft's
        target: str | None = None,  # which inner model of the node, e.g. text_encoder; None = the node's default
    ) -> None:
        super().__init__(r=r, alpha=alpha, dropout=dropout, target_modules=target_modules, target=target)
        self.r, self.alpha, self.dropout, self.target_modules, self.target = r, alpha, dropout, target_modules, target

    def peft_config(self, default_modules: list[str] | None = None) -> Any:
        from peft import LoraConfig

        return LoraConfig(r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout,
                          target_modules=self.target_modules or default_modules)
