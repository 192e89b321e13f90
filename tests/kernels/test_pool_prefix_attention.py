"""PoolPrefixAttention: compressed prefixes read in place from the pool through the store's
fixed-size layout tables, against the torch reference and dense attention over each
(layer, KV head)'s kept rows; entries added and removed between calls."""

import math

import pytest
import torch

from lava_sglang.kernels import launch
from lava_sglang.kernels.attention_states import attention_with_lse
from lava_sglang.kernels.pool_prefix_attention import (PoolPrefixAttention, _row_alignment, default_block_keys,
                                                       pool_prefix_attention_reference)
from lava_sglang.kernels.prefix_attention import MAX_SPLITS
from lava_sglang.store import CellLayout, LayoutTables, read_layer, slots_needed
from store_support import write_layer

LAYERS, KV_HEADS, GROUP, DIM, POOL = 3, 2, 3, 32, 96
SCALING = 1.0 / math.sqrt(DIM)
# Programs to aim at, high enough that these small batches always take max_splits chunks
# (the default fills a GPU's SMs, and is 1 under the CPU interpreter).
MANY_PROGRAMS = 1 << 16


class Pool:
    """Layer buffers, a slot allocator and the layout tables, as the server holds them."""

    def __init__(self, device, dtype=torch.float32, seed=0, slots=POOL, dim=DIM):
        generator = torch.Generator().manual_seed(seed)
        self.k_buffers = [torch.randn(slots, KV_HEADS, dim, generator=generator).to(device, dtype)
                          for _ in range(LAYERS)]
        self.v_buffers = [torch.randn(slots, KV_HEADS, dim, generator=generator).to(device, dtype)
                          for _ in range(LAYERS)]
        self.dim = dim
        self.free = list(torch.randperm(slots, generator=generator).tolist())
        self.tables = LayoutTables(max_entries=4, pool_slots=slots, num_layers=LAYERS, num_kv_heads=KV_HEADS,
                                   device=device)
        self.generator = generator

    def add(self, kept_lengths):
        kept = torch.tensor(kept_lengths, dtype=torch.int64)
        count = slots_needed(int(kept.sum()), LAYERS, KV_HEADS)
        slots, self.free = torch.tensor(self.free[:count], dtype=torch.int64), self.free[count:]
        layout = CellLayout(slots, kept)
        for layer in range(LAYERS):
            rows = int(kept[layer].sum())
            keys = torch.randn(rows, self.dim, generator=self.generator)
            write_layer(layout, layer, self.k_buffers, self.v_buffers, keys, -0.5 * keys + 0.1)
        return self.tables.add(layout, prefix_len=100), layout

    def remove(self, row, layout):
        self.tables.remove(row)
        self.free.extend(layout.slots.tolist())


def dense(q, qo, layouts, pool, layer, sm_scale=SCALING):
    """Per request and KV head, plain attention over the kept rows read back by `read_layer`."""
    out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    lse = torch.full(q.shape[:2], float("-inf"), device=q.device)
    for request, layout in enumerate(layouts):
        if layout is None:
            continue
        keys, values = read_layer(layout, layer, pool.k_buffers, pool.v_buffers)
        indptr = layout.layer_head_indptr(layer).tolist()
        tokens = slice(qo[request], qo[request + 1])
        for head in range(KV_HEADS):
            if indptr[head + 1] == indptr[head]:
                continue
            rows = slice(indptr[head], indptr[head + 1])
            heads = slice(head * GROUP, (head + 1) * GROUP)
            state = attention_with_lse(q[tokens, heads].transpose(0, 1)[None, None].float(),
                                       keys[rows][None, None].float(), values[rows][None, None].float(),
                                       torch.ones(1, dtype=torch.bool, device=q.device), sm_scale)
            out[tokens, heads] = state[0][0, 0].transpose(0, 1)
            lse[tokens, heads] = state[1][0, 0].transpose(0, 1)
    return out, lse


# The defaults, and 16-key blocks without pipelining (a 70-row head is then five blocks, cut
# over the splits at block boundaries).
LAUNCH_OPTIONS = [{}, dict(block_keys=16, num_warps=4, num_stages=1)]


@pytest.mark.parametrize("options", LAUNCH_OPTIONS, ids=["defaults", "keys16"])
@pytest.mark.parametrize("max_splits", [1, 4])
# "long": 75 query rows in one request's head (25 tokens x the group of 3) take two 64-row
# tiles; the short requests have no rows in the second tile.
@pytest.mark.parametrize("extend_lens", [[1, 1, 1, 1, 1], [3, 1, 4, 2, 1], [25, 1, 3, 25, 2]],
                         ids=["decode", "extend", "long"])
def test_pool_prefix_attention_matches_dense_and_reference(device, extend_lens, max_splits, options):
    pool = Pool(device)
    # One head keeps nothing in layer 1; with 16-key blocks, lengths past one block and over
    # several splits.
    first_row, first = pool.add([[5, 70], [0, 12], [7, 3]])
    second_row, second = pool.add([[2, 2], [40, 1], [1, 66]])
    rows = [first_row, -1, second_row, first_row, second_row]
    layouts = [first, None, second, first, second]
    qo = [0]
    for extend in extend_lens:
        qo.append(qo[-1] + extend)
    qo_indptr = torch.tensor(qo, dtype=torch.int32, device=device)
    entry_of_request = torch.tensor(rows, dtype=torch.int32, device=device)
    # Every row is read whatever the split count: max_splits 1 reads the 70-row heads in one
    # chunk; 4 cuts them in chunks of whole key blocks (with 16-key blocks, 32 keys each) and
    # leaves chunks empty.
    attention = PoolPrefixAttention(pool.k_buffers, pool.v_buffers, num_q_heads=KV_HEADS * GROUP,
                                    max_splits=max_splits, target_programs=MANY_PROGRAMS, sm_scale=SCALING,
                                    **options)
    attention.plan(qo_indptr, entry_of_request, pool.tables.tables, num_tokens=qo[-1], max_q_len=max(extend_lens))
    generator = torch.Generator().manual_seed(3)
    for layer in range(LAYERS):  # one plan, every layer
        q = torch.randn(qo[-1], KV_HEADS * GROUP, DIM, generator=generator).to(device)
        out, lse = attention.run(q, layer=layer)
        expected_out, expected_lse = dense(q, qo, layouts, pool, layer)
        torch.testing.assert_close(lse, expected_lse, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(out.float(), expected_out, atol=1e-4, rtol=1e-4)
        reference_out, reference_lse = pool_prefix_attention_reference(
            q, qo_indptr, entry_of_request, pool.tables.tables, pool.k_buffers, pool.v_buffers, layer=layer,
            num_kv_heads=KV_HEADS, sm_scale=SCALING)
        torch.testing.assert_close(lse, reference_lse, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(out.float(), reference_out, atol=1e-4, rtol=1e-4)
        no_entry = slice(qo[1], qo[2])
        assert torch.isneginf(lse[no_entry]).all() and (out[no_entry] == 0).all()


def test_the_models_softmax_scale_is_the_one_applied(device):
    # The server passes each layer's own scaling; 1/sqrt(d) is only the default.
    pool = Pool(device)
    row, layout = pool.add([[5, 9], [3, 12], [7, 3]])
    qo_indptr = torch.tensor([0, 2], dtype=torch.int32, device=device)
    entry_of_request = torch.tensor([row], dtype=torch.int32, device=device)
    q = torch.randn(2, KV_HEADS * GROUP, DIM, generator=torch.Generator().manual_seed(5)).to(device)
    outputs = []
    for sm_scale in (SCALING / 4, SCALING * 3):
        attention = PoolPrefixAttention(pool.k_buffers, pool.v_buffers, num_q_heads=KV_HEADS * GROUP,
                                        target_programs=MANY_PROGRAMS, sm_scale=sm_scale)
        attention.plan(qo_indptr, entry_of_request, pool.tables.tables, num_tokens=2, max_q_len=2)
        out, lse = attention.run(q, layer=1)
        expected_out, expected_lse = dense(q, [0, 2], [layout], pool, 1, sm_scale)
        torch.testing.assert_close(lse, expected_lse, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(out.float(), expected_out, atol=1e-4, rtol=1e-4)
        reference_out, reference_lse = pool_prefix_attention_reference(
            q, qo_indptr, entry_of_request, pool.tables.tables, pool.k_buffers, pool.v_buffers, layer=1,
            num_kv_heads=KV_HEADS, sm_scale=sm_scale)
        torch.testing.assert_close(lse, reference_lse, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(out.float(), reference_out, atol=1e-4, rtol=1e-4)
        outputs.append(out.float())
    assert (outputs[0] - outputs[1]).abs().max() > 0.1  # the scale changes the answer


def test_a_grid_beyond_the_devices_limit_is_refused_before_launch(device, monkeypatch):
    monkeypatch.setattr(launch, "GRID_LIMITS", (1, 65535, 65535))  # one program
    pool = Pool(device)
    row, _ = pool.add([[5, 9], [3, 12], [7, 3]])
    attention = PoolPrefixAttention(pool.k_buffers, pool.v_buffers, num_q_heads=KV_HEADS * GROUP, sm_scale=SCALING)
    attention.plan(torch.tensor([0, 1], dtype=torch.int32, device=device),
                   torch.tensor([row], dtype=torch.int32, device=device), pool.tables.tables, num_tokens=1,
                   max_q_len=1)
    with pytest.raises(ValueError, match="along the grid's x axis"):
        attention.run(torch.randn(1, KV_HEADS * GROUP, DIM).to(device), layer=0)


def test_default_launch_reads_long_heads_over_several_blocks_and_chunks(device):
    # With the default 128-key blocks: a 300-row head is three blocks, cut by 4 splits into
    # chunks of one block (the third partial, the fourth empty); 260 rows end four past two.
    pool = Pool(device, slots=160)
    row, layout = pool.add([[300, 5], [140, 260], [1, 129]])
    attention = PoolPrefixAttention(pool.k_buffers, pool.v_buffers, num_q_heads=KV_HEADS * GROUP, max_splits=4,
                                    target_programs=MANY_PROGRAMS, sm_scale=SCALING)
    assert attention.block_keys == 128
    qo = [0, 1, 2]
    qo_indptr = torch.tensor(qo, dtype=torch.int32, device=device)
    entry_of_request = torch.tensor([row, row], dtype=torch.int32, device=device)
    attention.plan(qo_indptr, entry_of_request, pool.tables.tables, num_tokens=2, max_q_len=1)
    generator = torch.Generator().manual_seed(5)
    for layer in range(LAYERS):
        q = torch.randn(2, KV_HEADS * GROUP, DIM, generator=generator).to(device)
        out, lse = attention.run(q, layer=layer)
        expected_out, expected_lse = dense(q, qo, [layout, layout], pool, layer)
        torch.testing.assert_close(lse, expected_lse, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(out.float(), expected_out, atol=1e-4, rtol=1e-4)


def test_default_key_block_keeps_a_tile_within_128_by_128_elements():
    assert [default_block_keys(dim) for dim in (64, 128, 192, 256, 512)] == [128, 128, 64, 64, 32]


def test_entries_come_and_go_without_touching_the_kernel_or_its_grid(device):
    # The same attention object (as a captured graph holds it) serves after entries are removed
    # and others take their table rows and slots.
    pool = Pool(device, seed=1)
    pool.tables = LayoutTables(max_entries=3, pool_slots=POOL, num_layers=LAYERS, num_kv_heads=KV_HEADS,
                               device=device)
    attention = PoolPrefixAttention(pool.k_buffers, pool.v_buffers, num_q_heads=KV_HEADS * GROUP, max_splits=2,
                                    target_programs=MANY_PROGRAMS, sm_scale=SCALING)
    live = [pool.add([[4, 9], [3, 3], [8, 1]]), pool.add([[20, 2], [5, 6], [1, 1]]),
            pool.add([[1, 1], [2, 2], [3, 3]])]
    one_token = CellLayout(torch.tensor([0]), torch.ones(LAYERS, KV_HEADS, dtype=torch.int64))
    assert pool.tables.add(one_token, prefix_len=1) is None
    generator = torch.Generator().manual_seed(4)
    for step in range(4):
        removed_row, removed_layout = live.pop(step % len(live))
        pool.remove(removed_row, removed_layout)
        live.append(pool.add([[6 + step, 30 - step], [2, 9], [step + 1, 4]]))
        entry_of_request = torch.tensor([row for row, _ in live] + [-1], dtype=torch.int32, device=device)
        qo_indptr = torch.arange(len(live) + 2, dtype=torch.int32, device=device)
        q = torch.randn(len(live) + 1, KV_HEADS * GROUP, DIM, generator=generator).to(device)
        attention.plan(qo_indptr, entry_of_request, pool.tables.tables, num_tokens=len(live) + 1, max_q_len=1)
        out, lse = attention.run(q, layer=2)
        expected_out, expected_lse = dense(q, qo_indptr.tolist(), [layout for _, layout in live] + [None], pool, 2)
        torch.testing.assert_close(lse, expected_lse, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(out.float(), expected_out, atol=1e-4, rtol=1e-4)
    first_slots = torch.stack([layout.slots[0] for _, layout in live]).to(device)
    assert pool.tables.rows_for_slots(first_slots).tolist() == [row for row, _ in live]


# 40: a head dim that is not a power of two, the tail of a 64-wide block masked. One split
# (written in place, in the pool's dtype) or several (fp32 partials merged); 16-key blocks so
# that the 9-row head spans two chunks.
@pytest.mark.parametrize("target_programs", [1, MANY_PROGRAMS], ids=["one_split", "splits"])
@pytest.mark.parametrize("dtype, dim", [(torch.bfloat16, DIM), (torch.float16, 40)])
def test_half_precision_pool(device, dtype, dim, target_programs):
    pool = Pool(device, dtype=dtype, seed=2, dim=dim)
    row, layout = pool.add([[9, 3], [4, 4], [2, 7]])
    attention = PoolPrefixAttention(pool.k_buffers, pool.v_buffers, num_q_heads=KV_HEADS * GROUP,
                                    target_programs=target_programs, block_keys=16, sm_scale=SCALING)
    assert attention.splits(1) == (1 if target_programs == 1 else attention.max_splits)
    q = torch.randn(2, KV_HEADS * GROUP, dim, generator=torch.Generator().manual_seed(5)).to(device, dtype)
    qo_indptr = torch.tensor([0, 2], dtype=torch.int32, device=device)
    attention.plan(qo_indptr, torch.tensor([row], dtype=torch.int32, device=device), pool.tables.tables,
                   num_tokens=2, max_q_len=2)
    out, lse = attention.run(q, layer=0)
    expected_out, expected_lse = dense(q, [0, 2], [layout], pool, 0)
    torch.testing.assert_close(lse, expected_lse, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(out.float(), expected_out, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("dtype, start, row_align", [(torch.bfloat16, 0, 8), (torch.bfloat16, 1, 1),
                                                      (torch.bfloat16, 2, 2), (torch.float32, 0, 4)])
def test_rows_are_read_in_vectors_only_where_aligned(device, dtype, start, row_align):
    # The kernel promises the compiler rows aligned to ROW_ALIGN elements from the first
    # buffer: 16-byte vectors for buffers of their own, less for layer buffers carved from
    # one storage `start` elements apart. The first buffer stays aligned, so on the GPU a
    # promise too large vectorises misaligned rows of the later layers: wrong rows or a fault.
    pool = Pool(device, dtype=dtype, seed=7)
    layer_size = POOL * KV_HEADS * DIM
    for buffers in (pool.k_buffers, pool.v_buffers):
        storage = torch.empty(LAYERS * (layer_size + start), dtype=dtype, device=device)
        for layer, buffer in enumerate(buffers):
            offset = layer * (layer_size + start)
            carved = storage[offset:offset + layer_size].view(POOL, KV_HEADS, DIM)
            carved.copy_(buffer)
            buffers[layer] = carved
    row, layout = pool.add([[9, 70], [4, 4], [66, 7]])
    attention = PoolPrefixAttention(pool.k_buffers, pool.v_buffers, num_q_heads=KV_HEADS * GROUP, max_splits=2,
                                    target_programs=MANY_PROGRAMS, sm_scale=SCALING)
    assert attention.row_align == row_align
    q = torch.randn(1, KV_HEADS * GROUP, DIM, generator=torch.Generator().manual_seed(8)).to(device, dtype)
    qo_indptr = torch.tensor([0, 1], dtype=torch.int32, device=device)
    tolerance = 2e-2 if dtype == torch.bfloat16 else 1e-4
    attention.plan(qo_indptr, torch.tensor([row], dtype=torch.int32, device=device), pool.tables.tables,
                   num_tokens=1, max_q_len=1)
    for layer in range(LAYERS):
        out, lse = attention.run(q, layer=layer)
        expected_out, expected_lse = dense(q, [0, 1], [layout], pool, layer)
        torch.testing.assert_close(lse, expected_lse, atol=tolerance, rtol=tolerance)
        torch.testing.assert_close(out.float(), expected_out, atol=tolerance, rtol=tolerance)


def test_row_alignment_counts_the_row_length_and_every_offset():
    # In elements: up to 8 for 2-byte types (16 bytes), 4 for fp32; a row length or a
    # buffer offset that is not a multiple lowers it.
    assert _row_alignment([0, 6144, -4096], head_dim=128, element_size=2) == 8
    assert _row_alignment([0, 6144], head_dim=40, element_size=2) == 8
    assert _row_alignment([0, 6144], head_dim=36, element_size=2) == 4
    assert _row_alignment([0, 6144], head_dim=128, element_size=4) == 4
    assert _row_alignment([0, 6146], head_dim=128, element_size=2) == 2
    assert _row_alignment([0, 6147], head_dim=128, element_size=2) == 1
    assert _row_alignment([0], head_dim=33, element_size=2) == 1


def test_bad_inputs_raise(device):
    pool = Pool(device)
    row, _ = pool.add([[2, 2], [2, 2], [2, 2]])
    attention = PoolPrefixAttention(pool.k_buffers, pool.v_buffers, num_q_heads=KV_HEADS * GROUP)
    q = torch.randn(1, KV_HEADS * GROUP, DIM, device=device)
    qo_indptr = torch.tensor([0, 1], dtype=torch.int32, device=device)
    rows = torch.tensor([row], dtype=torch.int32, device=device)
    tables = pool.tables.tables
    with pytest.raises(ValueError, match="call plan"):
        attention.run(q, layer=0)
    with pytest.raises(ValueError, match="B \\+ 1 = 2"):
        attention.plan(qo_indptr[:1], rows, tables, num_tokens=1, max_q_len=1)
    with pytest.raises(ValueError, match="for no request"):
        attention.plan(qo_indptr[:1], rows[:0], tables, num_tokens=1, max_q_len=1)
    with pytest.raises(ValueError, match="L \\* Hkv \\+ 1"):
        attention.plan(qo_indptr, rows, (tables[0][:, :-1].contiguous(), *tables[1:]), num_tokens=1, max_q_len=1)
    with pytest.raises(ValueError, match="head_offsets must be contiguous"):  # the kernel reads it by offset
        attention.plan(qo_indptr, rows, (tables[0][:, :-1], *tables[1:]), num_tokens=1, max_q_len=1)
    for bad in (dict(num_tokens=-1, max_q_len=1), dict(num_tokens=1, max_q_len=0)):
        with pytest.raises(ValueError, match="num_tokens|max_q_len"):
            attention.plan(qo_indptr, rows, tables, **bad)
    # Index values the kernels would trust: rows never computed, or reads and writes out of bounds.
    two_tokens = torch.tensor([0, 2], dtype=torch.int32, device=device)
    with pytest.raises(ValueError, match="max_q_len=1 is below a request's 2"):
        attention.plan(two_tokens, rows, tables, num_tokens=2, max_q_len=1)
    for num_tokens in (1, 3):
        with pytest.raises(ValueError, match=f"end at num_tokens={num_tokens}"):
            attention.plan(two_tokens, rows, tables, num_tokens=num_tokens, max_q_len=2)
    with pytest.raises(ValueError, match="start at 0"):
        attention.plan(two_tokens + 1, rows, tables, num_tokens=3, max_q_len=2)
    for entry in (tables[0].shape[0], -2):
        with pytest.raises(ValueError, match="entry_of_request must hold table rows"):
            attention.plan(qo_indptr, torch.tensor([entry], dtype=torch.int32, device=device), tables,
                           num_tokens=1, max_q_len=1)
    attention.plan(qo_indptr, rows, tables, num_tokens=1, max_q_len=1)
    with pytest.raises(ValueError, match="pool's dtype"):
        attention.run(q.bfloat16(), layer=0)
    with pytest.raises(ValueError, match="tokens from the plan"):
        attention.run(torch.cat([q, q]), layer=0)
    with pytest.raises(ValueError, match="layer must be"):
        attention.run(q, layer=LAYERS)
    with pytest.raises(ValueError, match="one shape and dtype|k_buffers\\[0\\] is"):
        PoolPrefixAttention(pool.k_buffers, [buffer[:-1] for buffer in pool.v_buffers], num_q_heads=6)
    with pytest.raises(ValueError, match="max_splits"):
        PoolPrefixAttention(pool.k_buffers, pool.v_buffers, num_q_heads=6, max_splits=0)
    with pytest.raises(ValueError, match=f"max_splits must be at most {MAX_SPLITS}"):
        PoolPrefixAttention(pool.k_buffers, pool.v_buffers, num_q_heads=6, max_splits=MAX_SPLITS + 1)
    with pytest.raises(ValueError, match="target_programs"):
        PoolPrefixAttention(pool.k_buffers, pool.v_buffers, num_q_heads=6, target_programs=0)
    for block_keys in (8, 48):
        with pytest.raises(ValueError, match="power of two >= 16"):
            PoolPrefixAttention(pool.k_buffers, pool.v_buffers, num_q_heads=6, block_keys=block_keys)
    with pytest.raises(ValueError, match="num_stages"):
        PoolPrefixAttention(pool.k_buffers, pool.v_buffers, num_q_heads=6, num_stages=0)
    with pytest.raises(ValueError, match="num_warps must be a power of two"):
        PoolPrefixAttention(pool.k_buffers, pool.v_buffers, num_q_heads=6, num_warps=6)


def test_split_count_fills_the_target_from_the_batch_size():
    # Few requests: many chunks each, up to max_splits; many requests: the batch alone fills
    # the device, one long chunk each.
    pool = Pool("cpu")
    attention = PoolPrefixAttention(pool.k_buffers, pool.v_buffers, num_q_heads=KV_HEADS * GROUP, max_splits=4,
                                    target_programs=16)
    assert [attention.splits(requests) for requests in (1, 2, 3, 4, 8, 100)] == [4, 4, 3, 2, 1, 1]
    assert attention.splits(2, row_tiles=4) == 1


def test_cuda_graph_replay_follows_batches_and_entries(cuda_only):
    # The decode step's prefix part as a graph-captured server would run it: each request's
    # table row looked up on the device from the first slot of its KV row, then a layer loop.
    # Captured once; replayed after the batch's queries and requests change and after entries
    # are evicted and others compressed (tables updated in place); every replay equals eager.
    device = cuda_only
    pool = Pool(device, dtype=torch.bfloat16, seed=6)
    live = [pool.add([[12, 3], [5, 40], [7, 7]]), pool.add([[2, 9], [1, 1], [30, 4]])]
    attention = PoolPrefixAttention(pool.k_buffers, pool.v_buffers, num_q_heads=KV_HEADS * GROUP, max_splits=2,
                                    target_programs=MANY_PROGRAMS, sm_scale=SCALING)
    batch = 4
    first_slots = torch.zeros(batch, dtype=torch.int64, device=device)  # static inputs of the graph
    queries = torch.zeros(batch, KV_HEADS * GROUP, DIM, dtype=torch.bfloat16, device=device)
    qo_indptr = torch.arange(batch + 1, dtype=torch.int32, device=device)
    no_entry_slot = POOL - 1  # never handed to an entry by Pool.add below (it takes from the front)
    pool.free.remove(no_entry_slot)

    def step():
        rows = pool.tables.rows_for_slots(first_slots)
        attention.plan(qo_indptr, rows, pool.tables.tables, num_tokens=batch, max_q_len=1)
        return [attention.run(queries, layer=layer) for layer in range(LAYERS)]

    def load_batch(layouts, seed):
        slots = [layout.slots[0] if layout is not None else no_entry_slot for layout in layouts]
        first_slots.copy_(torch.tensor(slots, device=device))
        queries.copy_(torch.randn(queries.shape, generator=torch.Generator().manual_seed(seed)).to(queries))

    load_batch([live[0][1], None, live[1][1], live[0][1]], seed=0)
    step()  # compile the kernels before capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()

    def check(layouts):
        graph.replay()
        eager = step()
        for layer, ((graph_out, graph_lse), (eager_out, eager_lse)) in enumerate(zip(captured, eager)):
            torch.testing.assert_close(graph_lse, eager_lse, atol=0, rtol=0)
            torch.testing.assert_close(graph_out, eager_out, atol=0, rtol=0)
            expected_out, expected_lse = dense(queries, list(range(batch + 1)), layouts, pool, layer)
            torch.testing.assert_close(graph_lse, expected_lse, atol=2e-2, rtol=2e-2)
            torch.testing.assert_close(graph_out.float(), expected_out, atol=2e-2, rtol=2e-2)

    layouts = [live[0][1], None, live[1][1], live[0][1]]
    check(layouts)
    layouts = [live[1][1], live[1][1], None, live[0][1]]
    load_batch(layouts, seed=1)
    check(layouts)
    pool.remove(*live.pop(0))  # evicted ...
    live.append(pool.add([[20, 20], [3, 64], [1, 2]]))  # ... and another compressed, in place
    layouts = [live[1][1], live[0][1], live[1][1], None]
    load_batch(layouts, seed=2)
    check(layouts)


def test_one_split_writes_the_output_in_place_without_a_merge(device, monkeypatch):
    # A batch that fills the device takes one chunk per sequence: no fp32 partials, no second launch.
    import lava_sglang.kernels.pool_prefix_attention as pool_module

    class NoLaunch:
        def __getitem__(self, grid):
            raise AssertionError("the merge kernel was launched for a single split")

    monkeypatch.setattr(pool_module, "_merge_splits_kernel", NoLaunch())
    pool = Pool(device)
    row, layout = pool.add([[5, 9], [3, 12], [7, 3]])
    attention = PoolPrefixAttention(pool.k_buffers, pool.v_buffers, num_q_heads=KV_HEADS * GROUP, target_programs=1,
                                    sm_scale=SCALING)
    qo_indptr = torch.tensor([0, 2, 3], dtype=torch.int32, device=device)
    attention.plan(qo_indptr, torch.tensor([row, -1], dtype=torch.int32, device=device), pool.tables.tables,
                   num_tokens=3, max_q_len=2)
    q = torch.randn(3, KV_HEADS * GROUP, DIM, generator=torch.Generator().manual_seed(6)).to(device)
    out, lse = attention.run(q, layer=1)
    expected_out, expected_lse = dense(q, [0, 2, 3], [layout, None], pool, 1)
    torch.testing.assert_close(lse, expected_lse, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out.float(), expected_out, atol=1e-4, rtol=1e-4)
