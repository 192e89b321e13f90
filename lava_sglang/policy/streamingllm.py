"""StreamingLLM: the first few tokens (attention sinks) plus the most recent ones."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from lava_sglang.policy.base import Policy


@dataclass(frozen=True)
class StreamingLLM(Policy):
    name: ClassVar[str] = "streamingllm"
    needs_scores: ClassVar[bool] = False

    sink_tokens: int = 4

    def validate(self) -> None:
        super().validate()
        sinks = self.sink_tokens
        if isinstance(sinks, bool) or not isinstance(sinks, int) or sinks < 0:
            raise ValueError(f"sink_tokens must be an int >= 0, got {sinks!r}")

    def keep_mask(self, scores: torch.Tensor | None, head_budgets: torch.Tensor, prefix_len: int) -> torch.Tensor:
        # The window is the most recent part; the recent prefix tokens continue it.
        sinks = head_budgets.clamp(max=self.sink_tokens)[..., None]
        positions = torch.arange(prefix_len, device=head_budgets.device)
        return (positions < sinks) | (positions >= prefix_len - (head_budgets[..., None] - sinks))
