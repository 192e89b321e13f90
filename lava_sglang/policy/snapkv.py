"""SnapKV: window attention (GQA mean, max-pooled), the same budget for every layer and head."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from lava_sglang.policy.base import WindowPolicy


@dataclass(frozen=True)
class SnapKV(WindowPolicy):
    name: ClassVar[str] = "snapkv"
