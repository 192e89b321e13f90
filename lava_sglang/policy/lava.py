"""LAVa (arXiv 2509.09754): value-norm-scaled window scores, dynamic head and layer budgets."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch

from lava_sglang.policy.allocation import distribute, flat_topk_head_budgets
from lava_sglang.policy.base import LayerScores, WindowPolicy, global_allocation, validate_alpha

LAYER_BUDGETS = ("entropy", "uniform", "global")
HEAD_BUDGETS = ("topk", "uniform")


@dataclass(frozen=True)
class Lava(WindowPolicy):
    """Scores are comparable across heads (value-norm scale), so one top-k per layer sets the
    head budgets; layers get budgets in proportion to the entropy of their scores.

    The defaults are the paper's. The other values exist for the ablations of
    docs/allocation.md: `layer_budget` "uniform" gives every layer the same budget, "global"
    replaces both the layer and the head budgets by one threshold over all layers and heads
    (KVzip's allocation of LAVa's scores); `head_budget` "uniform" splits a layer's budget
    evenly over its heads; `value_norm` False drops the value-norm scale.
    """

    name: ClassVar[str] = "lava"
    gqa_reduce: ClassVar[str] = "max"

    alpha: float = 0.2
    layer_budget: str = "entropy"
    head_budget: str = "topk"
    value_norm: bool = True

    @property
    def scale_by_value_norm(self) -> bool:
        return self.value_norm

    def validate(self) -> None:
        super().validate()
        validate_alpha(self.alpha)
        if self.layer_budget not in LAYER_BUDGETS:
            raise ValueError(f"layer_budget must be one of {list(LAYER_BUDGETS)}, got {self.layer_budget!r}")
        if self.head_budget not in HEAD_BUDGETS:
            raise ValueError(f"head_budget must be one of {list(HEAD_BUDGETS)}, got {self.head_budget!r}")
        if not isinstance(self.value_norm, bool):
            raise ValueError(f"value_norm must be a bool, got {self.value_norm!r}")

    def allocate(self, layers: Sequence[LayerScores | None], total: int, prefix_len: int,
                 num_kv_heads: int) -> tuple[list[int], list[list[int]]]:
        if self.layer_budget == "global":
            return global_allocation(layers, total, num_kv_heads)
        return super().allocate(layers, total, prefix_len, num_kv_heads)

    def layer_budgets(self, entropies: list[float], total: int, prefix_len: int) -> list[int]:
        weights = entropies if self.layer_budget == "entropy" else [1.0] * len(entropies)
        return distribute(total, weights, prefix_len)

    def head_budgets(self, scores: torch.Tensor, layer_budget: int) -> list[int]:
        if self.head_budget == "uniform":
            return [layer_budget] * scores.shape[0]
        return flat_topk_head_budgets(scores, layer_budget, self.alpha)
