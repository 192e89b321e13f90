"""What a committed fork prefix waits for before it is compressed, and what the wait cost.

Under `--kv-observe branches` a prefix waits for its forked branches' observation windows;
under `--kv-observe reconstruct` for its repetition's scores (`repetition.py`). The radix
cache keeps one `PendingPrefix` per waiting prefix and compresses it once it is `ready`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from lava_sglang.policy import ObservationWindow
from lava_sglang.sglang_plugin.config import MAX_BRANCH_WINDOWS
from lava_sglang.sglang_plugin.repetition import RepetitionScores, add_known
from lava_sglang.sglang_plugin.touchpoints import same_cache_namespace


@dataclass
class PendingPrefix:
    """A fork prefix waiting for its branches' observation windows (--kv-observe branches)
    or for its repetition's scores (--kv-observe reconstruct)."""

    full_key: object  # RadixKey of the n committed tokens
    tail_queries: list[torch.Tensor]  # per layer [Hq, w, d]: the prefix's own last tokens
    wait: float  # --kv-observe-wait, seconds
    deadline: float  # time.monotonic() after which it is compressed with what arrived
    branches: list[list[ObservationWindow]] = field(default_factory=list)  # per branch, per layer
    repetition: RepetitionScores | None = None
    prefill_seconds: float | None = None  # the commit's prefill, to which the repetition's cost is compared
    captured_branch_rids: set[str] = field(default_factory=set)  # branches captured, not yet released
    branch_refused: bool = False  # a branch came, and the windows' bytes had no room for its window

    def claim_branch(self, rid: str) -> bool:
        """Whether the branch `rid` has its window queries captured. At most MAX_BRANCH_WINDOWS
        branches add windows, and each captured one holds its queries at every layer until it is
        released (a wide fork would hold them all), so a branch is captured while the windows
        added and the branches captured, not yet released, are fewer: the first matched, in
        the order every tensor-parallel rank matches and releases requests, so the ranks
        capture the same branches. A request matched again (queued, or retracted) keeps its
        place; one released or aborted gives it back (`release_branch`)."""
        if (rid not in self.captured_branch_rids
                and len(self.captured_branch_rids) + len(self.branches) < MAX_BRANCH_WINDOWS):
            self.captured_branch_rids.add(rid)
        return rid in self.captured_branch_rids

    def release_branch(self, rid: str) -> None:
        """The branch `rid` was released (its window, if any, added) or aborted: its place is free."""
        self.captured_branch_rids.discard(rid)

    def ready(self, now: float) -> bool:
        """Whether what observes it has arrived (a branch window, or a branch that had no room
        for one: waiting on would hold the full copy for nothing; the repetition, run whole or
        failed), or it has waited long enough. A repetition that is making progress is waited
        for past the deadline: compressing with part of its scores would keep the unscored
        chunks' tokens by accident (the prefix stays an ordinary, evictable node meanwhile);
        one that has not begun, or made no progress for `wait` seconds, is not."""
        repetition = self.repetition
        if repetition is not None:
            if repetition.done or repetition.failed is not None:
                return True
            return now >= self.deadline and (repetition.last_progress_at is None
                                             or now - repetition.last_progress_at >= self.wait)
        return bool(self.branches) or self.branch_refused or now >= self.deadline

    def is_for(self, key) -> bool:
        """Whether `key` is this committed prefix itself (a second commit of it)."""
        return len(key) == len(self.full_key) and self._shared_len(key) == len(key)

    def shares_fork_prefix(self, key) -> bool:
        """Whether `key` and the committed prefix part at the last token of the shorter: that
        one's compression (all its tokens but the last) would free the other's copy."""
        return self._shared_len(key) == min(len(key), len(self.full_key)) - 1

    def covers(self, key) -> bool:
        """Whether `key` starts with the whole committed prefix and goes beyond it."""
        return len(key) > len(self.full_key) and self._shared_len(key) == len(self.full_key)

    def extends(self, key) -> bool:
        """Whether the committed prefix starts with the whole of `key` and goes beyond it."""
        return len(key) < len(self.full_key) and self._shared_len(key) == len(key)

    def starts_with(self, key) -> bool:
        """Whether the committed prefix starts with the whole of `key`."""
        return len(key) <= len(self.full_key) and self._shared_len(key) == len(key)

    def _shared_len(self, key) -> int:
        """Tokens `key` shares with the committed prefix from the start; 0 for a key of another
        cache namespace (another tenant's salt, another LoRA adapter), which is another prefix."""
        return self.full_key.match(key) if same_cache_namespace(self.full_key, key) else 0


@dataclass
class RepetitionCost:
    """What the repetitions that compressed prefixes cost against those prefixes' prefills:
    wall seconds in the scheduler from a repetition's first chunk to its release (shared with
    whatever else ran meanwhile), and the seconds of its chunks' own forwards, each timed as
    the prefill is (its first forward to its release; None once a repetition was not stamped)."""

    documents: int = 0
    repetition_seconds: float = 0.0
    prefill_seconds: float = 0.0
    forward_seconds: float | None = 0.0
    #: Repetitions left out of the sums: their commit gave no prefill to compare with (not
    #: stamped, or most of its prompt taken from the cache).
    not_compared: int = 0

    def add(self, repetition_seconds: float, prefill_seconds: float | None,
            forward_seconds: float | None = None) -> None:
        if not prefill_seconds:
            self.not_compared += 1
            return
        self.documents += 1
        self.repetition_seconds += repetition_seconds
        self.prefill_seconds += prefill_seconds
        self.forward_seconds = add_known(self.forward_seconds, forward_seconds)

    def stats(self) -> dict:
        def ratio(seconds):
            return round(seconds / self.prefill_seconds, 3) if seconds is not None and self.prefill_seconds else None

        return {"documents": self.documents, "repetition_seconds": round(self.repetition_seconds, 3),
                "prefill_seconds": round(self.prefill_seconds, 3), "ratio": ratio(self.repetition_seconds),
                "forward_seconds": None if self.forward_seconds is None else round(self.forward_seconds, 3),
                "forward_ratio": ratio(self.forward_seconds), "not_compared": self.not_compared}
