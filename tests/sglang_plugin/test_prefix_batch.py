"""CompressedPrefixBatch: the server's attention over compressed prefixes, Triton kernel (the
CUDA path; here under TRITON_INTERPRET) against the torch path and against dense attention."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from lava_sglang.kernels.attention_states import attention_with_lse
from lava_sglang.sglang_plugin.attention import CompressedPrefixBatch
from lava_sglang.store import CellLayout, CompressedStore, slots_needed, write_layer

LAYERS, KV_HEADS, GROUP, DIM, POOL = 3, 2, 3, 16, 64
SCALING = 1.0 / math.sqrt(DIM)


@pytest.fixture
def pool():
    generator = torch.Generator().manual_seed(0)
    buffers = [torch.randn(POOL, KV_HEADS, DIM, generator=generator) for _ in range(2 * LAYERS)]
    return SimpleNamespace(k_buffer=buffers[:LAYERS], v_buffer=buffers[LAYERS:], layer_num=LAYERS)


def add_entry(store, pool, first_slot: int, kept_lengths: list[list[int]], seed: int):
    """An entry with random rows; returns it and its rows per (layer, head) for the dense check."""
    generator = torch.Generator().manual_seed(seed)
    kept = torch.tensor(kept_lengths, dtype=torch.int64)
    num_slots = slots_needed(int(kept.sum()), LAYERS, KV_HEADS)
    layout = CellLayout(torch.arange(first_slot, first_slot + num_slots), kept)
    rows = []
    for layer in range(LAYERS):
        keys = torch.randn(int(kept[layer].sum()), DIM, generator=generator)
        values = torch.randn(int(kept[layer].sum()), DIM, generator=generator)
        write_layer(layout, layer, pool.k_buffer, pool.v_buffer, keys, values)
        rows.append((keys.split(kept[layer].tolist()), values.split(kept[layer].tolist())))
    entry = store.add(100, layout, policy="lava", compress_seconds=0.0, bytes_per_row=8 * DIM)
    return entry, rows


def dense_states(queries, entries_rows, extend_lens, layer):
    """Per request and KV head, plain attention over that head's rows."""
    out = torch.zeros(queries.shape[0], KV_HEADS * GROUP, DIM)
    lse = torch.full((queries.shape[0], KV_HEADS * GROUP), float("-inf"))
    start = 0
    for rows, extend_len in zip(entries_rows, extend_lens):
        tokens = slice(start, start + extend_len)
        start += extend_len
        if rows is None:
            continue
        keys, values = rows[layer]
        for head in range(KV_HEADS):
            heads = slice(head * GROUP, (head + 1) * GROUP)
            query = queries[tokens, heads].transpose(0, 1)[None, None]
            state = attention_with_lse(query, keys[head][None, None], values[head][None, None],
                                       torch.ones(1, dtype=torch.bool), SCALING)
            out[tokens, heads] = state[0][0, 0].transpose(0, 1)
            lse[tokens, heads] = state[1][0, 0].transpose(0, 1)
    return out, lse


@pytest.mark.parametrize("use_kernel", [False, True])
@pytest.mark.parametrize("extend_lens", [[4, 3, 1, 2], [1, 1, 1, 1]], ids=["extend", "decode"])
def test_compressed_prefix_states_match_dense_attention(pool, use_kernel, extend_lens):
    store = CompressedStore(POOL, "cpu")
    # Per-layer, per-head lengths differ (LAVa); one head keeps nothing in layer 1.
    first, first_rows = add_entry(store, pool, 1, [[5, 9], [0, 12], [7, 3]], seed=1)
    second, second_rows = add_entry(store, pool, 20, [[2, 2], [4, 1], [1, 6]], seed=2)
    # Requests: extend on the first entry, an ordinary request, decode on the second, and
    # another on the first (an entry read once for two requests).
    entries = [first, None, second, first]
    rows = [first_rows, None, second_rows, first_rows]
    batch = CompressedPrefixBatch(entries, extend_lens, pool, num_q_heads=KV_HEADS * GROUP, num_kv_heads=KV_HEADS,
                                  scaling=SCALING, use_kernel=use_kernel)
    generator = torch.Generator().manual_seed(3)
    for layer in range(LAYERS):
        queries = torch.randn(sum(extend_lens), KV_HEADS * GROUP, DIM, generator=generator)
        out, lse = batch.states(layer, queries)
        expected_out, expected_lse = dense_states(queries, rows, extend_lens, layer)
        torch.testing.assert_close(lse, expected_lse, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(out, expected_out, atol=1e-4, rtol=1e-4)
        ordinary = slice(extend_lens[0], sum(extend_lens[:2]))
        assert torch.isneginf(lse[ordinary]).all() and (out[ordinary] == 0).all()
        assert torch.isneginf(lse[:extend_lens[0], :GROUP]).all() == (layer == 1)  # head 0 of layer 1 keeps nothing
