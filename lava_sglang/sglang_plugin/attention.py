"""Attention over (compressed prefix) + (the request's own tokens), merged by log-sum-exp.

The plugin keeps SGLang's attention backend object and installs its own forward_extend /
forward_decode on the instance (`with_compressed_prefixes`), so every isinstance check and
backend-name test in SGLang still holds. A forward batch in which no request uses a compressed prefix goes to the
original backend untouched, except an extend holding a chunk of a prefix's repetition (observe
"reconstruct": its attention's LSE is its scores' normaliser, `_score_repetitions`) and an
extend with a cached prefix under SGLang's `torch_native` backend, which would attend from
every prefix position again (`recomputes_cached_prefixes`); otherwise this module computes
the batch's attention itself:
for each request, attention over its compressed prefix (each KV head its own kept rows, the
G query heads of the group reading them together) and over its own tokens (its KV row
after the prefix, causal), merged by LSE (on the torch path a decode batch attends to both in
one masked call per group of requests of similar lengths, `DecodeRows`, unless those calls'
padded grids would pass `DECODE_GRID_BYTES`). Extend (prefill)
batches also record the window queries of long prefills for the compressor.

The attention over compressed prefixes is `CompressedPrefixBatch`: on CUDA the Triton kernel
of `lava_sglang.kernels.pool_prefix_attention` (the kept rows read in place from the pool
through the store's layout tables, one launch per layer), elsewhere torch. The attention
over the requests' own tokens is, on CUDA, the wrapped backend's: SGLang's own Triton decode
and extend kernels, or FlashInfer's paged wrappers under SGLang's `flashinfer` backend
(`own_attention.py`, planned once per batch); elsewhere torch. A batch holding a repetition
chunk under `--kv-observe-view chunk` (its queries read only part of their row) takes the
torch path, which the launcher allows on the CPU engine only.
Requests that use no compressed prefix in such a batch get exact ordinary attention from the
same code.
"""

from __future__ import annotations

import logging
import weakref

import torch

from lava_sglang.kernels.attention_states import (attention_with_lse, causal_visibility,
                                                  flash_extend_attention_with_lse, has_cpu_flash_attention,
                                                  merge_attention_states, rows_attention_with_lse)
from lava_sglang.sglang_plugin.own_attention import FlashInferOwnAttention, OwnTokenAttention, lengths_indptr
from lava_sglang.sglang_plugin.touchpoints import flashinfer_own_wrappers, kv_write_loc, recomputes_cached_prefixes
from lava_sglang.store import LayoutTables, StoreEntry, read_layer, read_padded_layer

logger = logging.getLogger(__name__)

_cache = None  # the scheduler process's LavaRadixCache, bound by the radix cache factory


def bind(cache) -> None:
    global _cache
    _cache = cache


def bound_cache():
    """The LavaRadixCache of this process, or None outside a scheduler with a policy on."""
    return _cache


class CompressedPrefixPath:
    """forward_extend / forward_decode for an SGLang attention backend, installed on the
    instance; the backend's own methods serve batches without compressed prefixes or
    repetition chunks (under `own_cached_prefixes`, only those in which no request has a cached
    prefix either).

    use_kernels: run the kernels (the prefix kernel and the own-token kernels); None: on CUDA
    tensors. Tests set it to run them under TRITON_INTERPRET=1.
    flashinfer_wrappers: FlashInfer's (decode, paged prefill) wrappers for the own tokens, when
    the backend is SGLang's `flashinfer` one; None: SGLang's Triton kernels.
    own_cached_prefixes: an extend batch in which a request has a cached (uncompressed) prefix
    takes this path too, which attends from the new tokens only, where it has a fused kernel
    (the kernels, or the CPU flash kernel in fp32); for a backend that attends from the
    prefix's positions again (`recomputes_cached_prefixes`).
    """

    def __init__(self, backend, use_kernels: bool | None = None, flashinfer_wrappers: tuple | None = None,
                 own_cached_prefixes: bool = False):
        self.use_kernels = use_kernels
        self.flashinfer_wrappers = flashinfer_wrappers
        self.own_cached_prefixes = own_cached_prefixes
        self.inner_extend = backend.forward_extend
        self.inner_decode = backend.forward_decode
        # What every layer of one forward batch shares, found at its first layer: the batch
        # it is for (a weak reference: a new batch is never taken for it, and once SGLang drops
        # the batch this state is dropped too, with the device tensors it holds), each
        # request's entry, whether it holds a repetition chunk, and the compressed prefixes' metadata.
        self._batch: weakref.ref | None = None
        self._entries: list[StoreEntry | None] = []
        self._repeating = False
        self._prefixes: CompressedPrefixBatch | None = None
        # The batch's plan: the own-token kernels' (CUDA), or a CPU decode's DecodeRows.
        self._own: OwnTokenAttention | FlashInferOwnAttention | DecodeRows | None = None
        self._views: list[tuple[int, torch.Tensor] | None] | None = None  # what repetition chunks attend to

    def _batch_entries(self, forward_batch) -> list[StoreEntry | None]:
        """The compressed prefix each request of the batch uses (None for none), from the
        first slot of each request's KV row (the row layout of `compressed_tree.py`)."""
        if self._batch is None or self._batch() is not forward_batch:
            first_slots = _cache.req_to_token_pool.req_to_token[forward_batch.req_pool_indices, 0]
            self._forget_batch()
            self._batch = weakref.ref(forward_batch, self._forget_batch)
            self._entries = _cache.store.entries_for_slots(first_slots)
            self._repeating = any(rid in _cache.repetitions for rid in forward_batch.rids or ())
        return self._entries

    def _forget_batch(self, dropped: weakref.ref | None = None) -> None:
        """Drop the batch's shared state; as the callback of a batch SGLang dropped (`dropped`),
        only if it is still the batch's (a later batch's state is not touched)."""
        if dropped is not None and dropped is not self._batch:
            return
        self._batch, self._entries, self._repeating = None, [], False
        self._prefixes = self._own = self._views = None

    def _repetition_views(self, forward_batch, prefix_lens, extend_lens) -> list[tuple[int, torch.Tensor] | None]:
        """Per request, when it is a repetition chunk under view "chunk", (how many of its
        extend's queries recompute prefix tokens, the row positions the others attend to:
        `RepetitionScores.attended_positions`, on the device of the request rows), else None;
        found once per batch."""
        if self._views is None:
            self._views = [None] * len(prefix_lens)
            for row, (rid, prefix_len, extend_len) in enumerate(zip(forward_batch.rids or (), prefix_lens,
                                                                     extend_lens)):
                scores = _cache.repetitions.get(rid) if self._entries[row] is None else None
                positions = None if scores is None else scores.attended_positions(rid, prefix_len + extend_len)
                if positions is not None:  # queries before the prefix's end recompute prefix tokens
                    positions = positions.to(_cache.req_to_token_pool.req_to_token.device)
                    self._views[row] = (max(0, scores.prefix_len - prefix_len), positions)
        return self._views

    def forward_extend(self, q, k, v, layer, forward_batch, save_kv_cache=True, **kwargs):
        if _cache is None:
            return self.inner_extend(q, k, v, layer, forward_batch, save_kv_cache=save_kv_cache, **kwargs)
        prefix_lens = forward_batch.extend_prefix_lens_cpu
        extend_lens = forward_batch.extend_seq_lens_cpu
        _record_window(layer, forward_batch, q, prefix_lens, extend_lens)
        entries = self._batch_entries(forward_batch)
        cached_prefix = self.own_cached_prefixes and any(prefix_lens) and (
            self._kernels_for(q) or has_cpu_flash_attention(q, _cache.kv_pool.get_key_buffer(layer.layer_id)))
        if not any(entries) and not self._repeating and not cached_prefix:
            return self.inner_extend(q, k, v, layer, forward_batch, save_kv_cache=save_kv_cache, **kwargs)
        # A repetition chunk is attention over the prefix (or its view): computed here, its queries' LSE
        # is the normaliser its scores need, and only its own queries are computed.
        out, lse = self._attend(q, k, v, layer, forward_batch, save_kv_cache, entries, prefix_lens, extend_lens)
        if self._repeating:
            _score_repetitions(layer, forward_batch, q, lse, entries, prefix_lens, extend_lens)
        return out

    def forward_decode(self, q, k, v, layer, forward_batch, save_kv_cache=True, **kwargs):
        entries = self._batch_entries(forward_batch) if _cache is not None else []
        if not any(entries):
            return self.inner_decode(q, k, v, layer, forward_batch, save_kv_cache=save_kv_cache, **kwargs)
        seq_lens = forward_batch.seq_lens_cpu.tolist()
        if not self._kernels_for(q):
            if self._own is None:
                self._own = DecodeRows(_cache.req_to_token_pool.req_to_token, forward_batch.req_pool_indices,
                                       entries, seq_lens)
            grid_bytes = self._own.padded_rows * layer.tp_k_head_num * (layer.qk_head_dim + layer.v_head_dim) * 4
            if grid_bytes <= DECODE_GRID_BYTES:
                self._save_kv(k, v, layer, forward_batch, save_kv_cache)
                out = self._own.attend(layer.layer_id,
                                       q.reshape(len(seq_lens), layer.tp_q_head_num, layer.qk_head_dim),
                                       _cache.kv_pool, layer.scaling)
                return out.to(q.dtype).view(-1, layer.tp_q_head_num * layer.v_head_dim)
        # The kernels, or grids too large for one padded call: the per-entry states merged with the own tokens'.
        return self._attend(q, k, v, layer, forward_batch, save_kv_cache, entries,
                            [seq_len - 1 for seq_len in seq_lens], [1] * len(seq_lens))[0]

    def _save_kv(self, k, v, layer, forward_batch, save_kv_cache) -> None:
        """Write the batch's new keys and values to the pool, as the wrapped backend would."""
        if save_kv_cache and k is not None and v is not None:
            write_loc = kv_write_loc(forward_batch.out_cache_loc)
            _cache.kv_pool.set_kv_buffer(layer, write_loc, k, v)

    def _attend(self, q, k, v, layer, forward_batch, save_kv_cache, entries, prefix_lens, extend_lens):
        """The batch's attention, computed here: out [tokens, Hq * d] in q's dtype and each
        query's natural-log LSE over everything it attends to, [tokens, Hq] fp32."""
        self._save_kv(k, v, layer, forward_batch, save_kv_cache)
        num_q_heads, num_kv_heads, head_dim = layer.tp_q_head_num, layer.tp_k_head_num, layer.qk_head_dim
        queries = q.reshape(-1, num_q_heads, head_dim)
        use_kernels = self._kernels_for(queries)
        decode = is_decode(extend_lens)
        views = self._repetition_views(forward_batch, prefix_lens, extend_lens) if self._repeating else []
        viewed = any(view is not None for view in views)  # a repetition piece reads part of its row
        if use_kernels and not viewed:
            out, lse = self._own_kernel_states(queries, k, v, layer, forward_batch, entries, prefix_lens, extend_lens,
                                               decode)
        else:
            out, lse = _own_states_extend(queries, layer, forward_batch, entries, prefix_lens, extend_lens, views)
        if any(entries):
            if self._prefixes is None:
                self._prefixes = CompressedPrefixBatch(entries, extend_lens, _cache.kv_pool, num_q_heads=num_q_heads,
                                                       num_kv_heads=num_kv_heads, scaling=layer.scaling,
                                                       tables=_cache.store.tables if use_kernels else None)
            prefix_out, prefix_lse = self._prefixes.states(layer.layer_id, queries)
            out, lse = merge_attention_states(prefix_out, prefix_lse, out, lse)
        return out.to(q.dtype).view(-1, num_q_heads * layer.v_head_dim), lse

    def _kernels_for(self, q) -> bool:
        return q.is_cuda if self.use_kernels is None else self.use_kernels

    def _own_kernel_states(self, queries, k, v, layer, forward_batch, entries, prefix_lens, extend_lens, decode):
        """The own-token states (`_own_states_extend` on the torch path) by the
        wrapped backend's kernels, planned at the batch's first layer."""
        k_buffer = _cache.kv_pool.get_key_buffer(layer.layer_id)
        v_buffer = _cache.kv_pool.get_value_buffer(layer.layer_id)
        if self._own is None:
            starts = own_starts(entries)
            seq_lens = [prefix + extend for prefix, extend in zip(prefix_lens, extend_lens)]
            plan_args = (_cache.req_to_token_pool.req_to_token, forward_batch.req_pool_indices, starts, seq_lens,
                         extend_lens)
            if self.flashinfer_wrappers is not None:
                self._own = FlashInferOwnAttention(*self.flashinfer_wrappers, num_q_heads=layer.tp_q_head_num,
                                                   num_kv_heads=layer.tp_k_head_num, head_dim=layer.qk_head_dim)
                self._own.plan(*plan_args, decode=decode, q_dtype=queries.dtype, kv_dtype=k_buffer.dtype)
            else:
                self._own = OwnTokenAttention(layer.tp_q_head_num)
                self._own.plan(*plan_args, decode=decode)
        if isinstance(self._own, FlashInferOwnAttention):  # the batch's new keys are in the pool already
            return self._own.run(queries, k_buffer, v_buffer, layer.scaling)
        if decode:
            return self._own.run(queries, None, None, k_buffer, v_buffer, layer.scaling)
        if k is None or v is None:  # the layer's keys were written by another (KV sharing): read them back
            k, v = k_buffer[forward_batch.out_cache_loc], v_buffer[forward_batch.out_cache_loc]
        shape = (queries.shape[0], layer.tp_k_head_num, -1)
        return self._own.run(queries, k.reshape(shape).to(k_buffer.dtype), v.reshape(shape).to(v_buffer.dtype),
                             k_buffer, v_buffer, layer.scaling)


def own_starts(entries: list[StoreEntry | None]) -> list[int]:
    """Where each request's own tokens start in its KV row: after its compressed prefix."""
    return [entry.prefix_len if entry is not None else 0 for entry in entries]


def _own_states_extend(queries, layer, forward_batch, entries, prefix_lens, extend_lens, views=()):
    """Each request's attention over its own tokens (its KV row after its compressed prefix,
    causal), one request at a time: out [tokens, Hq, d], lse [tokens, Hq], fp32. views[i], if
    given and not None: (recomputed, positions) for a repetition chunk under view "chunk": its
    first `recomputed` queries are prefix tokens and see the whole row up to themselves; the
    others see only the given positions of the row, their own last."""
    own_out = queries.new_empty((queries.shape[0], queries.shape[1], layer.v_head_dim), dtype=torch.float32)
    own_lse = queries.new_empty(queries.shape[:2], dtype=torch.float32)
    start = 0
    for row, (own_start, prefix_len, extend_len) in enumerate(zip(own_starts(entries), prefix_lens, extend_lens)):
        row_slots = _cache.req_to_token_pool.req_to_token[forward_batch.req_pool_indices[row]]
        view = views[row] if row < len(views) else None
        recomputed, positions = view if view is not None else (extend_len, None)
        pieces = [(slice(start, start + recomputed), row_slots[own_start:prefix_len + recomputed])]
        if positions is not None:
            pieces.append((slice(start + recomputed, start + extend_len), row_slots[positions]))
        for rows, slots in pieces:
            if rows.stop > rows.start:
                own_out[rows], own_lse[rows] = _causal_states(queries[rows], slots, layer)
        start += extend_len
    return own_out, own_lse


def _causal_states(queries, slots, layer):
    """Attention of queries [T, Hq, d] over the pool's keys at `slots` (S >= T), the queries'
    own the last T, causally: out [T, Hq, d], lse [T, Hq], fp32. A bf16 or fp16 model's rows
    are read in fp32: the CPU flash kernel takes only fp32, and without it the logits are
    formed whole, [Hq, T, S] (gigabytes for a long chunked prefill)."""
    num_rows, num_q_heads, head_dim = queries.shape
    query = queries.float().view(num_rows, layer.tp_k_head_num, -1, head_dim).permute(1, 2, 0, 3)  # [Hkv, G, T, d]
    keys = _cache.kv_pool.get_key_buffer(layer.layer_id)[slots].transpose(0, 1).float()  # [Hkv, S, d]
    values = _cache.kv_pool.get_value_buffer(layer.layer_id)[slots].transpose(0, 1).float()
    flash = flash_extend_attention_with_lse(query, keys, values, layer.scaling)
    if flash is not None:
        out, lse = flash
    else:
        visible = causal_visibility(num_rows, slots.shape[0], queries.device)
        out, lse = attention_with_lse(query[None], keys[None], values[None], visible.view(1, 1, 1, num_rows, -1),
                                      layer.scaling)
        out, lse = out[0], lse[0]
    return out.permute(2, 0, 1, 3).reshape(num_rows, num_q_heads, -1), lse.permute(2, 0, 1).reshape(num_rows, -1)


#: Padded own-token cells (request x position) a CPU decode group may hold beyond its requests'
#: own tokens, when that is more than the tokens themselves: one long conversation beside many
#: short requests is attended apart from them instead of padding each to its length.
DECODE_PADDING_SLACK = 4096

#: The most bytes of fp32 key and value grids (at the widest layer) one layer of a CPU decode
#: step may copy for `DecodeRows`' single call, each request its own copy of its prefix padded
#: to the widest head; the concatenation in the pool's dtype before the fp32 copy adds up to a
#: quarter more for a bf16 pool. A batch beyond it takes the per-entry states merged with the own
#: tokens' (the extend path), which reads each entry once but makes a few calls per entry and request.
DECODE_GRID_BYTES = 128 << 20


def decode_groups(own_lens: list[int]) -> list[list[int]]:
    """Requests (batch positions) in groups attended together, longest own tokens first: a
    request joins the current group while the group's padding (requests x longest - their own
    tokens) stays within max(their own tokens, DECODE_PADDING_SLACK), so a group's grid is at
    most about twice its tokens. Each group in batch order; a batch of similar lengths is one
    group, [0, 1, ..., B - 1] (one call per layer)."""
    groups: list[list[int]] = []
    group_longest = group_tokens = 0
    for position in sorted(range(len(own_lens)), key=lambda i: -own_lens[i]):
        own_len = own_lens[position]
        if groups:
            padding = (len(groups[-1]) + 1) * group_longest - (group_tokens + own_len)
            if padding <= max(group_tokens + own_len, DECODE_PADDING_SLACK):
                groups[-1].append(position)
                group_tokens += own_len
                continue
        groups.append([position])
        group_longest = group_tokens = own_len
    return [sorted(group) for group in groups]


class _DecodeGroup:
    """Requests of a decode batch attended in one masked call: their own tokens' slots, padded
    to the longest of them, and which positions are real."""

    def __init__(self, positions: list[int], req_to_token, req_pool_indices, starts, ends, entries):
        device = req_to_token.device
        self.positions = torch.tensor(positions, device=device)
        starts, ends = starts[self.positions], ends[self.positions]
        own_lens = ends - starts
        offsets = torch.arange(int(own_lens.max()), device=device)
        columns = torch.minimum(starts[:, None] + offsets[None, :], ends[:, None] - 1)
        slots = req_to_token[req_pool_indices[self.positions][:, None], columns].long()
        self.num_requests, self.longest_own = slots.shape
        self.own_slots = slots.flatten()
        self.own_visible = offsets[None, None, :] < own_lens[:, None, None]  # [B, 1, O]
        self.entry_ids = [entries[position].entry_id if entries[position] is not None else None
                          for position in positions]
        prefix_width = max((int(entries[position].layout.kept_lengths.max()) for position in positions
                            if entries[position] is not None), default=0)
        self.padded_rows = self.num_requests * (prefix_width + self.longest_own)  # per KV head, widest layer


class DecodeRows:
    """The torch path's attention for a decode batch that reads compressed prefixes: each
    request's one query sees its compressed prefix's rows of each KV head and all its own
    tokens. Per layer, one masked SDPA call per group of requests (`decode_groups`; one group
    unless own lengths differ widely) over a padded [requests, Hkv, P + O, d] grid of keys:
    each distinct entry's rows read once and padded per head (`store.read_padded_layer`: one
    gather per layer buffer), then each request's own tokens, gathered from its KV row by
    slots found once per batch. At decode sizes on the CPU the number of torch calls,
    not the arithmetic, is the cost (each small call waits for its threads, longer when
    another process holds a core), hence no per-head loop and no merge of two partial states;
    the groups bound the padding, which would otherwise make one long conversation cost its
    length for every request of the batch. Each request gets its own copy of its prefix rows
    in the grid: a batch whose grids would pass `DECODE_GRID_BYTES` is attended as an extend
    is instead (`CompressedPrefixPath.forward_decode`).

    Request i (row req_pool_indices[i] of req_to_token) uses entries[i] (None: no compressed
    prefix) and reads its own tokens at positions own_starts(entries)[i] .. seq_lens[i] - 1."""

    def __init__(self, req_to_token: torch.Tensor, req_pool_indices: torch.Tensor,
                 entries: list[StoreEntry | None], seq_lens: list[int]):
        device = req_to_token.device
        starts = own_starts(entries)
        self.num_requests = len(seq_lens)
        self.distinct: dict[int, StoreEntry] = {}
        for entry in entries:
            if entry is not None:
                self.distinct.setdefault(entry.entry_id, entry)
        own_lens = [end - start for start, end in zip(starts, seq_lens)]
        row_indices = req_pool_indices.to(device)
        starts, ends = torch.tensor(starts, device=device), torch.tensor(seq_lens, device=device)
        self.groups = [_DecodeGroup(positions, req_to_token, row_indices, starts, ends, entries)
                       for positions in decode_groups(own_lens)]
        #: Rows per KV head of the largest group's padded grids at the widest layer (`DECODE_GRID_BYTES`).
        self.padded_rows = max(group.padded_rows for group in self.groups)

    def attend(self, layer: int, queries: torch.Tensor, kv_pool, scaling: float) -> torch.Tensor:
        """queries [requests, Hq, d] -> out [requests, Hq, d_v], fp32."""
        k_buffer, v_buffer = kv_pool.get_key_buffer(layer), kv_pool.get_value_buffer(layer)
        grids = {}
        for entry_id, entry in self.distinct.items():
            keys, values, visible = read_padded_layer(entry.layout, layer, kv_pool.k_buffer, kv_pool.v_buffer)
            grids[entry_id] = (keys, values, visible.to(keys.device))
        if len(self.groups) == 1:  # the whole batch, in order
            return self._attend_group(self.groups[0], queries, grids, k_buffer, v_buffer, scaling)
        out = queries.new_empty((self.num_requests, queries.shape[1], v_buffer.shape[-1]), dtype=torch.float32)
        for group in self.groups:
            out[group.positions] = self._attend_group(group, queries[group.positions], grids, k_buffer, v_buffer,
                                                      scaling)
        return out

    @staticmethod
    def _attend_group(group: _DecodeGroup, queries, grids, k_buffer, v_buffer, scaling) -> torch.Tensor:
        """The group's queries [requests, Hq, d] (its positions' order) -> out [requests, Hq, d_v], fp32."""
        num_q_heads, head_dim = queries.shape[1:]
        num_kv_heads = k_buffer.shape[1]
        shape = (group.num_requests, group.longest_own, num_kv_heads, -1)
        own_keys = k_buffer.index_select(0, group.own_slots).view(shape).transpose(1, 2)  # [B, Hkv, O, d]
        own_values = v_buffer.index_select(0, group.own_slots).view(shape).transpose(1, 2)
        prefix_keys, prefix_values, prefix_visible = _prefix_grid(group.entry_ids, grids, num_kv_heads)
        keys = torch.cat([prefix_keys, own_keys], dim=2).float()
        values = torch.cat([prefix_values, own_values], dim=2).float()
        visible = torch.cat([prefix_visible, group.own_visible.expand(-1, num_kv_heads, -1)], dim=2)
        query = queries.float().view(group.num_requests, num_kv_heads, -1, head_dim)  # the group's heads as rows
        out = torch.nn.functional.scaled_dot_product_attention(query, keys, values, attn_mask=visible[:, :, None],
                                                               scale=scaling)
        return out.reshape(group.num_requests, num_q_heads, -1)


def _prefix_grid(entry_ids: list[int | None], grids: dict, num_kv_heads: int):
    """The compressed prefix rows of each request (its entry's id, None: no compressed prefix)
    from the layer's padded `grids` by entry id, padded: keys, values [B, Hkv, P, d] and visible
    [B, Hkv, P] (all False for a request without one, P = 0 for a group without any); requests
    that all share one entry get it once, expanded."""
    used = {entry_id for entry_id in entry_ids if entry_id is not None}
    any_keys, any_values, any_visible = next(iter(grids.values()))
    num_requests = len(entry_ids)
    if len(used) == 1 and None not in entry_ids:
        keys, values, visible = grids[next(iter(used))]
        return (keys.expand(num_requests, -1, -1, -1), values.expand(num_requests, -1, -1, -1),
                visible.expand(num_requests, -1, -1))
    width = max((grids[entry_id][0].shape[1] for entry_id in used), default=0)
    padded_keys = any_keys.new_zeros((num_requests, num_kv_heads, width, any_keys.shape[-1]))
    padded_values = any_values.new_zeros((num_requests, num_kv_heads, width, any_values.shape[-1]))
    padded_visible = any_visible.new_zeros((num_requests, num_kv_heads, width))
    for row, entry_id in enumerate(entry_ids):
        if entry_id is not None:
            keys, values, visible = grids[entry_id]
            padded_keys[row, :, :keys.shape[1]] = keys
            padded_values[row, :, :keys.shape[1]] = values
            padded_visible[row, :, :keys.shape[1]] = visible
    return padded_keys, padded_values, padded_visible


#: Chunks per (request, KV head) of a decode batch's prefix attention on CUDA (split-K).
POOL_DECODE_SPLITS = 16


class CompressedPrefixBatch:
    """The compressed prefixes of one forward batch, read once per layer.

    `states(layer, queries)` is every query token's attention over its request's compressed
    prefix: out [tokens, Hq, d] and lse [tokens, Hq], fp32; a request without one gets out 0
    and lse -inf. With the store's layout `tables` the Triton kernel of
    `lava_sglang.kernels.pool_prefix_attention` runs it, one launch per layer, reading the
    kept rows in place from the pool (planned here once per batch: the queries' offsets and
    each request's table row); otherwise torch: each distinct entry's rows of the
    layer read once and attended by the queries of every request that uses it, one KV head at
    a time (the rows are in head order, so there is no padding and no mask).
    """

    def __init__(self, entries: list[StoreEntry | None], extend_lens: list[int], kv_pool, *, num_q_heads: int,
                 num_kv_heads: int, scaling: float, tables: LayoutTables | None = None):
        self.kv_pool = kv_pool
        self.num_kv_heads = num_kv_heads
        self.scaling = scaling
        self.kernel = None
        if tables is not None:
            from lava_sglang.kernels.pool_prefix_attention import PoolPrefixAttention

            device = kv_pool.k_buffer[0].device
            decode = is_decode(extend_lens)
            # Split-K for decode only: an extend's partial states would be max_splits x its output.
            self.kernel = PoolPrefixAttention(kv_pool.k_buffer, kv_pool.v_buffer, num_q_heads=num_q_heads,
                                              max_splits=POOL_DECODE_SPLITS if decode else 1, sm_scale=scaling)
            table_rows = torch.tensor([entry.table_row if entry is not None else -1 for entry in entries],
                                      dtype=torch.int32, device=device)
            self.kernel.plan(lengths_indptr(extend_lens).to(device), table_rows, tables.tables,
                             num_tokens=sum(extend_lens), max_q_len=max(extend_lens))
            return
        # Each distinct entry with the query tokens (batch positions) of the requests that use it.
        tokens_of: dict[int, list[int]] = {}
        self.distinct: dict[int, StoreEntry] = {}
        start = 0
        for entry, extend_len in zip(entries, extend_lens):
            if entry is not None:
                self.distinct[entry.entry_id] = entry
                tokens_of.setdefault(entry.entry_id, []).extend(range(start, start + extend_len))
            start += extend_len
        device = kv_pool.k_buffer[0].device
        self.tokens_of = {entry_id: torch.tensor(tokens, device=device) for entry_id, tokens in tokens_of.items()}

    def states(self, layer: int, queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.kernel is not None:
            out, lse = self.kernel.run(queries.to(self.kernel.dtype).contiguous(), layer=layer)
            return out.float(), lse
        num_tokens, num_q_heads, head_dim = queries.shape
        group = num_q_heads // self.num_kv_heads
        out = queries.new_zeros((num_tokens, num_q_heads, head_dim), dtype=torch.float32)
        lse = queries.new_full((num_tokens, num_q_heads), float("-inf"), dtype=torch.float32)
        for entry_id, entry in self.distinct.items():
            keys, values = read_layer(entry.layout, layer, self.kv_pool.k_buffer, self.kv_pool.v_buffer)
            bounds = entry.layout.layer_head_bounds(layer)
            tokens = self.tokens_of[entry_id]
            grouped = queries.index_select(0, tokens).view(len(tokens), self.num_kv_heads, group, head_dim)
            entry_out = out.new_zeros((len(tokens), self.num_kv_heads, group, head_dim))
            entry_lse = lse.new_full((len(tokens), self.num_kv_heads, group), float("-inf"))
            for head in range(self.num_kv_heads):
                rows = slice(bounds[head], bounds[head + 1])
                if rows.start == rows.stop:  # LAVa may keep nothing of a head: it adds nothing
                    continue
                head_out, head_lse = rows_attention_with_lse(grouped[:, head].reshape(-1, head_dim), keys[rows],
                                                             values[rows], self.scaling)
                entry_out[:, head] = head_out.view(len(tokens), group, head_dim)
                entry_lse[:, head] = head_lse.view(len(tokens), group)
            out.index_copy_(0, tokens, entry_out.view(len(tokens), num_q_heads, head_dim))
            lse.index_copy_(0, tokens, entry_lse.view(len(tokens), num_q_heads))
        return out, lse


def is_decode(extend_lens: list[int]) -> bool:
    """Whether a batch can be attended as a decode step: each request's only query is the last
    key of its row, written to the pool by then (a decode step, or an extend of one token per
    request, such as a fully cached prompt recomputing its last token)."""
    return max(extend_lens) == 1


def _record_window(layer, forward_batch, q, prefix_lens, extend_lens) -> None:
    capture = _cache.capture
    queries = q.reshape(-1, layer.tp_q_head_num, layer.qk_head_dim)
    start = 0
    rids = forward_batch.rids or [None] * len(prefix_lens)  # SGLang's batches carry them; a bare one observes nothing
    for row, (rid, prefix_len, extend_len) in enumerate(zip(rids, prefix_lens, extend_lens)):
        recorded = capture.rows_to_record(rid, prefix_len, extend_len)
        if recorded:
            req_pool_idx = int(forward_batch.req_pool_indices[row])  # a device read: only for the rows captured
            capture.record(layer.layer_id, req_pool_idx, prefix_len, queries[start:start + recorded])
        start += extend_len


def _score_repetitions(layer, forward_batch, q, lse, entries, prefix_lens, extend_lens) -> None:
    """Feed each repetition request's chunk in the batch (observe "reconstruct",
    `repetition.py`) to its scores, with its queries' LSE [tokens, Hq] from the attention just
    computed; the chunk's own keys are in the pool by now."""
    queries = q.reshape(-1, layer.tp_q_head_num, layer.qk_head_dim)
    k_buffer = _cache.kv_pool.get_key_buffer(layer.layer_id)
    pool_used = _cache.pool_used()
    start = 0
    for row, (rid, prefix_len, extend_len) in enumerate(zip(forward_batch.rids or (), prefix_lens, extend_lens)):
        scores = _cache.repetitions.get(rid)
        if scores is not None and entries[row] is None:  # a repetition reads the uncompressed prefix
            slots = _cache.req_to_token_pool.req_to_token[forward_batch.req_pool_indices[row], :prefix_len + extend_len]
            try:
                rows = slice(start, start + extend_len)
                scores.add_chunk(rid, layer.layer_id, queries[rows], k_buffer[slots], prefix_len, layer.scaling,
                                 pool_used, lse=lse[rows])
            except Exception as error:  # e.g. out of memory: the prefix falls back to its tail, the server serves on
                logger.exception("lava: scoring the repetition of a %d-token prefix failed", scores.prefix_len)
                scores.failed = f"scoring failed: {error}"
                _cache.retire_repetition(scores)  # its chunks' tokens are still freed, its rids still matched
        start += extend_len


def with_compressed_prefixes(backend):
    """Give `backend` (an SGLang attention backend instance) the compressed-prefix path. Its
    class stays, so SGLang's isinstance checks and backend-name tests are unaffected."""
    path = CompressedPrefixPath(backend, flashinfer_wrappers=flashinfer_own_wrappers(backend),
                                own_cached_prefixes=recomputes_cached_prefixes(backend))
    backend.forward_extend = path.forward_extend
    backend.forward_decode = path.forward_decode
    backend.compressed_prefix_path = path
    return backend


def wrap_factory(factory):
    """An ATTENTION_BACKENDS factory whose backends have the compressed-prefix path."""
    def create(runner):
        return with_compressed_prefixes(factory(runner))

    create.__wrapped__ = factory
    return create
