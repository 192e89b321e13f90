"""Full cache: keep every token (the quality reference)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from lava_sglang.policy.base import Policy


@dataclass(frozen=True)
class Full(Policy):
    name: ClassVar[str] = "full"
    needs_scores: ClassVar[bool] = False
    keeps_everything: ClassVar[bool] = True
