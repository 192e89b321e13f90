"""Tensor parallel: what the radix cache exchanges over SGLang's TP group so that every rank
keeps the same prefixes (docs/tensor_parallel.md).

Each TP rank runs its own scheduler and cache over the same requests and holds only its KV
heads. Four things would make the ranks' caches differ, and each is settled here by one
collective: the plan (budgets span heads: every rank's scores are gathered, `HeadShard`;
under observe "branches" also each layer's window totals, whose average over all heads
scales every window's votes),
the slots a compressed prefix takes (the largest rank's rows), when a waiting prefix is
compressed and with what (a rank's clock and its repetition's state: all ranks must agree),
and the repetitions' request-id base (rank 0's, `from_first_rank`: every rank must know the
chunk requests for what they are).
"""

from __future__ import annotations

from dataclasses import dataclass

from lava_sglang.policy import HeadShard
from lava_sglang.sglang_plugin import touchpoints


@dataclass(frozen=True)
class TensorParallel:
    """This scheduler's place in the TP group. `group`: SGLang's `GroupCoordinator`: the
    scores go through `all_gather(tensor, dim)` on the device's group; the few numbers
    through `all_gather_object` on its CPU group and `broadcast_object` (by SGLang's
    shared-memory message queue where the group has one, as the TP group does by default;
    else the CPU group), on any device."""

    rank: int
    world_size: int
    group: object

    @classmethod
    def of_this_scheduler(cls) -> TensorParallel | None:
        """The TP group of the calling scheduler process; None without tensor parallel."""
        group = touchpoints.tp_group()
        if group.world_size == 1:
            return None
        return cls(rank=group.rank_in_group, world_size=group.world_size, group=group)

    @property
    def sends_requests(self) -> bool:
        """Whether this rank sends the server requests of its own (the repetition's chunks):
        every rank sees every request, so one rank sends them."""
        return self.rank == 0

    def head_shard(self) -> HeadShard:
        return HeadShard(self.rank, self.world_size, lambda scores: self.group.all_gather(scores, dim=1))

    def largest(self, value: int) -> int:
        """The largest of every rank's `value`."""
        return max(self.group.all_gather_object(value))

    def all_agree(self, flags: list[bool]) -> list[bool]:
        """Per position, whether `flags` is True on every rank (every rank passes as many)."""
        gathered = self.group.all_gather_object(list(flags))
        if len({len(rank_flags) for rank_flags in gathered}) != 1:  # zip would pair unrelated prefixes
            raise RuntimeError(f"the ranks' flags differ in number: {[len(rank_flags) for rank_flags in gathered]}")
        return [all(position) for position in zip(*gathered)]

    def from_first_rank(self, value):
        """Rank 0's `value` on every rank (a picklable object)."""
        return self.group.broadcast_object(value, src=0)
