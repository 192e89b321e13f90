"""The server's attention path: CompressedPrefixBatch (compressed prefixes; the Triton kernel
reading the pool through the store's layout tables is the CUDA path, here under
TRITON_INTERPRET) and each request's own tokens by SGLang's Triton kernels, against the
torch path and against dense attention; the torch path's own-token attention under a
repetition view; a repetition chunk scored through forward_extend; window queries recorded per
row of a batch; the extends over cached prefixes it takes from SGLang's torch_native; a mixed
batch through forward_extend and forward_decode against dense attention."""

from __future__ import annotations

import math
import os
import weakref
from types import SimpleNamespace

import pytest
import torch

from lava_sglang.kernels.attention_states import attention_with_lse
from lava_sglang.sglang_plugin.attention import CompressedPrefixBatch
from lava_sglang.store import CellLayout, CompressedStore, LayoutTables, slots_needed
from store_support import write_layer

LAYERS, KV_HEADS, GROUP, DIM, POOL = 3, 2, 3, 16, 64
SCALING = 1.0 / math.sqrt(DIM)
# The Triton kernels run here on CPU tensors, which only Triton's interpreter takes; tests/conftest.py sets
# TRITON_INTERPRET=1 where no CUDA device is present. On a CUDA host only the prefix kernels are tested
# compiled (tests/kernels); SGLang's own-token kernels, the FlashInfer wrapping and DecodeGraphStep are not.
interpreted_kernels = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1",
    reason="the Triton kernels run on CPU tensors here, which needs TRITON_INTERPRET=1 (set it to run them)")


class Batch(SimpleNamespace):
    """A stand-in for SGLang's ForwardBatch: weakly referenced, as the attention path holds it."""


@pytest.fixture
def pool():
    generator = torch.Generator().manual_seed(0)
    buffers = [torch.randn(POOL, KV_HEADS, DIM, generator=generator) for _ in range(2 * LAYERS)]
    return SimpleNamespace(k_buffer=buffers[:LAYERS], v_buffer=buffers[LAYERS:], layer_num=LAYERS)


def add_entry(store, pool, first_slot: int, kept_lengths: list[list[int]], seed: int, prefix_len: int = 100):
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
    entry = store.add(prefix_len, layout, policy="lava", compress_seconds=0.0, bytes_per_row=8 * DIM)
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


def new_store(pool_slots):
    tables = LayoutTables(max_entries=4, pool_slots=pool_slots, num_layers=LAYERS, num_kv_heads=KV_HEADS, device="cpu")
    return CompressedStore(tables)


@pytest.mark.parametrize("use_kernel", [False, pytest.param(True, marks=interpreted_kernels)])
@pytest.mark.parametrize("extend_lens", [[4, 3, 1, 2], [1, 1, 1, 1]], ids=["extend", "decode"])
def test_compressed_prefix_states_match_dense_attention(pool, use_kernel, extend_lens):
    store = new_store(POOL)
    # Per-layer, per-head lengths differ (LAVa); one head keeps nothing in layer 1.
    first, first_rows = add_entry(store, pool, 1, [[5, 9], [0, 12], [7, 3]], seed=1)
    second, second_rows = add_entry(store, pool, 20, [[2, 2], [4, 1], [1, 6]], seed=2)
    # Requests: extend on the first entry, an ordinary request, decode on the second, and
    # another on the first (an entry read once for two requests).
    entries = [first, None, second, first]
    rows = [first_rows, None, second_rows, first_rows]
    batch = CompressedPrefixBatch(entries, extend_lens, pool, num_q_heads=KV_HEADS * GROUP, num_kv_heads=KV_HEADS,
                                  scaling=SCALING, tables=store.tables if use_kernel else None)
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


OWN_POOL = 700  # own tokens live in slots 100.. of it, the entries' cells below


def dense_own_states(queries, keys, values, visible, group=GROUP, scaling=SCALING):
    """Plain attention of queries [T, Hq, d] over keys, values [S, Hkv, d] where visible [T, S]."""
    keys, values = keys.repeat_interleave(group, 1), values.repeat_interleave(group, 1)
    logits = torch.einsum("thd,shd->ths", queries, keys) * scaling
    logits = logits.masked_fill(~visible[:, None, :], float("-inf"))
    return torch.einsum("ths,shd->thd", logits.softmax(-1), values), logits.logsumexp(-1)


@interpreted_kernels
@pytest.mark.parametrize("decode", [False, True], ids=["extend", "decode"])
def test_sglang_own_token_kernels_match_dense_attention(decode, monkeypatch):
    # SGLang's own Triton kernels (index builder with a start offset, extend with lse_extend,
    # split-K decode with per-split LSE), under the interpreter here: each request attends to
    # its row from own_start on, causally, and the LSE is the natural-log one.
    from lava_sglang.sglang_plugin import own_attention
    from lava_sglang.sglang_plugin.own_attention import OwnTokenAttention

    monkeypatch.setattr(own_attention, "KEYS_PER_DECODE_SPLIT", 16)  # several splits per request to merge
    generator = torch.Generator().manual_seed(4)
    k_buffer = torch.randn(OWN_POOL, KV_HEADS, DIM, generator=generator)
    v_buffer = torch.randn(OWN_POOL, KV_HEADS, DIM, generator=generator)
    req_to_token = (100 + torch.randperm(600, generator=generator)).to(torch.int32).view(5, 120)
    req_pool_indices = torch.tensor([3, 0, 4, 1])
    own_starts = [100, 0, 37, 8]
    # Request 3 has no cached own token before its extend; in decode every request reads one
    # at least (its new token), request 2 reads 74 keys in 5 splits.
    extend_lens = [1, 1, 1, 1] if decode else [4, 3, 1, 2]
    seq_lens = [prefix + extend for prefix, extend in zip([103, 7, 110, 8], extend_lens)]
    own = OwnTokenAttention(KV_HEADS * GROUP)
    own.plan(req_to_token, req_pool_indices, own_starts, seq_lens, extend_lens, decode=decode)
    with pytest.raises(ValueError, match="own tokens must start within the sequence"):
        own.plan(req_to_token, req_pool_indices, [200, 0, 37, 8], seq_lens, extend_lens, decode=decode)
    queries = torch.randn(sum(extend_lens), KV_HEADS * GROUP, DIM, generator=generator)
    new_slots = torch.cat([req_to_token[row, end - extend:end].long()
                           for row, end, extend in zip(req_pool_indices, seq_lens, extend_lens)])
    if decode:
        out, lse = own.run(queries, None, None, k_buffer, v_buffer, SCALING)
    else:
        out, lse = own.run(queries, k_buffer[new_slots], v_buffer[new_slots], k_buffer, v_buffer, SCALING)
    start = 0
    for row, own_start, seq_len, extend in zip(req_pool_indices, own_starts, seq_lens, extend_lens):
        slots = req_to_token[row, own_start:seq_len].long()
        query_pos = torch.arange(seq_len - extend, seq_len)
        visible = torch.arange(own_start, seq_len)[None, :] <= query_pos[:, None]
        expected_out, expected_lse = dense_own_states(queries[start:start + extend], k_buffer[slots],
                                                      v_buffer[slots], visible)
        torch.testing.assert_close(out[start:start + extend], expected_out, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(lse[start:start + extend], expected_lse, atol=1e-4, rtol=1e-4)
        start += extend


@pytest.fixture
def bound_cache():
    from lava_sglang.sglang_plugin import attention

    def bind(cache):
        attention.bind(cache)
        return cache

    yield bind
    attention.bind(None)


def pool_with_two_entries(generator):
    """A pool of OWN_POOL slots (random K and V), its store, and two entries of different
    per-(layer, head) lengths (one head keeps nothing in layer 1), prefix_len 100 each:
    (per-layer buffers, K then V; the pool; the store; the entries)."""
    buffers = [torch.randn(OWN_POOL, KV_HEADS, DIM, generator=generator) for _ in range(2 * LAYERS)]
    kv_pool = SimpleNamespace(k_buffer=buffers[:LAYERS], v_buffer=buffers[LAYERS:], layer_num=LAYERS,
                              get_key_buffer=lambda layer: buffers[layer],
                              get_value_buffer=lambda layer: buffers[LAYERS + layer])
    store = new_store(OWN_POOL)
    first, _ = add_entry(store, kv_pool, 1, [[5, 9], [0, 12], [7, 3]], seed=1)
    second, _ = add_entry(store, kv_pool, 20, [[2, 2], [4, 1], [1, 6]], seed=2)
    return buffers, kv_pool, store, first, second


def attention_layer(layer_id: int) -> SimpleNamespace:
    """The attributes of SGLang's RadixAttention the path reads."""
    return SimpleNamespace(layer_id=layer_id, tp_q_head_num=KV_HEADS * GROUP, tp_k_head_num=KV_HEADS,
                           qk_head_dim=DIM, v_head_dim=DIM, scaling=SCALING)


@interpreted_kernels
@pytest.mark.parametrize("extend_lens", [[4, 3, 1, 2], [1, 1, 1, 1]], ids=["extend", "decode"])
def test_compressed_prefix_path_with_kernels_equals_torch(bound_cache, extend_lens):
    # The whole GPU path of a batch (SGLang's own-token kernels + the prefix kernel, merged by
    # LSE) against the torch path, on a batch that mixes requests with and without entries.
    from lava_sglang.sglang_plugin.attention import CompressedPrefixPath

    generator = torch.Generator().manual_seed(5)
    _, kv_pool, store, first, second = pool_with_two_entries(generator)
    entries = [first, None, second, first]  # prefix_len 100 each
    req_to_token = (100 + torch.randperm(600, generator=generator)).to(torch.int32).view(5, 120)
    bound_cache(SimpleNamespace(kv_pool=kv_pool, req_to_token_pool=SimpleNamespace(req_to_token=req_to_token),
                                store=store))
    prefix_lens = [103, 7, 110, 100]
    forward_batch = Batch(req_pool_indices=torch.tensor([3, 0, 4, 1]))
    backend = SimpleNamespace(forward_extend=None, forward_decode=None)
    paths = {use_kernels: CompressedPrefixPath(backend, use_kernels=use_kernels) for use_kernels in (True, False)}
    num_tokens = sum(extend_lens)
    for layer_id in range(LAYERS):
        layer = attention_layer(layer_id)
        q = torch.randn(num_tokens, KV_HEADS * GROUP * DIM, generator=generator)
        # The extend's keys are in the pool already (the path writes them before attending).
        new_slots = torch.cat([req_to_token[row, prefix:prefix + extend].long() for row, prefix, extend
                               in zip(forward_batch.req_pool_indices, prefix_lens, extend_lens)])
        k = kv_pool.get_key_buffer(layer_id)[new_slots]
        v = kv_pool.get_value_buffer(layer_id)[new_slots]
        kernel_out, kernel_lse = paths[True]._attend(q, k, v, layer, forward_batch, False, entries, prefix_lens,
                                                     extend_lens)
        torch_out, torch_lse = paths[False]._attend(q, k, v, layer, forward_batch, False, entries, prefix_lens,
                                                    extend_lens)
        torch.testing.assert_close(kernel_lse, torch_lse, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(kernel_out, torch_out, atol=1e-4, rtol=1e-4)
        if layer_id == 0:
            plans = {use_kernels: (path._own, path._prefixes) for use_kernels, path in paths.items()}
        # Metadata built once per batch at its first layer and reused (FlashInfer's plan/run).
        assert all(plans[use_kernels] == (path._own, path._prefixes) for use_kernels, path in paths.items())


@pytest.mark.parametrize("over_limit", [False, True], ids=["one-call", "over-limit"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("rows, num_groups", [([3, 0, 4, 1], 1), ([3, 1], 1), ([0, 3], 1), ([2, 3], 1),
                                              ([1, 4, 2], 2)],
                         ids=["mixed", "shared", "one-entry", "empty-layer", "grouped"])
def test_a_cpu_decode_step_is_one_padded_call_per_layer_equal_to_the_merged_states(bound_cache, monkeypatch, rows,
                                                                                   num_groups, dtype, over_limit):
    # On the torch path a decode batch over compressed prefixes is one masked SDPA call per
    # layer over each request's padded prefix rows and own tokens (DecodeRows): the same
    # attention as the per-head prefix states merged with the own tokens' by LSE (the extend
    # path). "mixed": two entries of different head lengths (one head keeps nothing in layer
    # 1), a request with none and an entry two requests share; "shared": every request uses
    # one; "one-entry": one entry and a request with none; "empty-layer": an entry of which
    # every head keeps nothing in layer 1; "grouped": own lengths 1, 11 and 3, which with no
    # padding slack are two calls, the 11 and 3 together and the 1 apart, out of batch order.
    # "over-limit": grids larger than DECODE_GRID_BYTES, so the batch takes the merged states
    # and no padded call. Each step writes the new token's K and V first.
    from lava_sglang.sglang_plugin import attention
    from lava_sglang.sglang_plugin.attention import CompressedPrefixPath, DecodeRows

    monkeypatch.setattr(attention, "DECODE_PADDING_SLACK", 0)
    if over_limit:
        def no_padded_call(*args):
            raise AssertionError("a batch over DECODE_GRID_BYTES took the padded call")

        monkeypatch.setattr(DecodeRows, "_attend_group", staticmethod(no_padded_call))

    generator = torch.Generator().manual_seed(6)
    buffers, kv_pool, store, first, second = pool_with_two_entries(generator)
    empty_layer, _ = add_entry(store, kv_pool, 40, [[3, 4], [0, 0], [2, 1]], seed=3)
    for index, buffer in enumerate(buffers):
        buffers[index] = buffer.to(dtype)
    kv_pool.k_buffer, kv_pool.v_buffer = buffers[:LAYERS], buffers[LAYERS:]

    def set_kv_buffer(layer, write_loc, k, v):  # as SGLang's pool: at the KVWriteLoc's `loc`
        buffers[layer.layer_id][write_loc.loc] = k.view(-1, KV_HEADS, DIM)
        buffers[LAYERS + layer.layer_id][write_loc.loc] = v.view(-1, KV_HEADS, DIM)

    kv_pool.set_kv_buffer = set_kv_buffer
    req_to_token = (100 + torch.randperm(600, generator=generator)).to(torch.int32).view(5, 120)
    entry_of_row = {3: first, 0: None, 4: second, 1: first, 2: empty_layer}
    for row, entry in entry_of_row.items():  # a request finds its entry by the first slot of its row
        if entry is not None:
            req_to_token[row, 0] = int(entry.layout.slots[0])
    bound_cache(SimpleNamespace(kv_pool=kv_pool, req_to_token_pool=SimpleNamespace(req_to_token=req_to_token),
                                store=store))
    seq_lens = [{3: 104, 0: 8, 4: 111, 1: 101, 2: 103}[row] for row in rows]
    # Rows per KV head of the largest padded grid: its requests x (widest kept head + longest own).
    widest = {3: 12, 0: 0, 4: 6, 1: 12, 2: 4}
    groups = [rows] if num_groups == 1 else [[1], [4, 2]]
    padded_rows = max(len(group) * (max(widest[row] for row in group) + max(
        {3: 4, 0: 8, 4: 11, 1: 1, 2: 3}[row] for row in group)) for group in groups)
    grid_bytes = padded_rows * KV_HEADS * 2 * DIM * 4
    monkeypatch.setattr(attention, "DECODE_GRID_BYTES", grid_bytes - 1 if over_limit else grid_bytes)
    new_slots = torch.stack([req_to_token[row, seq_len - 1].long() for row, seq_len in zip(rows, seq_lens)])
    forward_batch = Batch(req_pool_indices=torch.tensor(rows), seq_lens_cpu=torch.tensor(seq_lens),
                                    rids=None, out_cache_loc=new_slots)
    backend = SimpleNamespace(forward_extend=None, forward_decode=None)
    decode_path, extend_path = (CompressedPrefixPath(backend, use_kernels=False) for _ in range(2))
    entries = [entry_of_row[row] for row in rows]
    for layer_id in range(LAYERS):
        layer = attention_layer(layer_id)
        q, k, v = (torch.randn(len(rows), heads * DIM, generator=generator).to(dtype)
                   for heads in (KV_HEADS * GROUP, KV_HEADS, KV_HEADS))
        out = decode_path.forward_decode(q, k, v, layer, forward_batch, save_kv_cache=True)
        torch.testing.assert_close(buffers[layer_id][new_slots], k.view(-1, KV_HEADS, DIM))
        expected, _ = extend_path._attend(q, None, None, layer, forward_batch, False, entries,
                                          [seq_len - 1 for seq_len in seq_lens], [1] * len(rows))
        assert out.dtype == dtype
        tolerance = 1e-5 if dtype == torch.float32 else 1e-2
        torch.testing.assert_close(out, expected, atol=tolerance, rtol=tolerance)
        assert isinstance(decode_path._own, DecodeRows)
        assert len(decode_path._own.groups) == num_groups
        assert decode_path._own.padded_rows == padded_rows
        assert (decode_path._prefixes is not None) == (over_limit and any(entries))
        if layer_id == 0:
            plan = decode_path._own
        assert decode_path._own is plan  # planned once per batch, at its first layer


def test_decode_groups_bound_the_padding_of_a_long_request_beside_short_ones():
    from lava_sglang.sglang_plugin.attention import DECODE_PADDING_SLACK, decode_groups

    # Similar lengths: the whole batch in order, one call per layer.
    assert decode_groups([30, 12, 45, 7]) == [[0, 1, 2, 3]]
    # One long conversation beside 32 short requests: padded together they would hold
    # 33 x 20,000 cells for ~20,300 tokens; the long one takes one short one along (padding
    # 19,990 for 20,010 tokens), the others go together.
    own_lens = [10] * 16 + [20_000] + [9] * 16
    assert decode_groups(own_lens) == [[0, 16], [position for position in range(1, 33) if position != 16]]
    # Any lengths: every request once, each group's padding within max(its tokens, the slack).
    generator = torch.Generator().manual_seed(0)
    own_lens = (torch.randint(1, 50_000, (64,), generator=generator) ** torch.rand(64, generator=generator)).long()
    groups = decode_groups(own_lens.tolist())
    assert sorted(position for group in groups for position in group) == list(range(64))
    for group in groups:
        assert group == sorted(group)
        lengths = [int(own_lens[position]) for position in group]
        assert len(lengths) * max(lengths) - sum(lengths) <= max(sum(lengths), DECODE_PADDING_SLACK)
    assert len(groups) > 1


@interpreted_kernels
def test_decode_graph_step_equals_the_host_planned_path(bound_cache, monkeypatch):
    # The decode step planned on the device (SGLang's index builder and split-K decode kernel,
    # the prefix kernel, all under the interpreter here) against the torch path planned on the
    # host, on one set of buffers reused across steps: a batch changes size and mix, and
    # between steps an entry is evicted and another with a shorter prefix is compressed.
    from lava_sglang.sglang_plugin import own_attention
    from lava_sglang.sglang_plugin.attention import CompressedPrefixPath
    from lava_sglang.sglang_plugin.graph_decode import DecodeGraphStep

    monkeypatch.setattr(own_attention, "KEYS_PER_DECODE_SPLIT", 16)  # several splits per own row to merge

    generator = torch.Generator().manual_seed(6)
    buffers, kv_pool, store, first, second = pool_with_two_entries(generator)
    req_to_token = torch.zeros(6, 160, dtype=torch.int32)
    own_slots = iter((100 + torch.randperm(600, generator=generator)).tolist())
    bound_cache(SimpleNamespace(kv_pool=kv_pool, req_to_token_pool=SimpleNamespace(req_to_token=req_to_token),
                                store=store))
    step = DecodeGraphStep(kv_pool.k_buffer, kv_pool.v_buffer, store.tables, max_batch=6, max_context=160,
                           num_q_heads=KV_HEADS * GROUP, scaling=SCALING)

    def check(entries, seq_lens):
        # Each request's row: its entry's first slot (the compressed row's layout), then its own
        # tokens from the entry's prefix_len on; without an entry, own tokens from position 0.
        rows = torch.arange(len(entries))
        for row, entry, seq_len in zip(rows.tolist(), entries, seq_lens):
            own_start = entry.prefix_len if entry is not None else 0
            req_to_token[row, own_start:seq_len] = torch.tensor([next(own_slots) for _ in range(seq_len - own_start)])
            if entry is not None:
                req_to_token[row, 0] = entry.layout.slots[0]
        step.plan(req_to_token, rows, torch.tensor(seq_lens))
        host_path = CompressedPrefixPath(SimpleNamespace(forward_extend=None, forward_decode=None), use_kernels=False)
        for layer_id in range(LAYERS):
            layer = attention_layer(layer_id)
            q = torch.randn(len(entries), KV_HEADS * GROUP * DIM, generator=generator)
            out, lse = step.run(layer_id, q.view(len(entries), KV_HEADS * GROUP, DIM), buffers[layer_id],
                                buffers[LAYERS + layer_id])
            expected_out, expected_lse = host_path._attend(q, None, None, layer, Batch(req_pool_indices=rows),
                                                           False, entries, [seq_len - 1 for seq_len in seq_lens],
                                                           [1] * len(entries))
            torch.testing.assert_close(lse, expected_lse, atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(out.view(len(entries), -1), expected_out, atol=1e-4, rtol=1e-4)

    check([first, None, second, first], [104, 8, 111, 101])
    check([second, second, None], [130, 101, 50])
    store.remove(first.entry_id)
    third, _ = add_entry(store, kv_pool, 40, [[3, 1], [6, 6], [2, 9]], seed=3, prefix_len=60)
    check([third, None, second, third, None, second], [61, 3, 102, 95, 1, 140])
    # SGLang pads a captured batch with row 0 and length 1; row 0 starts with an entry here. The
    # padding's output is discarded: it must be finite and leave the real request's as it is alone.
    q = torch.randn(2, KV_HEADS * GROUP, DIM, generator=generator)
    step.plan(req_to_token, torch.tensor([0]), torch.tensor([61]))
    alone_out, alone_lse = (state.clone() for state in step.run(0, q[:1], buffers[0], buffers[LAYERS]))
    step.plan(req_to_token, torch.tensor([0, 0]), torch.tensor([61, 1]))
    out, lse = step.run(0, q, buffers[0], buffers[LAYERS])
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    torch.testing.assert_close(out[:1], alone_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse[:1], alone_lse, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="more than max_context"):
        step.plan(torch.zeros(6, 161, dtype=torch.int32), torch.arange(2), torch.ones(2, dtype=torch.int64))
    with pytest.raises(ValueError, match="1 to 6 requests"):
        step.plan(req_to_token, torch.arange(6).repeat(2), torch.ones(12, dtype=torch.int64))
    with pytest.raises(ValueError, match="planned for 2 requests"):
        step.run(0, torch.zeros(3, KV_HEADS * GROUP, DIM), buffers[0], buffers[LAYERS])


class StandInFlashInferWrapper:
    """A stand-in for FlashInfer's paged wrappers (FlashInfer's kernels need CUDA): records the
    arguments of `begin_forward`, checked against the real wrapper's plan signature, and
    computes from that plan what FlashInfer computes: per request, attention over its paged
    keys (page size 1), causal with the queries aligned to the end of its keys, and the LSE in
    base 2."""

    def __init__(self, plan_signature, prefill: bool):
        self.plan_signature, self.prefill = plan_signature, prefill
        self.plans = []

    def begin_forward(self, *args, **kwargs):
        self.plans.append(self.plan_signature.bind(self, *args, **kwargs).arguments)

    def run_plan(self, q, paged_kv_cache, causal, sm_scale):
        plan = self.plans[-1]
        kv_indptr, kv_indices = plan["paged_kv_indptr" if self.prefill else "indptr"], plan[
            "paged_kv_indices" if self.prefill else "indices"]
        qo_indptr = plan["qo_indptr"] if self.prefill else torch.arange(len(kv_indptr), dtype=torch.int32)
        assert q.shape == (qo_indptr[-1], plan["num_qo_heads"], DIM)  # FlashInfer's own check
        group = plan["num_qo_heads"] // plan["num_kv_heads"]
        k_cache, v_cache = paged_kv_cache
        out, lse = torch.empty_like(q), torch.empty(q.shape[:2])
        for request in range(len(kv_indptr) - 1):
            queries = slice(qo_indptr[request], qo_indptr[request + 1])
            slots = kv_indices[kv_indptr[request]:kv_indptr[request + 1]].long()
            num_queries, num_keys = queries.stop - queries.start, len(slots)
            visible = torch.ones(num_queries, num_keys, dtype=torch.bool)
            if causal:
                query_positions = num_keys - num_queries + torch.arange(num_queries)
                visible = torch.arange(num_keys)[None, :] <= query_positions[:, None]
            out[queries], natural_lse = dense_own_states(q[queries], k_cache[slots], v_cache[slots], visible, group,
                                                         sm_scale)
            lse[queries] = natural_lse / math.log(2)
        return out, lse


class StandInDecodeWrapper(StandInFlashInferWrapper):
    def forward_return_lse(self, q, paged_kv_cache, sm_scale=None):
        return self.run_plan(q, paged_kv_cache, False, sm_scale)


class StandInPrefillWrapper(StandInFlashInferWrapper):
    def forward_return_lse(self, q, paged_kv_cache, causal=False, sm_scale=None):
        return self.run_plan(q, paged_kv_cache, causal, sm_scale)


@interpreted_kernels
@pytest.mark.parametrize("extend_lens", [[4, 3, 1, 2], [1, 1, 1, 1]], ids=["extend", "decode"])
def test_flashinfer_wrapping_plans_own_rows_and_equals_torch(bound_cache, extend_lens):
    # Under SGLang's flashinfer backend the own tokens go to FlashInfer's paged wrappers,
    # planned once per batch on each request's row after its compressed prefix; their base-2
    # LSE merged with the prefix kernel's gives the torch path's attention.
    import inspect

    from lava_sglang.sglang_plugin.attention import CompressedPrefixPath

    flashinfer = pytest.importorskip("flashinfer", reason="FlashInfer is not installed")

    decode = max(extend_lens) == 1
    # The decode wrapper's `plan` forwards **kwargs to `_plan_impl`, whose signature names them.
    decode_wrapper = StandInDecodeWrapper(
        inspect.signature(flashinfer.BatchDecodeWithPagedKVCacheWrapper._plan_impl), prefill=False)
    prefill_wrapper = StandInPrefillWrapper(inspect.signature(flashinfer.BatchPrefillWithPagedKVCacheWrapper.plan),
                                            prefill=True)
    generator = torch.Generator().manual_seed(7)
    buffers, kv_pool, store, first, second = pool_with_two_entries(generator)

    def set_kv_buffer(layer, loc, k, v):
        buffers[layer.layer_id][loc.loc], buffers[LAYERS + layer.layer_id][loc.loc] = k, v

    kv_pool.set_kv_buffer = set_kv_buffer
    entries = [first, None, second, first]  # prefix_len 100 each
    req_to_token = (100 + torch.randperm(600, generator=generator)).to(torch.int32).view(5, 120)
    bound_cache(SimpleNamespace(kv_pool=kv_pool, req_to_token_pool=SimpleNamespace(req_to_token=req_to_token),
                                store=store))
    prefix_lens = [103, 7, 110, 100]
    new_slots = torch.cat([req_to_token[row, prefix:prefix + extend].long() for row, prefix, extend
                           in zip([3, 0, 4, 1], prefix_lens, extend_lens)])
    forward_batch = Batch(req_pool_indices=torch.tensor([3, 0, 4, 1]), out_cache_loc=new_slots)
    backend = SimpleNamespace(forward_extend=None, forward_decode=None)
    wrapped = CompressedPrefixPath(backend, use_kernels=True, flashinfer_wrappers=(decode_wrapper, prefill_wrapper))
    torch_path = CompressedPrefixPath(backend, use_kernels=False)
    for layer_id in range(LAYERS):
        layer = attention_layer(layer_id)
        q = torch.randn(sum(extend_lens), KV_HEADS * GROUP * DIM, generator=generator)
        k, v = kv_pool.get_key_buffer(layer_id)[new_slots], kv_pool.get_value_buffer(layer_id)[new_slots]
        # The batch's new keys are not in the pool before the path writes them (FlashInfer reads
        # them from there).
        buffers[layer_id][new_slots], buffers[LAYERS + layer_id][new_slots] = float("nan"), float("nan")
        out, lse = wrapped._attend(q, k, v, layer, forward_batch, True, entries, prefix_lens, extend_lens)
        expected_out, expected_lse = torch_path._attend(q, k, v, layer, forward_batch, False, entries, prefix_lens,
                                                        extend_lens)
        torch.testing.assert_close(lse, expected_lse, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(out, expected_out, atol=1e-4, rtol=1e-4)
    used, unused = (decode_wrapper, prefill_wrapper) if decode else (prefill_wrapper, decode_wrapper)
    assert len(used.plans) == 1 and not unused.plans  # planned once for the batch's layers
    plan = used.plans[0]
    own_starts = [100, 0, 100, 100]
    seq_lens = [prefix + extend for prefix, extend in zip(prefix_lens, extend_lens)]
    kv_indptr, kv_indices = (plan["paged_kv_indptr"], plan["paged_kv_indices"]) if not decode else (
        plan["indptr"], plan["indices"])
    expected_indices = torch.cat([req_to_token[row, start:end] for row, start, end
                                  in zip(forward_batch.req_pool_indices, own_starts, seq_lens)])
    last_page_len = plan["paged_kv_last_page_len" if not decode else "last_page_len"]
    planned_indptrs = [kv_indptr, last_page_len] + ([] if decode else [plan["qo_indptr"]])
    # int32, as SGLang plans them, and the indptrs on the host, where the plan reads them.
    assert all(tensor.dtype == torch.int32 and tensor.device.type == "cpu" for tensor in planned_indptrs)
    assert kv_indices.dtype == torch.int32
    assert plan["head_dim_qk" if not decode else "head_dim"] == DIM
    assert kv_indptr.tolist() == [0, *torch.cumsum(torch.tensor(seq_lens) - torch.tensor(own_starts), 0).tolist()]
    assert torch.equal(kv_indices, expected_indices)
    assert last_page_len.tolist() == [1] * 4 and plan["page_size"] == 1
    assert (plan["num_qo_heads"], plan["num_kv_heads"]) == (KV_HEADS * GROUP, KV_HEADS)
    if not decode:
        assert plan["qo_indptr"].tolist() == [0, 4, 7, 8, 10] and plan["causal"] is True


def test_only_sglangs_flashinfer_backend_gets_flashinfer_wrappers(monkeypatch):
    # FlashInfer's wrappers need CUDA to be built: recorded here, bound to the real
    # constructors' signatures, with the attributes the backend builds its own from (its
    # workspace buffer, kernel choice, tensor cores), which SGLang's __init__ must still set.
    import inspect

    from lava_sglang.sglang_plugin.attention import with_compressed_prefixes

    flashinfer = pytest.importorskip("flashinfer", reason="FlashInfer is not installed")
    flashinfer_backend = pytest.importorskip("sglang.srt.layers.attention.flashinfer_backend",
                                             reason="SGLang's flashinfer backend does not import")
    FlashInferAttnBackend = flashinfer_backend.FlashInferAttnBackend
    backend_init = inspect.getsource(FlashInferAttnBackend.__init__)
    for attribute in ("workspace_buffer", "decode_backend", "prefill_backend", "decode_use_tensor_cores"):
        assert f"self.{attribute} =" in backend_init

    def recorded(kind, real_class):
        def build(*args, **kwargs):
            inspect.signature(real_class.__init__).bind(None, *args, **kwargs)
            return kind, args, kwargs
        return build

    for kind, name in (("decode", "BatchDecodeWithPagedKVCacheWrapper"),
                       ("prefill", "BatchPrefillWithPagedKVCacheWrapper")):
        monkeypatch.setattr(flashinfer, name, recorded(kind, getattr(flashinfer, name)))
    backend = FlashInferAttnBackend.__new__(FlashInferAttnBackend)
    workspace = torch.empty(8, dtype=torch.uint8)
    backend.workspace_buffer, backend.decode_backend, backend.prefill_backend = workspace, "fa2", "fa3"
    backend.decode_use_tensor_cores, backend.forward_extend, backend.forward_decode = True, None, None
    decode_wrapper, prefill_wrapper = with_compressed_prefixes(backend).compressed_prefix_path.flashinfer_wrappers
    assert decode_wrapper == ("decode", (workspace, "NHD"), {"backend": "fa2", "use_tensor_cores": True})
    assert prefill_wrapper == ("prefill", (workspace, "NHD"), {"backend": "fa3"})
    other = with_compressed_prefixes(SimpleNamespace(forward_extend=None, forward_decode=None))
    assert other.compressed_prefix_path.flashinfer_wrappers is None

    class SubclassBackend(FlashInferAttnBackend):  # as trtllm_mha's: other kernels
        pass

    subclass_backend = SubclassBackend.__new__(SubclassBackend)
    subclass_backend.forward_extend = subclass_backend.forward_decode = None
    assert with_compressed_prefixes(subclass_backend).compressed_prefix_path.flashinfer_wrappers is None


def cached_prefix_bench():
    """scripts/bench_cached_prefix_attention.py, whose stand-ins the routing test shares."""
    import importlib.util
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "scripts" / "bench_cached_prefix_attention.py"
    spec = importlib.util.spec_from_file_location("bench_cached_prefix_attention", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("prefix_lens, extend_lens, takes_own_path", [
    ([7, 0, 12], [3, 5, 1], True),  # questions over cached prefixes, one request without
    ([9, 4], [1, 1], True),  # one new token each over its cached prefix
    ([0, 0], [6, 2], False),  # documents prefilled from nothing: SGLang's own attention
], ids=["cached-prefixes", "one-token-each", "no-cached-prefix"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_torch_native_extends_over_cached_prefixes_take_the_plugins_path(
        bound_cache, prefix_lens, extend_lens, takes_own_path, dtype):
    # SGLang's torch_native backend attends from every position of a request's sequence and
    # discards the cached prefix's rows; wrapped, an extend batch with a cached prefix and no
    # compressed one takes the plugin's path instead, with the backend's own answer. Not in
    # bf16 on the CPU: the CPU flash kernel takes fp32 only, and the path's fp32 copies of the
    # rows were not measured against the backend's own bf16 attention.
    from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend
    from sglang.srt.layers.radix_attention import RadixAttention

    from lava_sglang.sglang_plugin.attention import with_compressed_prefixes

    bench = cached_prefix_bench()
    generator = torch.Generator().manual_seed(7)
    k_buffer, v_buffer = (torch.randn(OWN_POOL, KV_HEADS, DIM, generator=generator).to(dtype) for _ in range(2))
    req_to_token = (100 + torch.randperm(600, generator=generator)).to(torch.int32).view(5, 120)
    backend = bench.wrapped_torch_native(k_buffer, v_buffer, req_to_token)
    path = backend.compressed_prefix_path
    assert path.own_cached_prefixes
    inner_calls = []
    path.inner_extend = lambda *args, **kwargs: inner_calls.append(args) or TorchNativeAttnBackend.forward_extend(
        backend, *args, **kwargs)

    layer = RadixAttention(KV_HEADS * GROUP, DIM, SCALING, KV_HEADS, layer_id=0)
    forward_batch = bench.extend_batch([3, 0, 4][:len(prefix_lens)], prefix_lens, extend_lens)
    q = torch.randn(sum(extend_lens), KV_HEADS * GROUP * DIM, generator=generator).to(dtype)
    out = backend.forward_extend(q, None, None, layer, forward_batch, save_kv_cache=False)
    assert bool(inner_calls) is not (takes_own_path and dtype == torch.float32)
    expected = TorchNativeAttnBackend.forward_extend(backend, q, None, None, layer, forward_batch, save_kv_cache=False)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    other = with_compressed_prefixes(SimpleNamespace(forward_extend=None, forward_decode=None))
    assert not other.compressed_prefix_path.own_cached_prefixes


def test_the_cached_prefix_benchmark_prints_a_row_per_prefix(bound_cache, capsys):
    rows = cached_prefix_bench().main(["--smoke"])
    printed = capsys.readouterr().out
    assert [row["prefix"] for row in rows] == [40]
    assert "machine: " in printed and "inputs: one request, prefixes [40] cached + 5 new tokens" in printed
    assert printed.rstrip().splitlines()[-1].startswith("| 40 | ")
    with pytest.raises(SystemExit):
        cached_prefix_bench().parse_args(["--heads", "9", "2"])


def test_own_states_of_a_bf16_pool_take_the_flash_kernel_not_the_dense_logits(bound_cache, monkeypatch):
    # A bf16 model on the CPU engine: a request's own tokens over a long cached row would form
    # [Hq, T, S] logits without the flash kernel, which takes only fp32.
    from lava_sglang.sglang_plugin import attention

    monkeypatch.setattr(attention, "attention_with_lse", lambda *args: pytest.fail("the dense logits were formed"))
    generator = torch.Generator().manual_seed(9)
    k_buffer, v_buffer = (torch.randn(OWN_POOL, KV_HEADS, DIM, generator=generator).bfloat16() for _ in range(2))
    req_to_token = (100 + torch.randperm(600, generator=generator)).view(5, 120)
    kv_pool = SimpleNamespace(get_key_buffer=lambda layer_id: k_buffer, get_value_buffer=lambda layer_id: v_buffer)
    bound_cache(SimpleNamespace(kv_pool=kv_pool, req_to_token_pool=SimpleNamespace(req_to_token=req_to_token)))
    prefix_lens, extend_lens = [30, 0], [5, 4]
    forward_batch = Batch(req_pool_indices=torch.tensor([1, 4]))
    queries = torch.randn(sum(extend_lens), KV_HEADS * GROUP, DIM, generator=generator).bfloat16()
    out, lse = attention._own_states_extend(queries, attention_layer(0), forward_batch, [None] * 2, prefix_lens,
                                            extend_lens)
    start = 0
    for row, prefix_len, extend_len in zip(forward_batch.req_pool_indices, prefix_lens, extend_lens):
        seq_len = prefix_len + extend_len
        slots = req_to_token[row, :seq_len]
        visible = torch.arange(seq_len)[None, :] <= torch.arange(prefix_len, seq_len)[:, None]
        expected_out, expected_lse = dense_own_states(queries[start:start + extend_len].float(),
                                                      k_buffer[slots].float(), v_buffer[slots].float(), visible)
        torch.testing.assert_close(out[start:start + extend_len], expected_out, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(lse[start:start + extend_len], expected_lse, atol=1e-4, rtol=1e-4)
        start += extend_len


def test_own_states_extend_under_a_repetition_view_attends_to_the_viewed_positions_only(bound_cache):
    # Rows of one batch: an ordinary request; a repetition chunk under view "chunk" (its
    # queries see the prefix's sinks and the tokens it copies, then its own); the same chunk's
    # piece that first recomputes the prefix's last 2 tokens (those see the whole row).
    from lava_sglang.policy.observe import repeat_view_positions
    from lava_sglang.sglang_plugin.attention import _own_states_extend

    generator = torch.Generator().manual_seed(8)
    k_buffer, v_buffer = (torch.randn(OWN_POOL, KV_HEADS, DIM, generator=generator) for _ in range(2))
    req_to_token = (100 + torch.randperm(600, generator=generator)).view(5, 120)
    kv_pool = SimpleNamespace(get_key_buffer=lambda layer_id: k_buffer, get_value_buffer=lambda layer_id: v_buffer)
    bound_cache(SimpleNamespace(kv_pool=kv_pool, req_to_token_pool=SimpleNamespace(req_to_token=req_to_token)))
    repeated_prefix, copied = 20, (10, 15)
    prefix_lens, extend_lens = [5, repeated_prefix, repeated_prefix - 2], [3, 6, 6]
    views = [None]
    for prefix_len, extend_len in zip(prefix_lens[1:], extend_lens[1:]):
        positions = torch.cat([repeat_view_positions(copied, 4),
                               torch.arange(repeated_prefix, prefix_len + extend_len)])
        views.append((max(0, repeated_prefix - prefix_len), positions))
    forward_batch = Batch(req_pool_indices=torch.tensor([2, 0, 3]))
    queries = torch.randn(sum(extend_lens), KV_HEADS * GROUP, DIM, generator=generator)
    out, lse = _own_states_extend(queries, attention_layer(0), forward_batch, [None] * 3, prefix_lens, extend_lens,
                                  views)
    start = 0
    for row, prefix_len, extend_len, view in zip(forward_batch.req_pool_indices, prefix_lens, extend_lens, views):
        seq_len = prefix_len + extend_len
        slots = req_to_token[row, :seq_len]
        query_pos = torch.arange(prefix_len, seq_len)[:, None]
        key_pos = torch.arange(seq_len)[None, :]
        visible = key_pos <= query_pos
        if view is not None:  # a repetition query sees the sinks, what it copies and the repetition
            viewed = (key_pos < 4) | ((key_pos >= copied[0]) & (key_pos < copied[1])) | (key_pos >= repeated_prefix)
            visible &= viewed | (query_pos < repeated_prefix)
        expected_out, expected_lse = dense_own_states(queries[start:start + extend_len], k_buffer[slots],
                                                      v_buffer[slots], visible)
        torch.testing.assert_close(out[start:start + extend_len], expected_out, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(lse[start:start + extend_len], expected_lse, atol=1e-4, rtol=1e-4)
        start += extend_len


@pytest.mark.parametrize("view", ["prefix", "chunk"])
def test_a_repetition_chunk_in_two_pieces_is_scored_as_its_dense_attention(bound_cache, view):
    # forward_extend on a batch of an ordinary request and a repetition chunk's request whose
    # extend comes in two pieces (chunked prefill), the first recomputing the prefix's last 2
    # tokens: the scores folded in are the reference runtime's for the chunk's dense attention
    # (under view "chunk" over the view's keys, packed), and the chunk ends scored whole.
    from lava_sglang.policy import Reconstruct, repeat_attention_chunk, repeat_view_positions
    from lava_sglang.sglang_plugin.attention import CompressedPrefixPath
    from lava_sglang.sglang_plugin.repetition import RepetitionScores

    prefix_len, window = 24, 4
    source = Reconstruct(chunk_tokens=8, chat_turn=False, view=view)
    repetition = RepetitionScores.plan(list(range(prefix_len)), source, lambda text: [7, 8, 9], window, LAYERS)
    chunk = repetition.chunks[1]  # copies prefix positions 8..15 after an instruction and 8 overlap tokens
    seq_len = prefix_len + chunk.num_queries
    generator = torch.Generator().manual_seed(9)
    k_buffer, v_buffer = (torch.randn(OWN_POOL, KV_HEADS, DIM, generator=generator) for _ in range(2))
    req_to_token = (100 + torch.randperm(600, generator=generator)).view(5, 120)
    kv_pool = SimpleNamespace(get_key_buffer=lambda layer_id: k_buffer, get_value_buffer=lambda layer_id: v_buffer)

    def retire(scores):
        raise AssertionError(f"the repetition was retired: {scores.failed}")

    bound_cache(SimpleNamespace(kv_pool=kv_pool, req_to_token_pool=SimpleNamespace(req_to_token=req_to_token),
                                store=new_store(OWN_POOL), repetitions={chunk.rid: repetition},
                                capture=SimpleNamespace(rows_to_record=lambda rid, prefix, extend: 0),
                                pool_used=lambda: 0, retire_repetition=retire))
    queries = torch.randn(seq_len, KV_HEADS * GROUP, DIM, generator=generator)
    path = CompressedPrefixPath(SimpleNamespace(forward_extend=None, forward_decode=None), use_kernels=False)
    for piece_start, piece_end in ((prefix_len - 2, prefix_len + 10), (prefix_len + 10, seq_len)):
        forward_batch = Batch(req_pool_indices=torch.tensor([3, 1]), rids=["ordinary", chunk.rid],
                                        extend_prefix_lens_cpu=[5, piece_start],
                                        extend_seq_lens_cpu=[3, piece_end - piece_start])
        q = torch.cat([torch.randn(3, KV_HEADS * GROUP, DIM, generator=generator), queries[piece_start:piece_end]])
        for layer_id in range(LAYERS):  # the pieces' keys are in the pool already: nothing saved
            out = path.forward_extend(q.flatten(1), None, None, attention_layer(layer_id), forward_batch,
                                      save_kv_cache=False)
        if piece_start < prefix_len:  # the recomputed prefix tokens attend to the whole row before them
            slots = req_to_token[1, :prefix_len]
            visible = torch.arange(prefix_len)[None, :] <= torch.arange(piece_start, prefix_len)[:, None]
            expected_out, _ = dense_own_states(queries[piece_start:prefix_len], k_buffer[slots], v_buffer[slots],
                                               visible)
            torch.testing.assert_close(out[3:3 + prefix_len - piece_start].view_as(expected_out), expected_out,
                                       atol=1e-4, rtol=1e-4)
    assert repetition.end_chunk(chunk.rid, checkpointed=True).done
    keys = k_buffer[req_to_token[1, :seq_len]].transpose(0, 1)  # [Hkv, S, d]: the same in every layer here
    repeated = queries[prefix_len:].transpose(0, 1)  # the repetition's queries [Hq, T, d]
    copied = chunk.copied
    if view == "chunk":  # the reference runtime's packing: the view's keys, then the repetition's
        viewed = repeat_view_positions(copied, source.sink_tokens)
        keys = torch.cat([keys[:, viewed], keys[:, prefix_len:]], dim=1)
        expected = repeat_attention_chunk(repeated, keys, len(viewed), len(viewed),
                                          (len(viewed) - (copied[1] - copied[0]), len(viewed)), SCALING)
    else:
        expected = repeat_attention_chunk(repeated, keys, prefix_len, prefix_len, copied, SCALING)
    for layer_id in range(LAYERS):
        torch.testing.assert_close(repetition.repeat[layer_id][:, copied[0]:copied[1]], expected, atol=1e-5, rtol=1e-4)
        assert (repetition.repeat[layer_id][:, :copied[0]] == 0).all()  # the other chunks never ran


def test_window_queries_are_recorded_from_each_rows_own_queries_in_a_batch(bound_cache):
    # _record_window on a batch of three extends: the capture gets each row's first `recorded`
    # queries from that row's own place in q, with the row's pool index and prefix length.
    from lava_sglang.sglang_plugin.attention import _record_window

    recorded = []
    to_record = {"a": 2, "b": 0, "c": 3}
    capture = SimpleNamespace(rows_to_record=lambda rid, prefix_len, extend_len: to_record[rid],
                              record=lambda layer_id, row, prefix_len, queries: recorded.append(
                                  (layer_id, row, prefix_len, queries.clone())))
    bound_cache(SimpleNamespace(capture=capture))
    prefix_lens, extend_lens = [0, 10, 4], [5, 3, 4]
    q = torch.arange(12 * KV_HEADS * GROUP * DIM, dtype=torch.float32).view(12, -1)
    queries = q.view(12, KV_HEADS * GROUP, DIM)
    batch = SimpleNamespace(rids=["a", "b", "c"], req_pool_indices=torch.tensor([7, 2, 5]))
    _record_window(attention_layer(1), batch, q, prefix_lens, extend_lens)
    assert [(layer_id, row, prefix_len) for layer_id, row, prefix_len, _ in recorded] == [(1, 7, 0), (1, 5, 4)]
    assert torch.equal(recorded[0][3], queries[0:2]) and torch.equal(recorded[1][3], queries[8:11])


def test_a_scoring_failure_is_logged_with_its_traceback_and_retires_the_repetition(bound_cache, caplog):
    # The prefix then falls back to its tail and the server serves on; a bug in the scoring
    # (a shape mismatch, say) must still be seen, once, with where it happened.
    import logging

    from lava_sglang.sglang_plugin.attention import _score_repetitions

    def add_chunk(*args, **kwargs):
        raise RuntimeError("shapes do not match")

    scores = SimpleNamespace(prefix_len=24, failed=None, add_chunk=add_chunk)
    repetitions, retired = {"chunk": scores}, []

    def retire(stopped):
        retired.append(stopped)
        repetitions.clear()

    k_buffer = torch.zeros(OWN_POOL, KV_HEADS, DIM)
    bound_cache(SimpleNamespace(kv_pool=SimpleNamespace(get_key_buffer=lambda layer_id: k_buffer),
                                req_to_token_pool=SimpleNamespace(req_to_token=torch.arange(120).view(1, 120)),
                                repetitions=repetitions, pool_used=lambda: 0, retire_repetition=retire))
    forward_batch = Batch(req_pool_indices=torch.tensor([0]), rids=["chunk"])
    q = torch.zeros(5, KV_HEADS * GROUP * DIM)
    with caplog.at_level(logging.WARNING, logger="lava_sglang.sglang_plugin.attention"):
        for layer_id in range(LAYERS):
            _score_repetitions(attention_layer(layer_id), forward_batch, q, torch.zeros(5, KV_HEADS * GROUP), [None],
                               [24], [5])
    assert scores.failed == "scoring failed: shapes do not match" and retired == [scores]
    assert caplog.text.count("scoring the repetition of a 24-token prefix failed") == 1
    assert "Traceback" in caplog.text and "RuntimeError: shapes do not match" in caplog.text


@pytest.mark.parametrize("use_kernels", [False, pytest.param(True, marks=interpreted_kernels)],
                         ids=["torch", "kernels"])
def test_a_mixed_batch_through_the_backend_entry_points_equals_dense_attention(bound_cache, use_kernels):
    # forward_extend, then forward_decode, as SGLang calls them: each request's entry found by the
    # first slot of its row (compressed_tree's row layout: the entry's slots, padding to the
    # prefix's length, then its own tokens), against dense attention over the kept rows and the
    # own tokens. The batch: a compressed prefix with a chunked prefill (5 own tokens cached, 7
    # new), an uncompressed cached prefix (30 + 4), no prefix (6), a compressed prefix and its
    # first own token, and one after 20 own tokens; a head that keeps nothing in layer 1. A
    # batch with no compressed prefix goes to the wrapped backend.
    from lava_sglang.sglang_plugin.attention import CompressedPrefixPath

    generator = torch.Generator().manual_seed(11)
    buffers = [torch.randn(OWN_POOL, KV_HEADS, DIM, generator=generator) for _ in range(2 * LAYERS)]

    def set_kv_buffer(layer, write_loc, k, v):
        buffers[layer.layer_id][write_loc.loc] = k.view(-1, KV_HEADS, DIM)
        buffers[LAYERS + layer.layer_id][write_loc.loc] = v.view(-1, KV_HEADS, DIM)

    kv_pool = SimpleNamespace(k_buffer=buffers[:LAYERS], v_buffer=buffers[LAYERS:], layer_num=LAYERS,
                              get_key_buffer=lambda layer: buffers[layer],
                              get_value_buffer=lambda layer: buffers[LAYERS + layer], set_kv_buffer=set_kv_buffer)
    store = new_store(OWN_POOL)
    prefix_len = 40
    entry, kept_rows = add_entry(store, kv_pool, 1, [[5, 11], [0, 7], [3, 2]], seed=12, prefix_len=prefix_len)
    req_to_token = torch.zeros(6, 128, dtype=torch.int32)
    free_slots = iter(range(100, OWN_POOL))
    # (row, compressed, cached tokens, new tokens)
    requests = [(0, True, prefix_len + 5, 7), (1, False, 30, 4), (2, False, 0, 6), (3, True, prefix_len, 1),
                (4, True, prefix_len + 20, 1)]
    for row, compressed, cached, new in requests:
        own_start = prefix_len if compressed else 0
        if compressed:
            req_to_token[row, :entry.layout.slots.numel()] = entry.layout.slots.int()
        for position in range(own_start, cached + new + 1):  # and the decode step's token
            req_to_token[row, position] = next(free_slots)
    bound_cache(SimpleNamespace(kv_pool=kv_pool, req_to_token_pool=SimpleNamespace(req_to_token=req_to_token),
                                store=store, capture=SimpleNamespace(rows_to_record=lambda *args: 0),
                                repetitions={}))
    inner_calls = []
    backend = SimpleNamespace(forward_extend=lambda *args, **kwargs: inner_calls.append("extend"),
                              forward_decode=lambda *args, **kwargs: inner_calls.append("decode"))
    path = CompressedPrefixPath(backend, use_kernels=use_kernels)

    def expected(queries, layer_id, row, compressed, cached, new):
        own_start = prefix_len if compressed else 0
        slots = req_to_token[row, own_start:cached + new].long()
        visible = torch.arange(own_start, cached + new)[None, :] <= torch.arange(cached, cached + new)[:, None]
        keys, values = buffers[layer_id][slots], buffers[LAYERS + layer_id][slots]
        if not compressed:
            return dense_own_states(queries, keys, values, visible)[0]
        prefix_keys, prefix_values = kept_rows[layer_id]
        out = torch.empty_like(queries)
        for head in range(KV_HEADS):  # the head's kept rows, seen by every query, then its own tokens
            heads = slice(head * GROUP, (head + 1) * GROUP)
            head_keys = torch.cat([prefix_keys[head], keys[:, head]])[:, None]
            head_values = torch.cat([prefix_values[head], values[:, head]])[:, None]
            head_visible = torch.cat([torch.ones(new, prefix_keys[head].shape[0], dtype=torch.bool), visible], 1)
            out[:, heads] = dense_own_states(queries[:, heads], head_keys, head_values, head_visible)[0]
        return out

    for step in ("extend", "decode"):
        if step == "decode":
            requests = [(row, compressed, cached + new, 1) for row, compressed, cached, new in requests]
        new_slots = torch.cat([req_to_token[row, cached:cached + new].long() for row, _, cached, new in requests])
        forward_batch = Batch(
            req_pool_indices=torch.tensor([row for row, *_ in requests]), rids=[f"r{row}" for row, *_ in requests],
            extend_prefix_lens_cpu=[cached for _, _, cached, _ in requests],
            extend_seq_lens_cpu=[new for *_, new in requests], out_cache_loc=new_slots,
            seq_lens_cpu=torch.tensor([cached + new for _, _, cached, new in requests]))
        num_tokens = new_slots.numel()
        for layer_id in range(LAYERS):
            q = torch.randn(num_tokens, KV_HEADS * GROUP * DIM, generator=generator)
            k, v = (torch.randn(num_tokens, KV_HEADS * DIM, generator=generator) for _ in range(2))
            forward = path.forward_extend if step == "extend" else path.forward_decode
            out = forward(q, k, v, attention_layer(layer_id), forward_batch).view(num_tokens, KV_HEADS * GROUP, DIM)
            start = 0
            for request in requests:
                rows = slice(start, start + request[3])
                start = rows.stop
                torch.testing.assert_close(out[rows], expected(q.view_as(out)[rows], layer_id, *request),
                                           atol=1e-4, rtol=1e-4)
    assert inner_calls == []
    uncompressed_only = Batch(req_pool_indices=torch.tensor([2]), rids=["r2"], extend_prefix_lens_cpu=[0],
                                        extend_seq_lens_cpu=[6], out_cache_loc=req_to_token[2, :6].long())
    path.forward_extend(torch.zeros(6, KV_HEADS * GROUP * DIM), None, None, attention_layer(0), uncompressed_only)
    assert inner_calls == ["extend"]


def test_the_path_lets_go_of_a_batch_and_its_state_once_sglang_drops_it(bound_cache, pool):
    # A batch's device tensors (its embeddings, the prefixes' metadata) stay allocated for as
    # long as anything refers to them: an idle server would keep its last batch.
    from lava_sglang.sglang_plugin.attention import CompressedPrefixPath

    store = new_store(POOL)
    entry, _ = add_entry(store, pool, 1, [[2, 3], [1, 4], [3, 3]], seed=3, prefix_len=20)
    req_to_token = torch.zeros(1, 32, dtype=torch.int32)
    req_to_token[0, :entry.layout.slots.numel()] = entry.layout.slots.int()
    req_to_token[0, 20:23] = torch.arange(40, 43, dtype=torch.int32)
    pool.get_key_buffer, pool.get_value_buffer = pool.k_buffer.__getitem__, pool.v_buffer.__getitem__
    bound_cache(SimpleNamespace(kv_pool=pool, req_to_token_pool=SimpleNamespace(req_to_token=req_to_token),
                                store=store, capture=SimpleNamespace(rows_to_record=lambda *args: 0),
                                repetitions={}))
    path = CompressedPrefixPath(SimpleNamespace(forward_extend=None, forward_decode=None), use_kernels=False)
    forward_batch = Batch(req_pool_indices=torch.tensor([0]), rids=["r"], extend_prefix_lens_cpu=[20],
                          extend_seq_lens_cpu=[3], out_cache_loc=torch.arange(40, 43))
    layer = attention_layer(0)
    path.forward_extend(torch.randn(3, KV_HEADS * GROUP * DIM), None, None, layer, forward_batch,
                        save_kv_cache=False)
    held_batch, held_entry = weakref.ref(forward_batch), weakref.ref(entry)
    store.remove(entry.entry_id)  # evicted while the batch ran: only the path's state still refers to it
    del forward_batch, entry
    assert held_batch() is None and held_entry() is None
