"""A radix cache under test, driven the way SGLang 0.5.23's scheduler drives it, without a server.

The pools are SGLang's own (`ReqToTokenPool`, `MHATokenToKVPool`, `TokenToKVPoolAllocator`,
on the CPU, a few layers and heads), the requests are SGLang `Req`s, and every step a
request takes through the cache is SGLang's own function: `Req.init_next_round_input`
(match), `alloc_token_slots` (allocation, evicting from the tree), `checkpoint_kv_cache`
(a chunked prefill's or a decode's insert), `release_kv_cache` (finish, abort, retraction).
What this stub adds is the model: a forward writes each token's K and V rows with its
position and token id in their first two channels, so `row_problems` can tell whether a
request's KV row still reads its own prefix, and it hands the attention path's window
queries to the cache's capture as `attention._record_window` does.
"""

from __future__ import annotations

from array import array

import torch
from sglang.srt.managers.schedule_batch import FINISH_LENGTH, Req
from sglang.srt.mem_cache.allocation import alloc_token_slots
from sglang.srt.mem_cache.allocator.token import TokenToKVPoolAllocator
from sglang.srt.mem_cache.cache_init_params import CacheInitParams
from sglang.srt.mem_cache.common import checkpoint_kv_cache, release_kv_cache
from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool, ReqToTokenPool
from sglang.srt.sampling.sampling_params import SamplingParams

from lava_sglang.sglang_plugin.config import KvPolicyConfig
from lava_sglang.sglang_plugin.compressed_tree import CompressedNode
from lava_sglang.sglang_plugin.radix_cache import LavaRadixCache

LAYERS, KV_HEADS, Q_HEADS, HEAD_DIM = 2, 2, 4, 8
POSITION, TOKEN = 0, 1  # the K channels a forward writes each token's position and id into


class SchedulerStub:
    """One LavaRadixCache, its pools and the requests that hold KV rows."""

    def __init__(self, config: KvPolicyConfig, pool_size: int = 4096, max_requests: int = 16,
                 context_len: int = 2048, tensor_parallel=None):
        self.pool_size = pool_size
        self.kv_pool = MHATokenToKVPool(pool_size, 1, torch.float32, KV_HEADS, HEAD_DIM, LAYERS, "cpu", False)
        self.allocator = TokenToKVPoolAllocator(pool_size, torch.float32, "cpu", self.kv_pool, False)
        self.req_to_token_pool = ReqToTokenPool(max_requests, context_len, "cpu", False)
        params = CacheInitParams(disable=False, req_to_token_pool=self.req_to_token_pool,
                                 token_to_kv_pool_allocator=self.allocator, page_size=1)
        self.cache = LavaRadixCache(params, config=config, kv_pool=self.kv_pool, tensor_parallel=tensor_parallel)
        self.running: list[Req] = []
        self.generator = torch.Generator().manual_seed(0)
        self._next_rid = 0

    # ------------------------------------------------------------ requests

    def request(self, token_ids, max_new_tokens: int = 8, rid: str | None = None, **kwargs) -> Req:
        if rid is None:
            rid, self._next_rid = f"req-{self._next_rid}", self._next_rid + 1
        return Req(rid, "", array("q", token_ids), SamplingParams(max_new_tokens=max_new_tokens), **kwargs)

    def prefill(self, req: Req, chunk: int | None = None) -> Req:
        """Admit the request (match, lock, allocate) and run its prefill, or the next `chunk`
        tokens of it; a chunk that does not end the prompt is checkpointed, as SGLang's
        chunked prefill does."""
        if not req.kv.holds_kv:
            req.init_next_round_input(self.cache)
            req.lock = self.cache.lock(req.last_node)
            prefix = self.cache.prefix_device_indices(req) if req.prefix_len else None
            self.req_to_token_pool.alloc([req])
            if prefix is not None:
                self.req_to_token_pool.write((req.kv.req_pool_idx, slice(0, req.prefix_len)), prefix)
            self.running.append(req)
        fill_len = len(req.full_untruncated_fill_ids)
        req.extend_end = fill_len if chunk is None else min(fill_len, req.prefix_len + chunk)
        if not req.retracted_stain:  # as SGLang's prepare_for_extend counts the prompt tokens the cache gave
            req.cached_tokens += req.prefix_len - req.already_computed
            req.already_computed = req.extend_end
        self._forward(req, req.prefix_len, req.extend_end, extend=True)
        if req.extend_end < fill_len:
            checkpoint_kv_cache(req, self.cache)
        return req

    def decode(self, req: Req, token_id: int, checkpoint: bool = False) -> None:
        """One output token (its KV computed), optionally followed by a checkpoint."""
        req.output_ids.append(token_id)
        req.refresh_fill_ids()
        seq_len = len(req.full_untruncated_fill_ids)
        self._forward(req, seq_len - 1, seq_len, extend=False)
        if checkpoint:
            req.extend_end = seq_len
            checkpoint_kv_cache(req, self.cache)

    def finish(self, req: Req) -> None:
        """The request ends normally: its KV goes into the tree, its row is released."""
        req.finished_reason = FINISH_LENGTH(length=len(req.output_ids))
        self._release(req, checkpoint=True)

    def abort(self, req: Req) -> None:
        """The request is aborted (or its prefill failed): the row is released uncached."""
        self._release(req, checkpoint=False)

    def retract(self, req: Req) -> None:
        """Preemption, as SGLang's `release_req` does it on a decode server: the row is
        released uncached and the request starts over, its output kept."""
        self._release(req, checkpoint=False)
        req.reset_for_retract()

    def _release(self, req: Req, checkpoint: bool) -> None:
        release_kv_cache(req, self.cache, checkpoint=checkpoint)
        self.running.remove(req)

    def _forward(self, req: Req, start: int, end: int, extend: bool) -> None:
        """Positions start .. end - 1 of the request: slots, K/V rows, and for an extend its
        window queries (the attention path records them in `forward_extend` only)."""
        slots = alloc_token_slots(self.cache, end - start)
        row = req.kv.req_pool_idx
        self.req_to_token_pool.write((row, slice(start, end)), slots.to(torch.int32))
        req.kv.kv_allocated_len = req.kv.kv_committed_len = end
        token_ids = torch.tensor(req.full_untruncated_fill_ids[start:end], dtype=torch.float32)
        positions = torch.arange(start, end, dtype=torch.float32)
        for layer in range(LAYERS):
            for buffer in (self.kv_pool.k_buffer[layer], self.kv_pool.v_buffer[layer]):
                rows = torch.randn(end - start, KV_HEADS, HEAD_DIM, generator=self.generator)
                rows[:, :, POSITION] = positions[:, None]
                rows[:, :, TOKEN] = token_ids[:, None]
                buffer[slots] = rows
            recorded = self.cache.capture.rows_to_record(req.rid, start, end - start) if extend else 0
            if recorded:
                queries = torch.randn(recorded, Q_HEADS, HEAD_DIM, generator=self.generator)
                self.cache.capture.record(layer, row, start, queries)

    # ------------------------------------------------------------ checks

    def row_problems(self, req: Req) -> list[str]:
        """Where the request's KV row does not read its own sequence: a compressed prefix must
        be its node's value exactly (store slots, then padding), every later position a slot
        whose K row is that position's token."""
        row = self.req_to_token_pool.req_to_token[req.kv.req_pool_idx, :req.kv.kv_allocated_len].to(torch.int64)
        token_ids = list(req.full_untruncated_fill_ids[:len(row)])
        problems, start = [], 0
        entry = self.cache.store.entries_for_slots(row[:1])[0] if len(row) else None
        if entry is not None:
            node = self.compressed_node(entry.entry_id)
            if node is None:
                return [f"row starts in compressed entry {entry.entry_id}, which is no longer in the tree"]
            start = len(node.key)
            if list(node.key.token_ids) != token_ids[:start]:
                problems.append(f"compressed entry {entry.entry_id} holds another prefix")
            if not torch.equal(row[:start], node.value.to(torch.int64)):
                problems.append(f"row[:{start}] is not compressed entry {entry.entry_id}'s slots")
        keys = self.kv_pool.k_buffer[0]
        for position in range(start, len(row)):
            slot = int(row[position])
            if (keys[slot, 0, POSITION] != position or keys[slot, 0, TOKEN] != token_ids[position]
                    or self.cache.store.entries_for_slots(row[position:position + 1])[0] is not None):
                problems.append(f"row[{position}] = slot {slot} is not token {token_ids[position]} at {position}")
        return problems

    def accounting_problem(self) -> str | None:
        """SGLang's invariant with the store's slots counted as the tree's: every pool slot is
        free, evictable, protected (held by the tree and locked) or a running request's own."""
        own = sum(req.kv.kv_allocated_len - req.kv.cache_protected_len for req in self.running)
        available, evictable = self.allocator.available_size(), self.cache.evictable_size()
        protected = self.cache.protected_size()
        if available + evictable + protected + own != self.pool_size:
            return (f"available {available} + evictable {evictable} + protected {protected} + requests' own {own} "
                    f"!= pool {self.pool_size}")
        if evictable + protected != self.cache.total_size():
            return f"evictable {evictable} + protected {protected} != the tree's {self.cache.total_size()}"
        return None

    def compressed_node(self, entry_id: int) -> CompressedNode | None:
        return next((node for node in self.compressed_nodes() if node.entry.entry_id == entry_id), None)

    def compressed_nodes(self) -> list[CompressedNode]:
        return list(self.cache.compressed)
