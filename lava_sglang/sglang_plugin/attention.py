"""Attention over (compressed prefix) + (the request's own tokens), merged by log-sum-exp.

The plugin keeps SGLang's attention backend object and installs its own forward_extend /
forward_decode on the instance (`with_compressed_prefixes`), so every isinstance check and
backend-name test in SGLang still holds. A forward batch in which no request uses a compressed prefix goes to the
original backend untouched; otherwise this module computes the batch's attention itself:
for each request, attention over its compressed prefix (each KV head its own kept rows, the
G query heads of the group reading them together) and over its own tokens (its KV row
after the prefix, causal), merged by LSE. Extend (prefill) batches also record the window
queries of long prefills for the compressor.

This is the torch path (any device). Requests that use no compressed prefix in such a batch
get exact ordinary attention from the same code.
"""

from __future__ import annotations

import torch

from lava_sglang.kernels.attention_states import attention_with_lse, merge_attention_states
from lava_sglang.sglang_plugin.touchpoints import kv_write_loc
from lava_sglang.store import read_layer

_cache = None  # the scheduler process's LavaRadixCache, bound by the radix cache factory


def bind(cache) -> None:
    global _cache
    _cache = cache


def bound_cache():
    """The LavaRadixCache of this process, or None outside a scheduler with a policy on."""
    return _cache


class CompressedPrefixPath:
    """forward_extend / forward_decode for an SGLang attention backend, installed on the
    instance; the backend's own methods serve batches without compressed prefixes."""

    def __init__(self, backend):
        self.backend = backend
        self.inner_extend = backend.forward_extend
        self.inner_decode = backend.forward_decode

    def forward_extend(self, q, k, v, layer, forward_batch, save_kv_cache=True, **kwargs):
        if _cache is None:
            return self.inner_extend(q, k, v, layer, forward_batch, save_kv_cache=save_kv_cache, **kwargs)
        prefix_lens = forward_batch.extend_prefix_lens_cpu
        extend_lens = forward_batch.extend_seq_lens_cpu
        _record_window(layer, forward_batch, q, prefix_lens, extend_lens)
        entries = _batch_entries(forward_batch)
        if not any(entries):
            return self.inner_extend(q, k, v, layer, forward_batch, save_kv_cache=save_kv_cache, **kwargs)
        return self._attend(q, k, v, layer, forward_batch, save_kv_cache, entries, prefix_lens, extend_lens)

    def forward_decode(self, q, k, v, layer, forward_batch, save_kv_cache=True, **kwargs):
        entries = _batch_entries(forward_batch) if _cache is not None else []
        if not any(entries):
            return self.inner_decode(q, k, v, layer, forward_batch, save_kv_cache=save_kv_cache, **kwargs)
        seq_lens = forward_batch.seq_lens_cpu.tolist()
        prefix_lens = [seq_len - 1 for seq_len in seq_lens]
        return self._attend(q, k, v, layer, forward_batch, save_kv_cache, entries, prefix_lens, [1] * len(seq_lens))

    def _attend(self, q, k, v, layer, forward_batch, save_kv_cache, entries, prefix_lens, extend_lens):
        if save_kv_cache and k is not None and v is not None:
            _cache.kv_pool.set_kv_buffer(
                layer, kv_write_loc(forward_batch.out_cache_loc, getattr(self.backend, "swa_out_cache_loc", None)), k, v)
        num_q_heads, num_kv_heads, head_dim = layer.tp_q_head_num, layer.tp_k_head_num, layer.qk_head_dim
        queries = q.reshape(-1, num_q_heads, head_dim)
        out = q.new_empty((queries.shape[0], num_q_heads, layer.v_head_dim))
        k_buffer = _cache.kv_pool.get_key_buffer(layer.layer_id)
        v_buffer = _cache.kv_pool.get_value_buffer(layer.layer_id)
        req_to_token = _cache.req_to_token_pool.req_to_token
        kv_pool = _cache.kv_pool
        compressed_rows = {}  # entry id -> this layer's kept rows, read once per batch
        start = 0
        for row, (entry, prefix_len, extend_len) in enumerate(zip(entries, prefix_lens, extend_lens)):
            query = queries[start:start + extend_len].view(extend_len, num_kv_heads, -1, head_dim)
            query = query.permute(1, 2, 0, 3).unsqueeze(0)  # [1, Hkv, G, T, d]
            own_start = entry.prefix_len if entry is not None else 0
            seq_len = prefix_len + extend_len
            slots = req_to_token[forward_batch.req_pool_indices[row], own_start:seq_len]
            own_keys = k_buffer[slots].transpose(0, 1).unsqueeze(0)
            own_values = v_buffer[slots].transpose(0, 1).unsqueeze(0)
            query_pos = torch.arange(prefix_len, seq_len, device=q.device)
            key_pos = torch.arange(own_start, seq_len, device=q.device)
            visible = (key_pos[None, :] <= query_pos[:, None]).view(1, 1, 1, extend_len, -1)
            state = attention_with_lse(query, own_keys, own_values, visible, layer.scaling)
            if entry is not None:
                if entry.entry_id not in compressed_rows:
                    keys, values = read_layer(entry.layout, layer.layer_id, kv_pool.k_buffer, kv_pool.v_buffer)
                    compressed_rows[entry.entry_id] = (keys, values, entry.layout.layer_head_indptr(layer.layer_id))
                state = merge_attention_states(*state, *_attend_compressed(query, *compressed_rows[entry.entry_id],
                                                                          layer.scaling))
            head_out = state[0][0].permute(2, 0, 1, 3).reshape(extend_len, num_q_heads, -1)
            out[start:start + extend_len] = head_out.to(out.dtype)
            start += extend_len
        return out.view(-1, num_q_heads * layer.v_head_dim)


def _attend_compressed(query, keys, values, head_indptr, scaling):
    """query [1, Hkv, G, T, d] over each KV head's kept rows -> (out, lse) like attention_with_lse."""
    outs, lses = [], []
    for head in range(query.shape[1]):
        rows = slice(int(head_indptr[head]), int(head_indptr[head + 1]))
        head_keys = keys[rows].view(1, 1, -1, keys.shape[-1])
        head_values = values[rows].view(1, 1, -1, values.shape[-1])
        visible = torch.ones((1, 1, 1, 1, head_keys.shape[2]), dtype=torch.bool, device=query.device)
        out, lse = attention_with_lse(query[:, head:head + 1], head_keys, head_values, visible, scaling)
        outs.append(out)
        lses.append(lse)
    return torch.cat(outs, dim=1), torch.cat(lses, dim=1)


def _batch_entries(forward_batch):
    """The compressed prefix each request of the batch uses (None for none), found once per
    batch from the first slot of each request's KV row."""
    entries = getattr(forward_batch, "_lava_entries", None)
    if entries is None:
        req_to_token = _cache.req_to_token_pool.req_to_token
        first_slots = req_to_token[forward_batch.req_pool_indices, 0]
        entries = _cache.store.entries_for_slots(first_slots)
        forward_batch._lava_entries = entries
    return entries


def _record_window(layer, forward_batch, q, prefix_lens, extend_lens) -> None:
    capture = _cache.capture
    queries = q.reshape(-1, layer.tp_q_head_num, layer.qk_head_dim)
    start = 0
    for row, (prefix_len, extend_len) in enumerate(zip(prefix_lens, extend_lens)):
        if capture.wants(prefix_len + extend_len):
            req_pool_idx = int(forward_batch.req_pool_indices[row])
            capture.record(layer.layer_id, req_pool_idx, prefix_len, queries[start:start + extend_len])
        start += extend_len


def with_compressed_prefixes(backend):
    """Give `backend` (an SGLang attention backend instance) the compressed-prefix path. Its
    class stays, so SGLang's isinstance checks and backend-name tests are unaffected."""
    path = CompressedPrefixPath(backend)
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
