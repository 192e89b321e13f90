"""KVzip (arXiv 2505.23416): scores from a repetition of the context, one global threshold.

The scores come from the observation source (`reconstruct` for KVzip proper,
docs/observe.md): per KV head the max over its query group, no pooling, no value norm. The
budget is one threshold over every layer and KV head, so layers and heads keep as many tokens
as their scores win; the first tokens (attention sinks) are kept before any score, as far as
the budget beyond the window holds them (docs/kvzip.md). Where this differs
from the authors' code is listed in docs/kvzip.md.
"""

from __future__ import annotations

import torch
from dataclasses import dataclass
from typing import ClassVar

from lava_sglang.policy.base import WindowPolicy, global_allocation


@dataclass(frozen=True)
class KVzip(WindowPolicy):
    name: ClassVar[str] = "kvzip"
    gqa_reduce: ClassVar[str] = "max"
    scored_by: ClassVar[tuple[str, ...]] = ("reconstruct",)

    pool_kernel: int = 1
    sink_tokens: int = 4

    def allocate(self, scores: torch.Tensor | None, entropies: list[float], total: int, prefix_len: int,
                 num_kv_heads: int) -> tuple[list[int], list[list[int]]]:
        return global_allocation(scores, total)
