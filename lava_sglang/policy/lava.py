"""LAVa (arXiv 2509.09754): value-norm-scaled window scores, dynamic head and layer budgets."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from lava_sglang.policy.allocation import distribute, flat_topk_head_budgets
from lava_sglang.policy.base import WindowPolicy, validate_alpha


@dataclass(frozen=True)
class Lava(WindowPolicy):
    """Scores are comparable across heads (value-norm scale), so one top-k per layer sets the
    head budgets; layers get budgets in proportion to the entropy of their scores."""

    name: ClassVar[str] = "lava"
    gqa_reduce: ClassVar[str] = "max"
    scale_by_value_norm: ClassVar[bool] = True

    alpha: float = 0.2

    def validate(self) -> None:
        super().validate()
        validate_alpha(self.alpha)

    def layer_budgets(self, entropies: list[float], total: int, prefix_len: int) -> list[int]:
        return distribute(total, entropies, prefix_len)

    def head_budgets(self, scores: torch.Tensor, layer_budget: int) -> list[int]:
        return flat_topk_head_budgets(scores, layer_budget, self.alpha)
