"""LAVa (arXiv 2509.09754): its scores and budget allocations. The default is one threshold
over every layer and head on unscaled, unpooled scores (docs/allocation.md); the paper's
value-norm-scaled, pooled scores with dynamic layer and head budgets are `PAPER_SPEC`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from lava_sglang.checks import check_bool
from lava_sglang.policy.allocation import distribute, flat_topk_head_budgets
from lava_sglang.policy.base import WindowPolicy, global_allocation, validate_alpha

LAYER_BUDGETS = ("entropy", "uniform", "global")
HEAD_BUDGETS = ("topk", "uniform")


#: The paper's LAVa (lava.md): value-norm-scaled, max-pooled scores, entropy layer budgets,
#: one top-k per layer for the head budgets.
PAPER_SPEC = "lava:layer_budget=entropy,value_norm=true,pool_kernel=7"


@dataclass(frozen=True)
class Lava(WindowPolicy):
    """LAVa's scores (GQA max, optionally max-pooled and scaled by the head's largest value
    norm) and its allocation options.

    `layer_budget`: "entropy" (the paper: layers get budgets in proportion to the entropy of
    their scores, and one top-k per layer sets the head budgets, with the safeguard
    `alpha`), "uniform" (every layer the same budget, heads by that top-k) or "global" (one
    threshold over all layers and heads, KVzip's allocation; `alpha` and `head_budget` do
    not apply, and a value other than their default is refused, as `alpha` is with
    `head_budget` "uniform"). `head_budget` "uniform" splits a layer's budget evenly over its heads.

    The defaults are what measured best on prefixes scored by a repetition (the server's
    default source; docs/allocation.md): global budgets over the unpooled, unscaled scores.
    The paper's configuration is `PAPER_SPEC`.
    """

    name: ClassVar[str] = "lava"
    gqa_reduce: ClassVar[str] = "max"

    pool_kernel: int = 1
    alpha: float = 0.2
    layer_budget: str = "global"
    head_budget: str = "topk"
    value_norm: bool = False

    @property
    def scale_by_value_norm(self) -> bool:
        return self.value_norm

    @property
    def uses_layer_entropy(self) -> bool:
        return self.layer_budget == "entropy"

    @property
    def reads_alpha(self) -> bool:
        return self.layer_budget != "global" and self.head_budget == "topk"

    def validate(self) -> None:
        super().validate()
        validate_alpha(self.alpha)
        if self.layer_budget not in LAYER_BUDGETS:
            raise ValueError(f"layer_budget must be one of {list(LAYER_BUDGETS)}, got {self.layer_budget!r}")
        if self.head_budget not in HEAD_BUDGETS:
            raise ValueError(f"head_budget must be one of {list(HEAD_BUDGETS)}, got {self.head_budget!r}")
        # An option set here that the allocation does not read would change nothing.
        if self.layer_budget == "global" and self.head_budget != "topk":
            raise ValueError(f"head_budget={self.head_budget} needs per-layer budgets (layer_budget=entropy or "
                             "uniform): layer_budget=global sets every head's budget by one threshold")
        if not self.reads_alpha and self.alpha != Lava.alpha:
            raise ValueError(f"alpha={self.alpha} is read only by the per-layer head top-k (layer_budget=entropy or "
                             "uniform, head_budget=topk)")
        check_bool("value_norm", self.value_norm)

    def allocate(self, scores: torch.Tensor | None, entropies: list[float], total: int, prefix_len: int,
                 num_kv_heads: int) -> tuple[list[int], list[list[int]]]:
        if self.layer_budget == "global":
            return global_allocation(scores, total)
        return super().allocate(scores, entropies, total, prefix_len, num_kv_heads)

    def layer_budgets(self, entropies: list[float], total: int, prefix_len: int) -> list[int]:
        if self.layer_budget == "entropy":
            return distribute(total, entropies, prefix_len)
        return super().layer_budgets(entropies, total, prefix_len)

    def head_budgets(self, scores: torch.Tensor, layer_budgets: list[int]) -> list[list[int]]:
        if self.head_budget == "uniform":
            return super().head_budgets(scores, layer_budgets)
        return flat_topk_head_budgets(scores, layer_budgets, self.alpha)
