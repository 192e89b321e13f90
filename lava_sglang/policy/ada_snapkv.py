"""Ada-SnapKV: SnapKV scores, head budgets from one top-k per layer, uniform layer budgets."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from lava_sglang.policy.allocation import flat_topk_head_budgets
from lava_sglang.policy.base import WindowPolicy, validate_alpha


@dataclass(frozen=True)
class AdaSnapKV(WindowPolicy):
    name: ClassVar[str] = "ada_snapkv"
    reads_alpha: ClassVar[bool] = True

    alpha: float = 0.2

    def validate(self) -> None:
        super().validate()
        validate_alpha(self.alpha)

    def head_budgets(self, scores: torch.Tensor, layer_budgets: list[int]) -> list[list[int]]:
        return flat_topk_head_budgets(scores, layer_budgets, self.alpha)
