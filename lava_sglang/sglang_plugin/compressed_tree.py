"""SGLang's radix tree with compressed prefixes: the tree and its accounting.

SGLang's pure-Python `RadixCache` plus compressed nodes. This module knows how a compressed
prefix lives in the tree; what gets compressed, and when, is `radix_cache.py`'s business.

The compressed node. A compressed node covers the first n - 1 tokens of a prefix (a request
always recomputes its last prompt token, so that is all a later request can match). It keeps
the full token key, so matching is unchanged, and is a child of the root kept apart from the
ordinary children (`compressed`, a radix index of its own: `key_index.py`), so an ordinary
insert never splits it and a request that matches only part of it does not use it. Ordinary
nodes hang below it (the requests' own tokens).

The row layout, the contract between this tree, SGLang and the attention path
(`compressed_row`): the node's value, and so the first n - 1 entries of the KV row of every
request that matched it, is the pool slots that hold the entry's kept rows (`lava_sglang.store`),
then SGLang's padding slot 0 up to n - 1 entries. So
- positions of the request's own tokens start at n - 1, as if the whole prefix were there;
- the attention path finds a request's compressed prefix from the first slot of its row
  (`CompressedStore.entries_for_slots`) and reads its own tokens from `entry.prefix_len` on;
- nothing but the owned slots is ever freed (the padding slot belongs to no one).

Accounting. A compressed node's size for SGLang's evictable / protected counters is its
owned slots (`node_size`), so available + evictable + protected + the running requests' own
slots == pool size keeps holding. Eviction takes ordinary leaves before compressed prefixes;
a full store drops one compressed prefix, with what is cached below it, for a new one.

One path per key. After a prefix is compressed its full-length copy is freed, with whatever
continues it (the caller compresses only a prefix no request runs on; for a fork prefix, whose
copy ends one token before the commit, `fork_prefix_node`), so the ordinary tree never matches
more of a key than the compressed node does, and match and insert go the same way. A request that held
only an ancestor of the prefix and computed the rest itself inserts through the compressed
node at its next checkpoint; its whole row is then repointed (`checkpoint`).
"""

from __future__ import annotations

import heapq
import logging
import time

import torch

from lava_sglang.sglang_plugin.key_index import KeyIndex
from lava_sglang.sglang_plugin.metrics import StoreMetrics
from lava_sglang.sglang_plugin.touchpoints import commit_deferred_frees, radix_cache_api
from lava_sglang.store import CellLayout, CompressedStore, LayoutTables, StoreEntry

(RadixCache, RadixKey, TreeNode, EvictParams, EvictResult, IncLockRefResult, DecLockRefResult,
 _) = radix_cache_api()

logger = logging.getLogger(__name__)

PADDING_SLOT = 0  # SGLang's allocator never hands out slot 0 (it absorbs padded writes)
# Compressed prefixes stored at once (rows of the store's layout tables, ~4 MB for a Llama-3-8B
# shape); past that one no request holds makes room for a new one (`make_room_in_store`).
MAX_STORE_ENTRIES = 4096


class CompressedNode(TreeNode):
    def __init__(self, entry: StoreEntry):
        super().__init__()
        self.entry = entry


def compressed_row(layout: CellLayout, prefix_len: int, device) -> torch.Tensor:
    """A compressed prefix's row: its owned slots, then the padding slot, `prefix_len` in all."""
    padding = torch.full((prefix_len - layout.slots.numel(),), PADDING_SLOT, dtype=torch.int64, device=device)
    return torch.cat([layout.slots.to(device=device, dtype=torch.int64), padding])


def node_size(node) -> int:
    """Pool slots a node holds: its token count, or the owned slots of a compressed node."""
    return node.entry.layout.slots.numel() if isinstance(node, CompressedNode) else len(node.key)


def prompt_key(req):
    """The radix key of an SGLang request's prompt."""
    return RadixKey(req.origin_input_ids, req.extra_key, cache_salt=req.cache_salt)


class CompressedRadixCache(RadixCache):
    def __init__(self, params, *, kv_pool, metrics: StoreMetrics | None = None):
        self.kv_pool = kv_pool
        self.metrics = metrics or StoreMetrics(enabled=False, labels={})
        pool_slots = kv_pool.size + kv_pool.page_size
        device = params.token_to_kv_pool_allocator.device
        tables = LayoutTables(max_entries=min(MAX_STORE_ENTRIES, pool_slots), pool_slots=pool_slots,
                              num_layers=len(kv_pool.k_buffer), num_kv_heads=kv_pool.k_buffer[0].shape[1],
                              device=device)
        self.store = CompressedStore(tables)
        self.compressed: KeyIndex[CompressedNode] = KeyIndex()
        super().__init__(params)

    def reset(self):
        super().reset()
        self.store.clear()
        self.compressed = KeyIndex()
        self.metrics.store_changed(self.store)

    def pool_used(self) -> int:
        return self.kv_pool.size - self.token_to_kv_pool_allocator.available_size()

    # -------------------------------------------------------------- matching

    def compressed_match(self, key) -> CompressedNode | None:
        """The longest compressed node whose whole key is a prefix of `key`."""
        return self.compressed.longest_prefix_of(key)

    def ordinary_slots(self, key, *, touch: bool = True) -> tuple[torch.Tensor, object]:
        """The pool slots of `key`'s longest match in the ordinary tree (compressed nodes
        ignored) and the node where it ends. touch=False: a look that is not a use leaves the
        nodes' access times (the eviction order) alone, unless the match ends inside a node,
        which SGLang's match splits."""
        if not touch:
            found = self._walk_ordinary(key)
            if found is not None:
                return found
        value, last_node = RadixCache._match_prefix_helper(self, self.root_node, key)
        return (torch.cat(value) if value else torch.empty(0, dtype=torch.int64)), last_node

    def _walk_ordinary(self, key, start=None) -> tuple[torch.Tensor, object] | None:
        """`ordinary_slots` read-only, where the match ends at a node's end; None elsewhere.
        start: the node `key` continues from (default the root)."""
        node, value = start or self.root_node, []
        while len(key) > 0:
            child = node.children.get(key.child_key(self.page_size))
            if child is None:
                break
            matched = child.key.match(key, page_size=self.page_size)
            if matched < len(child.key):
                return None
            value.append(child.value)
            node, key = child, key[matched:]
        return (torch.cat(value) if value else torch.empty(0, dtype=torch.int64)), node

    def fork_prefix_node(self, last_node):
        """Where the full copy of a fork prefix's compressed key ends: `last_node` ends the
        n-token commit and the compressed copy covers its first n - 1 tokens, so where the tree
        splits after those (another prompt shares them but not the last token, e.g. a branch
        whose tokenizer merged the document's last token with its question's first), the node
        before the split; else `last_node`. The copy and everything below this node go when the
        prefix is compressed, and no request may run below it meanwhile: a full copy left there
        would match more of a later request's key than the compressed node does, while its insert
        goes through the compressed node (one path per key, above)."""
        if len(last_node.key) == 1 and last_node.parent is not self.root_node:
            return last_node.parent
        return last_node

    def on_ordinary_path(self, node) -> bool:
        """Whether root -> node (not the root itself) could become one compressed node: no
        node of it is compressed or below one. Nodes of it may have other children (other
        documents behind a shared header): they stay, and only what no one else uses is freed."""
        if node is self.root_node:
            return False
        while node is not self.root_node:
            if isinstance(node, CompressedNode):
                return False
            node = node.parent
        return True

    def _match_prefix_helper(self, node, key):
        value, last_node = super()._match_prefix_helper(node, key)
        compressed = self.compressed_match(key) if node is self.root_node else None
        if compressed is None:
            return value, last_node
        compressed.last_access_time = time.monotonic()
        rest = key[len(compressed.key):]
        below_value, below_last = super()._match_prefix_helper(compressed, rest) if len(rest) else ([], compressed)
        if len(compressed.key) + sum(len(v) for v in below_value) < sum(len(v) for v in value):
            return value, last_node
        return [compressed.value, *below_value], below_last

    def _insert_helper(self, node, key, value, priority=0, inserted_len=0):
        compressed = self.compressed_match(key) if node is self.root_node else None
        if compressed is None:
            return super()._insert_helper(node, key, value, priority, inserted_len)
        # The compressed prefix already holds these tokens: the caller frees its copies.
        compressed.last_access_time = time.monotonic()
        covered = len(compressed.key)
        if covered > inserted_len:  # as SGLang counts the nodes its insert walks (LFU and SLRU read it)
            self._inc_hit_count(compressed)
        below_len, last_node = super()._insert_helper(
            compressed, key[covered:], value[covered:], priority, max(inserted_len - covered, 0))
        return covered + below_len, last_node

    def checkpoint(self, req, *, up_to: int):
        super().checkpoint(req, up_to=up_to)
        self._repoint_row_to_compressed_prefix(req)

    def _repoint_row_to_compressed_prefix(self, req) -> None:
        """A request that held only an ancestor of a prefix when it was compressed (a chunked
        prefill of the document while its fork commit finished) inserts through the compressed
        node at its next checkpoint, and SGLang rewrites its row only past what it had
        checkpointed: the start would still read the old ordinary slots, which it no longer
        locks, and the rest the compressed node's store and padding slots. The whole prefix of
        the row moves to the compressed copy, as if the request had matched it."""
        node = req.last_node
        while node is not self.root_node and not isinstance(node, CompressedNode):
            node = node.parent
        if node is self.root_node:
            return
        row = req.kv.req_pool_idx
        prefix_slots = node.value
        written = self.req_to_token_pool.req_to_token[row, :len(prefix_slots)]
        if not torch.equal(written.to(prefix_slots.dtype), prefix_slots):
            self.req_to_token_pool.write((row, slice(0, len(prefix_slots))), prefix_slots)
            logger.info("lava: request %s now reads compressed prefix %d, compressed while it ran on the full copy",
                        req.rid, node.entry.entry_id)

    # ------------------------------------------------------------ accounting
    # inc_lock_ref, dec_lock_ref and evict follow SGLang 0.5.23's bodies (touchpoints.RADIX_CACHE_METHODS).

    def inc_lock_ref(self, node) -> IncLockRefResult:
        if self.disable:
            return IncLockRefResult(delta=0)
        delta = 0
        while node != self.root_node:
            if node.lock_ref == 0:
                self.evictable_size_ -= node_size(node)
                self.protected_size_ += node_size(node)
                delta -= node_size(node)
            node.lock_ref += 1
            self._update_leaf_status(node)
            node = node.parent
        return IncLockRefResult(delta=delta)

    def dec_lock_ref(self, node, params=None) -> DecLockRefResult:
        if self.disable:
            return DecLockRefResult(delta=0)
        delta = 0
        while node != self.root_node:
            if node.lock_ref == 1:
                self.evictable_size_ += node_size(node)
                self.protected_size_ -= node_size(node)
                delta += node_size(node)
            node.lock_ref -= 1
            self._update_leaf_status(node)
            if node.parent is None:
                assert node is self.root_node, "This request holds the node from another tree"
            node = node.parent
        return DecLockRefResult(delta=delta)

    def total_size(self):
        total = super().total_size()
        stack = list(self.compressed)
        while stack:
            node = stack.pop()
            total += node_size(node)
            stack.extend(child for child in node.children.values() if not child.evicted)
        return total

    # ---------------------------------------------------- compressed nodes

    def add_compressed(self, prefix_key, entry: StoreEntry) -> CompressedNode:
        """Put a stored entry in the tree as the compressed node of `prefix_key`; its owned
        slots count as evictable from now on."""
        node = CompressedNode(entry)
        node.parent = self.root_node
        node.key = prefix_key
        node.value = compressed_row(entry.layout, len(prefix_key), self.device)
        self.compressed.add(prefix_key, node)
        self.evictable_size_ += node_size(node)
        self._update_leaf_status(node)
        return node

    def already_compressed(self, prefix_key) -> bool:
        """Whether `prefix_key`, or a prefix of it, is compressed (logged: it is not compressed again)."""
        existing = self.compressed_match(prefix_key)
        if existing is None:
            return False
        if len(existing.key) == len(prefix_key):
            logger.debug("lava: prefix of %d tokens already compressed (entry %d)", len(prefix_key),
                         existing.entry.entry_id)
        else:
            logger.info("lava: not compressing a %d-token prefix that extends a compressed one", len(prefix_key))
        return True

    # -------------------------------------------------------------- eviction

    def evict(self, params) -> EvictResult:
        """SGLang's leaf eviction (its strategy's order, LRU by default), ordinary leaves
        before compressed prefixes; a compressed leaf gives back its owned slots.

        A compressed prefix holds a whole document in about a fifth of the slots, so dropping
        it costs the most recomputation per slot freed; the ordinary leaves (mostly the
        branches' questions and answers) go first. Without that, a cyclic workload over a
        few more documents than fit evicts each compressed document just before its revisit.
        """
        if self.disable:
            return EvictResult()
        start_time = time.perf_counter()
        heap = [self._eviction_key(node) for node in self.evictable_leaves]
        heapq.heapify(heap)
        num_evicted = 0
        while num_evicted < params.num_tokens and heap:
            *_, node = heapq.heappop(heap)
            parent = node.parent
            if isinstance(node, CompressedNode):
                num_evicted += self._drop_compressed(node)
            else:
                num_evicted += len(node.value)
                self.free_leaf(node)
            if parent is not self.root_node and not parent.children and parent.lock_ref == 0:
                heapq.heappush(heap, self._eviction_key(parent))
        self.update_eviction_metrics(num_evicted, start_time)
        return EvictResult(num_tokens_evicted=num_evicted)

    def _eviction_key(self, node) -> tuple:
        return isinstance(node, CompressedNode), self.eviction_strategy.get_priority(node), node

    def can_store_one_more(self) -> bool:
        """Whether the store has a table row for a new compressed prefix, or can make one
        (`make_room_in_store`)."""
        return self.store.has_room or self._store_victim() is not None

    def make_room_in_store(self) -> None:
        """Where the store's tables are full, drop the compressed prefix first in the eviction
        order (LRU by default) among those no request holds, with the requests' own tokens
        cached below it. Without it, a pool larger than the tables (a server holding more
        documents than the tables) would keep every later document uncompressed, with no memory
        pressure ever to evict the compressed ones. The caller checked `can_store_one_more`."""
        if self.store.has_room:
            return
        victim = self._store_victim()
        if victim is None:
            raise RuntimeError(f"the store holds {len(self.store.entries)} compressed prefixes, its most, each in use")
        start_time, evictable_before = time.perf_counter(), self.evictable_size_
        self.free_below(victim)
        self._drop_compressed(victim)
        self.update_eviction_metrics(evictable_before - self.evictable_size_, start_time)

    def _store_victim(self) -> CompressedNode | None:
        unheld = [node for node in self.compressed if node.lock_ref == 0]
        return min(unheld, key=self.eviction_strategy.get_priority, default=None)

    def _drop_compressed(self, node: CompressedNode) -> int:
        assert node.lock_ref == 0 and not node.children, "dropping a compressed prefix in use"
        self.compressed.remove(node.key)
        self.evictable_leaves.discard(node)
        size = node_size(node)
        self.evictable_size_ -= size
        entry = self.store.remove(node.entry.entry_id)
        self.token_to_kv_pool_allocator.free(entry.layout.slots)
        node.value = None
        logger.info("lava: evicted compressed prefix %d (%d tokens, %d slots)", entry.entry_id, entry.prefix_len, size)
        self.metrics.evicted(self.store)
        return size

    # ------------------------------------------------ allocating and freeing

    def alloc_slots(self, num_slots: int):
        """`num_slots` pool slots, evicting for them; None when there is no room (then nothing is
        evicted: evicting every evictable prefix, compressed ones included, would not make it)."""
        allocator = self.token_to_kv_pool_allocator
        # Compression runs in on_release, inside the free group SGLang opens while it processes
        # a batch's results: slots freed there (by this batch's other requests, or evicted
        # below) are only pending, outside available_size(), until the group commits.
        if num_slots > allocator.available_size():
            commit_deferred_frees(allocator)
        shortfall = num_slots - allocator.available_size()
        if shortfall > self.evictable_size():
            return None
        if shortfall > 0:
            self.evict(EvictParams(num_tokens=shortfall))
            commit_deferred_frees(allocator)
        return allocator.alloc(num_slots)

    def free_uncompressed_path(self, node) -> None:
        """Give the full-length copy back to the allocator where no one else uses it."""
        while node is not self.root_node and not node.children and node.lock_ref == 0 and not node.evicted:
            parent = node.parent
            self.free_leaf(node)
            node = parent

    def free_below(self, node) -> None:
        """Give back every node under `node`: the requests' own tokens below a full prefix that
        is being replaced by its compressed copy. Locks are not checked: the caller's `node` is
        unlocked, so nothing below it is (a lock holds a node's whole path)."""
        below, stack = [], list(node.children.values())
        while stack:  # a walk, not recursion: a long conversation below a document is deep
            child = stack.pop()
            below.append(child)
            stack.extend(child.children.values())
        for child in reversed(below):  # each after everything below it, so a leaf when freed
            self.free_leaf(child)

    def free_beyond(self, key, keep_len: int) -> None:
        """Give back the unlocked leaves of `key`'s path that lie wholly beyond its first
        `keep_len` tokens (a repetition chunk's own tokens, below the prefix it repeats, or
        below its compressed copy when a stopped chunk ran after the prefix was compressed)."""
        top = self.compressed_match(key) or self.root_node
        found = self._walk_ordinary(key[len(top.key):], start=top)
        if found is None:  # the key ends inside a node: nothing of it lies wholly beyond keep_len
            return
        slots, node = found
        end = len(top.key) + slots.numel()
        if (node is not top and end - len(node.key) < keep_len < end and not node.children
                and node.lock_ref == 0):
            # a leaf that holds the prefix's last tokens and the chunk's (inserted together below
            # a compressed copy): split it there; `node` keeps the part beyond keep_len
            self._split_node(node.key, node, keep_len - (end - len(node.key)))
        while (node is not top and end - len(node.key) >= keep_len and not node.children
               and node.lock_ref == 0 and not node.evicted):
            parent, end = node.parent, end - len(node.key)
            self.free_leaf(node)
            node = parent

    def free_leaf(self, node) -> None:
        """Give an ordinary leaf's slots back to the allocator and take it out of the tree."""
        self.token_to_kv_pool_allocator.free_segment(node.value, start_pos=0)
        self._delete_leaf(node)
        self.kv_events.record_remove(node)
