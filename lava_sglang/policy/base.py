"""The policy interface: what every policy in the registry implements.

A policy turns per-layer window statistics into per-(layer, KV head) budgets. The plan
itself (which positions each head keeps) is assembled the same way for every policy in
`lava_sglang.policy.plan`, so a policy file only says how it scores and how it splits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from lava_sglang.checks import is_int, is_number
from lava_sglang.policy import scores as score_ops
from lava_sglang.policy.allocation import descending_order, distribute, global_topk_head_budgets


@dataclass(frozen=True)
class LayerScores:
    """What the allocation needs from one layer: `scores` [Hkv, m] fp32 and its entropy."""

    scores: torch.Tensor
    entropy: float


@dataclass(frozen=True)
class Policy:
    """Base of all policies. Hyper-parameters are dataclass fields of the subclasses."""

    name: ClassVar[str]
    window: int = 32

    #: False for positional policies that keep tokens by position alone (no window queries).
    needs_scores: ClassVar[bool] = True
    #: True for the full cache: the budget is ignored and nothing is evicted.
    keeps_everything: ClassVar[bool] = False
    #: Whether `allocate` reads the layers' entropies (LAVa's entropy layer budgets).
    uses_layer_entropy: ClassVar[bool] = False
    #: Whether the plan reads `alpha`, the safeguard of a per-layer head top-k (lava.md).
    reads_alpha: ClassVar[bool] = False
    #: The observation sources the policy is defined with (docs/observe.md); None: any.
    #: The plan works with any source; the server and the benchmarks pair it with these only.
    scored_by: ClassVar[tuple[str, ...] | None] = None

    def check_source(self, source: str) -> None:
        """Raise ValueError when the policy is not defined with observation source `source`."""
        if self.scored_by is not None and source not in self.scored_by:
            raise ValueError(f"{self.name} scores by {' or '.join(self.scored_by)}, not {source}")

    def validate(self) -> None:
        """Raise ValueError naming the hyper-parameter that is out of range."""
        if not is_int(self.window) or self.window < 1:
            raise ValueError(f"window must be an int >= 1, got {self.window!r}")

    def layer_scores(self, q_window: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> LayerScores:
        raise NotImplementedError(f"{self.name} keeps tokens by position and computes no scores")

    def allocate(self, scores: torch.Tensor | None, entropies: list[float], total: int, prefix_len: int,
                 num_kv_heads: int) -> tuple[list[int], list[list[int]]]:
        """Selectable tokens per KV head: each layer's budget, and each of its heads'.

        scores: [L, Hkv, m] every layer's scores (None for positional policies); entropies:
        per layer; total: selectable tokens per KV head summed over layers. By default the
        layers get `layer_budgets` and each layer splits its budget with `head_budgets`;
        without scores a layer splits it evenly.
        """
        layer_budgets = self.layer_budgets(entropies, total, prefix_len)
        if scores is None:
            return layer_budgets, [[budget] * num_kv_heads for budget in layer_budgets]
        return layer_budgets, self.head_budgets(scores, layer_budgets)

    def layer_budgets(self, entropies: list[float], total: int, prefix_len: int) -> list[int]:
        """Selectable tokens per KV head for each layer; uniform unless a policy says otherwise."""
        return distribute(total, [1.0] * len(entropies), prefix_len)

    def head_budgets(self, scores: torch.Tensor, layer_budgets: list[int]) -> list[list[int]]:
        """Selectable tokens for each KV head of each layer (scores [L, Hkv, m]); uniform
        unless a policy says otherwise."""
        return [[budget] * scores.shape[1] for budget in layer_budgets]

    def keep_mask(self, scores: torch.Tensor | None, head_budgets: torch.Tensor, prefix_len: int) -> torch.Tensor:
        """Which prefix positions every (layer, KV head) keeps: its `head_budgets` best-scored
        tokens, ties to the earlier position. scores [L, Hkv, m]; head_budgets [L, Hkv] int64
        on the scores' device; returns [L, Hkv, m] bool. One sort for every layer and head:
        no loop and no host synchronisation per head."""
        order = descending_order(scores)
        ranks_kept = torch.arange(prefix_len, device=scores.device) < head_budgets[..., None]
        return torch.zeros_like(ranks_kept).scatter_(-1, order, ranks_kept)


@dataclass(frozen=True)
class WindowPolicy(Policy):
    """Policies that score prefix tokens by the attention the observation window pays them."""

    pool_kernel: int = 7
    #: The first tokens (attention sinks) kept in every layer and head whatever their scores,
    #: counted in the budget: where the budget beyond the window holds fewer, only so many.
    sink_tokens: int = 0

    #: How the G query heads of a KV group are reduced: "max" (LAVa) or "mean" (SnapKV).
    gqa_reduce: ClassVar[str] = "mean"
    #: Multiply by the head's largest value norm (LAVa), making heads comparable.
    scale_by_value_norm: ClassVar[bool] = False

    def validate(self) -> None:
        super().validate()
        kernel = self.pool_kernel
        if not is_int(kernel) or kernel < 1 or kernel % 2 == 0:
            raise ValueError(f"pool_kernel must be an odd int >= 1, got {kernel!r}")
        validate_sink_tokens(self.sink_tokens)

    @property
    def scoring(self) -> tuple:
        """Everything `layer_scores` depends on: policies with equal `scoring` (SnapKV,
        Ada-SnapKV and PyramidKV by default) can share one layer's scores."""
        return (self.gqa_reduce, self.scale_by_value_norm, self.pool_kernel, self.sink_tokens, self.window)

    def layer_scores(self, q_window: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> LayerScores:
        return self.scores_from_mass(score_ops.window_attention_mass(q_window, keys, self.gqa_reduce), values)

    def scores_from_mass(self, mass: torch.Tensor, values: torch.Tensor) -> LayerScores:
        """Steps 5-7 of lava.md and the entropy, from the attention mass [Hkv, m] of any
        observation source (window, branches, reconstruction); values: [Hkv, n, d]."""
        scores = score_ops.pool_scores(mass, self.pool_kernel)
        if self.scale_by_value_norm:
            scores = scores * score_ops.value_norm_scale(values, mass.shape[1])[:, None]
        entropy = score_ops.layer_entropy(scores)  # of the scores, not of the forced sinks
        if self.sink_tokens:
            scores = scores.clone()
            scores[:, :self.sink_tokens] = torch.inf
        return LayerScores(scores=scores, entropy=entropy)


def global_allocation(scores: torch.Tensor, total: int) -> tuple[list[int], list[list[int]]]:
    """`Policy.allocate` by one threshold over all layers and KV heads (KVzip): scores
    [L, Hkv, m]; `total` is per KV head summed over layers, so the best `total * Hkv` scores
    of the whole prefix are kept wherever they are; a layer's budget is its heads' mean
    (floored)."""
    num_kv_heads = scores.shape[1]
    head_budgets = global_topk_head_budgets(scores, total * num_kv_heads)
    return [sum(heads) // num_kv_heads for heads in head_budgets], head_budgets


def validate_sink_tokens(sink_tokens: int) -> None:
    if not is_int(sink_tokens) or sink_tokens < 0:
        raise ValueError(f"sink_tokens must be an int >= 0, got {sink_tokens!r}")


def validate_alpha(alpha: float) -> None:
    if not is_number(alpha) or not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be a number in [0, 1], got {alpha!r}")
