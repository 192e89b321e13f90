"""StreamingLLM: the first few tokens (attention sinks) plus the most recent ones."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from lava_sglang.policy.base import Policy, validate_sink_tokens


@dataclass(frozen=True)
class StreamingLLM(Policy):
    name: ClassVar[str] = "streamingllm"
    needs_scores: ClassVar[bool] = False

    sink_tokens: int = 4

    def validate(self) -> None:
        super().validate()
        validate_sink_tokens(self.sink_tokens)

    def keep_mask(self, scores: torch.Tensor | None, head_budgets: torch.Tensor, prefix_len: int) -> torch.Tensor:
        # The window is the most recent part; the recent prefix tokens continue it.
        sinks = head_budgets.clamp(max=self.sink_tokens)[..., None]
        positions = torch.arange(prefix_len, device=head_budgets.device)
        return (positions < sinks) | (positions >= prefix_len - (head_budgets[..., None] - sinks))
