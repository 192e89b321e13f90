"""PyramidKV: SnapKV scores with a linear layer schedule (more in early layers; the uniform
total, less what flooring each layer's share drops: up to L - 1 tokens per KV head, docs/lava.md)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

from lava_sglang.checks import is_number
from lava_sglang.policy.allocation import distribute, pyramid_weights
from lava_sglang.policy.base import WindowPolicy


@dataclass(frozen=True)
class PyramidKV(WindowPolicy):
    name: ClassVar[str] = "pyramidkv"

    #: The last layer keeps `1 / beta` of the average budget (PyramidKV's default 20).
    beta: float = 20.0

    def validate(self) -> None:
        super().validate()
        if not is_number(self.beta) or not 1 <= self.beta < math.inf:  # inf: the last layer would keep nothing
            raise ValueError(f"beta must be a finite number >= 1, got {self.beta!r}")

    def layer_budgets(self, entropies: list[float], total: int, prefix_len: int) -> list[int]:
        num_layers = len(entropies)
        return distribute(total, pyramid_weights(num_layers, total // num_layers, self.beta), prefix_len)
