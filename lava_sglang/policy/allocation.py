"""Budget allocation: how many selectable tokens each layer and each KV head keeps.

Budgets here count selectable (prefix) tokens per KV head; the window comes on top.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from fractions import Fraction

import numpy
import torch


def distribute(total: int, weights: Sequence[float], cap: int) -> list[int]:
    """Split `total` over layers in proportion to `weights`, each floored and clamped to `cap`.

    What a clamp removes goes to the unclamped layers in proportion to their weights,
    repeated until no layer exceeds `cap` (lava.md, "Dynamic layer budgets"). Layers
    whose weights are all zero share equally. The shares are exact fractions of the weights
    as given: three weights of 0.1 split 21 as 7 each, where floats give 6.9999... and 6.
    """
    budgets = [0] * len(weights)
    open_layers = list(range(len(weights)))
    exact = [Fraction(float(weight)) for weight in weights]  # float(): numpy floats too
    remaining = total
    while open_layers:
        weight_sum = sum(exact[i] for i in open_layers)
        if weight_sum > 0:
            shares = {i: math.floor(exact[i] * remaining / weight_sum) for i in open_layers}
        else:
            shares = {i: remaining // len(open_layers) for i in open_layers}
        clamped = [i for i in open_layers if shares[i] > cap]
        if not clamped:
            for i in open_layers:
                budgets[i] = shares[i]
            break
        for i in clamped:
            budgets[i] = cap
            remaining -= cap
        open_layers = [i for i in open_layers if i not in clamped]
    return budgets


def pyramid_weights(num_layers: int, per_layer: int, beta: float) -> list[float]:
    """PyramidKV's linear schedule: layer 0 gets the most, the last layer `per_layer / beta`.

    The weights average to `per_layer`, so they sum to the uniform total; the budgets made
    from them are floored per layer (`distribute`), up to L - 1 tokens fewer.
    """
    if num_layers == 1:
        return [float(per_layer)]
    low = per_layer / float(beta)  # a numpy float32 beta would make every weight float32 and move the floors
    high = 2 * per_layer - low
    step = (high - low) / (num_layers - 1)
    return [high - layer * step for layer in range(num_layers)]


def descending_order(scores: torch.Tensor) -> torch.Tensor:
    """Indices that sort the last dim by descending score; ties go to the earlier index."""
    return torch.sort(scores, dim=-1, descending=True, stable=True).indices


def descending_order_over_rows(scores: torch.Tensor) -> torch.Tensor:
    """Indices into `scores.flatten(-2)` ([..., rows, m], row-major) by descending score;
    ties go to the earlier token, then the earlier row.

    So forced sinks (+inf in every row) are spread: at a budget too small for every row's
    sinks, each row keeps its first token before any row keeps its second, where ties to
    the earlier row would give the first rows all of them and the last rows none.
    """
    num_rows, prefix_len = scores.shape[-2:]
    token_major = descending_order(scores.transpose(-1, -2).flatten(-2))
    return token_major % num_rows * prefix_len + token_major // num_rows


def decimal_fraction(value: float) -> Fraction:
    """`value` as the decimal it was written as: 0.2 is 1/5, not the binary double's
    3602879701896397/18014398509481984; numpy floats by their own shortest decimal."""
    return Fraction(str(value) if isinstance(value, numpy.floating) else repr(float(value)))


def flat_topk_head_budgets(scores: torch.Tensor, layer_budgets: Sequence[int], alpha: float) -> list[list[int]]:
    """Head budgets from one top-k over each whole layer, with the safeguard floor.

    scores: [L, Hkv, m]; in layer l the top `Hkv * layer_budgets[l]` entries decide `c_h`, then
    `cap_h = min(round((1 - alpha) * c_h + floor(alpha * layer_budget)), m)` (round half to
    even, as Python and torch round). One sort for all layers. A head's forced sinks (+inf
    scores) among its c_h stay: the safeguard's shrinking does not take them.
    """
    num_layers, num_kv_heads, prefix_len = scores.shape
    order = descending_order_over_rows(scores)
    budgets = torch.tensor(layer_budgets, dtype=torch.int64, device=scores.device)
    in_top = torch.arange(num_kv_heads * prefix_len, device=scores.device) < num_kv_heads * budgets[:, None]
    counts = torch.zeros(num_layers, num_kv_heads, dtype=torch.int64, device=scores.device)
    counts.scatter_add_(1, order // prefix_len, in_top.long())
    # In the decimal alpha's exact arithmetic: in binary 0.29 * 100 is 28.999..., and
    # (1 - 0.34) * 25 + 5 is 21.4999... where the spec rounds 21.5.
    share = decimal_fraction(alpha)
    forced = torch.minimum(torch.isposinf(scores).sum(-1), counts).tolist()
    return [[min(max(round((1 - share) * count + math.floor(share * budget)), sinks), prefix_len)
             for count, sinks in zip(layer_counts, layer_sinks)]
            for layer_counts, layer_sinks, budget in zip(counts.tolist(), forced, layer_budgets)]


def global_topk_head_budgets(scores: torch.Tensor, total: int) -> list[list[int]]:
    """Head budgets from ONE threshold over every layer and KV head (KVzip's allocation).

    scores: [L, Hkv, m]; the top `total` of all L * Hkv * m entries are kept and each
    (layer, head) keeps as many as fall in it (ties go to the earlier token, then the earlier
    layer and head: `descending_order_over_rows`).
    Returns per layer the selectable tokens each KV head keeps; they sum to min(total, L*Hkv*m).
    """
    num_layers, num_kv_heads, prefix_len = scores.shape
    top = descending_order_over_rows(scores.float().flatten(0, 1))[:total]
    counts = torch.bincount(top // prefix_len, minlength=num_layers * num_kv_heads)
    return counts.view(num_layers, num_kv_heads).tolist()
