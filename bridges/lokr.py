"""LoKr (Kronecker-product adapter, the DiffuseKronA method) inside a frozen node, through peft."""
from __future__ import annotations

from typing import Any

from mmadapt.core.nodes import Adapter
from mmadapt.core.params import PositiveInt


class LoKr(Adapter):
    """peft's LoKrConfig injected into the node's inner model: W + (A kron B) with far fewer tensors than LoRA."""

    def __init__(
        self,
        r: PositiveInt = 8,
        alpha: PositiveInt = 8,  # scale = alpha / r, kept in the card's peft config
        decompose_factor: int = -1,  # Kronecker factor size; -1 lets peft pick the most square split
        decompose_both: bool = False,  # low-rank the larger factor as well
        target_modules: list[str] | None = None,  # None = the node's default, else peft's
        target: str | None = None,  # which inner model of the node; None = the node's default
    ) -> None:
        super().__init__(r=r, alpha=alpha, decompose_factor=decompose_factor, decompose_both=decompose_both,
                         target_modules=target_modules, target=target)
        self.r, self.alpha, self.target_modules, self.target = r, alpha, target_modules, target
        self.decompose_factor, self.decompose_both = decompose_factor, decompose_both

    def peft_config(self, default_modules: list[str] | None = None) -> Any:
        from peft import LoKrConfig

        return LoKrConfig(r=self.r, alpha=self.alpha, decompose_factor=self.decompose_factor,
                          decompose_both=self.decompose_both, target_modules=self.target_modules or default_modules)
