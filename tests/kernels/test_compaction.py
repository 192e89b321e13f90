"""Compaction: kept rows land in their store cells, nothing else is written; the server's
compression path (window statistics, plan, compaction) with the kernels equals it in torch."""

import pytest
import torch

from lava_sglang.kernels import launch
from lava_sglang.kernels.compaction import copy_rows, copy_rows_reference
from lava_sglang.policy import compress_plan, make_policy
from lava_sglang.policy.lava import PAPER_SPEC
from lava_sglang.sglang_plugin.compressor import plan_prefix
from lava_sglang.store import CellLayout, read_layer, slots_needed, write_kept

SENTINEL = -7.0


def _document(num_kv_heads, seq_len, head_dim, dtype, device, num_layers=2, seed=0):
    """Per-layer pool buffers, the document's scattered slots, and kept lists with an empty
    head, a one-row head and lengths that are not multiples of the 32-row block."""
    generator = torch.Generator().manual_seed(seed)
    pool_size = seq_len + 11
    k_buffers = [torch.randn(pool_size, num_kv_heads, head_dim, generator=generator).to(device, dtype)
                 for _ in range(num_layers)]
    v_buffers = [torch.randn(pool_size, num_kv_heads, head_dim, generator=generator).to(device, dtype)
                 for _ in range(num_layers)]
    slots = torch.randperm(pool_size, generator=generator)[:seq_len].to(device)
    lengths = [0, 1, seq_len, 33, 70, 5, 40, 64]
    kept = [[torch.randperm(seq_len, generator=generator)[:lengths[(layer * 3 + head) % len(lengths)]].sort().values
             for head in range(num_kv_heads)] for layer in range(num_layers)]
    return k_buffers, v_buffers, slots, kept


def _layout_after(k_buffers, slots, kept, seed=1):
    """A layout over pool slots the document does not use (as the store borrows them), in
    scattered order, with enough cells for the kept rows; its slots on the buffers' device, as
    SGLang's allocator gives them."""
    kept_lengths = torch.tensor([[len(positions) for positions in heads] for heads in kept])
    pool_size = k_buffers[0].shape[0]
    free = torch.ones(pool_size, dtype=torch.bool)
    free[slots.cpu()] = False
    free_slots = free.nonzero().flatten()
    generator = torch.Generator().manual_seed(seed)
    needed = slots_needed(int(kept_lengths.sum()), *kept_lengths.shape)
    chosen = free_slots[torch.randperm(free_slots.numel(), generator=generator)[:needed]]
    return CellLayout(chosen.to(k_buffers[0].device), kept_lengths)


def _extended(k_buffers, v_buffers, extra_slots):
    """The buffers with `extra_slots` more slots filled with SENTINEL (room for the store)."""
    def extend(buffer):
        return torch.cat([buffer, torch.full((extra_slots, *buffer.shape[1:]), SENTINEL, dtype=buffer.dtype,
                                             device=buffer.device)])
    return [extend(buffer) for buffer in k_buffers], [extend(buffer) for buffer in v_buffers]


def _stores(num_cells, head_dim, dtype, device):
    return [torch.full((num_cells, 1, head_dim), SENTINEL, dtype=dtype, device=device) for _ in range(2)]


@pytest.mark.parametrize("use_kernel", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("num_kv_heads", "head_dim"), [(1, 64), (3, 128), (8, 64), (2, 80)])
def test_kept_rows_land_in_their_cells(device, num_kv_heads, head_dim, dtype, use_kernel):
    k_buffers, v_buffers, slots, kept = _document(num_kv_heads, 90, head_dim, dtype, device)
    # 40 sentinel slots after the document's pool: the store's cells, spread over both layer
    # buffers when a layer's rows do not fit one.
    k_buffers, v_buffers = _extended(k_buffers, v_buffers, 40)
    layout = _layout_after(k_buffers, slots, kept)
    before = [buffer.clone() for buffer in k_buffers + v_buffers]
    write_kept(layout, kept, k_buffers, v_buffers, slots, use_kernel=use_kernel)

    written = [torch.zeros(buffer.shape[:2], dtype=torch.bool) for buffer in k_buffers]
    for layer, heads in enumerate(kept):
        keys, values = read_layer(layout, layer, k_buffers, v_buffers)
        # A copy: bit-exact in every dtype, in (head, position) order.
        assert torch.equal(keys, torch.cat([k_buffers[layer][slots[p.to(device)], head]
                                            for head, p in enumerate(heads)]))
        assert torch.equal(values, torch.cat([v_buffers[layer][slots[p.to(device)], head]
                                              for head, p in enumerate(heads)]))
        for buffer, cells in layout.layer_cells(layer):
            written[buffer].view(-1)[cells.cpu()] = True
    for index, buffer in enumerate(k_buffers + v_buffers):
        untouched = ~written[index % len(k_buffers)].to(device)
        assert torch.equal(buffer[untouched], before[index][untouched])


def test_a_layout_that_does_not_match_the_kept_lists_raises(device):
    k_buffers, v_buffers, slots, kept = _document(2, 30, 64, torch.float32, device, num_layers=1)
    k_buffers, v_buffers = _extended(k_buffers, v_buffers, 40)
    layout = _layout_after(k_buffers, slots, kept)
    with pytest.raises(ValueError, match="rows per head"):
        write_kept(layout, [[kept[0][0], kept[0][1][:-1]]], k_buffers, v_buffers, slots)
    with pytest.raises(ValueError, match="rows per head"):
        write_kept(layout, [kept[0][:1]], k_buffers, v_buffers, slots)


def test_a_grid_beyond_the_devices_limit_is_refused_before_launch(device, monkeypatch):
    monkeypatch.setattr(launch, "GRID_LIMITS", (1, 65535, 65535))  # one program
    k_buffers, v_buffers, slots, kept = _document(3, 50, 64, torch.float32, device, num_layers=1)
    rows = torch.arange(100, device=device)
    with pytest.raises(ValueError, match="along the grid's x axis"):
        copy_rows(k_buffers[0], v_buffers[0], *_stores(100, 64, torch.float32, device), slots[rows % 50],
                  rows % 3, rows)


def test_kernel_matches_torch_reference(device):
    k_buffers, v_buffers, slots, kept = _document(3, 50, 64, torch.float32, device, num_layers=1)
    positions = torch.cat(kept[0]).to(device)
    src_heads = torch.repeat_interleave(torch.arange(3), torch.tensor([len(p) for p in kept[0]])).to(device)
    num_rows = positions.numel()
    dst_cells = torch.randperm(num_rows + 9, generator=torch.Generator().manual_seed(2))[:num_rows].to(device)
    expected = _stores(num_rows + 9, 64, torch.float32, device)
    actual = _stores(num_rows + 9, 64, torch.float32, device)
    copy_rows_reference(k_buffers[0], v_buffers[0], *expected, slots[positions], src_heads, dst_cells)
    copy_rows(k_buffers[0], v_buffers[0], *actual, slots[positions], src_heads, dst_cells)
    assert torch.equal(actual[0], expected[0]) and torch.equal(actual[1], expected[1])
    assert int(actual[0][:, 0].ne(SENTINEL).all(dim=1).sum()) == num_rows  # the copy did happen


@pytest.mark.parametrize("policy_spec", [PAPER_SPEC, "snapkv", "lava"])
def test_server_compression_with_kernels_equals_torch(device, policy_spec, monkeypatch):
    # The server's path (plan_prefix, then write_kept) with the window-statistics and
    # compaction kernels gives the plan compress_plan makes on the gathered tensors, and the
    # store holds exactly the planned rows.
    from lava_sglang.kernels import compaction, window_stats

    launches = {"window_statistics": 0, "copy_rows": 0}

    def counted(module, name):
        kernel = getattr(module, name)

        def call(*args, **kwargs):
            launches[name] += 1
            return kernel(*args, **kwargs)
        monkeypatch.setattr(module, name, call)

    counted(window_stats, "window_statistics")
    counted(compaction, "copy_rows")
    num_layers, num_kv_heads, group, window, seq_len, head_dim = 3, 2, 3, 8, 75, 64
    generator = torch.Generator().manual_seed(5)
    pool_size = seq_len + 60
    slots = torch.randperm(seq_len + 20, generator=generator)[:seq_len].to(device)
    q = [torch.randn(num_kv_heads * group, window, head_dim, generator=generator).to(device)
         for _ in range(num_layers)]
    k_buffers = [torch.randn(pool_size, num_kv_heads, head_dim, generator=generator).to(device)
                 for _ in range(num_layers)]
    v_buffers = [torch.randn(pool_size, num_kv_heads, head_dim, generator=generator).to(device)
                 for _ in range(num_layers)]
    policy = make_policy(policy_spec, window=window)
    kept = plan_prefix(policy, 0.3, q, k_buffers, v_buffers, slots, keep_len=seq_len, use_kernel=True)
    expected = compress_plan(policy, q, [k[slots].transpose(0, 1) for k in k_buffers],
                             [v[slots].transpose(0, 1) for v in v_buffers], 0.3)
    assert all(torch.equal(ours, theirs)
               for layer_ours, layer_theirs in zip(kept, expected.kept)
               for ours, theirs in zip(layer_ours, layer_theirs))

    layout = _layout_after(k_buffers, slots, kept)
    write_kept(layout, kept, k_buffers, v_buffers, slots, use_kernel=True)
    for layer in range(num_layers):
        keys, _ = read_layer(layout, layer, k_buffers, v_buffers)
        assert torch.equal(keys, torch.cat([k_buffers[layer][slots[positions.to(device)], head]
                                            for head, positions in enumerate(kept[layer])]))
    assert launches["window_statistics"] == num_layers
    assert launches["copy_rows"] >= num_layers  # one per layer and buffer piece


def test_bad_inputs_raise(device):  # on the GPU too: inputs on the device the kernels run on
    k_buffers, v_buffers, _, _ = _document(2, 30, 64, torch.float32, device, num_layers=1)
    rows = torch.arange(4, device=device)
    heads = torch.zeros(4, dtype=torch.int32, device=device)
    k_store, v_store = _stores(8, 64, torch.float32, device)
    with pytest.raises(ValueError, match="one length"):
        copy_rows(k_buffers[0], v_buffers[0], k_store, v_store, rows, heads[:3], rows)
    with pytest.raises(ValueError, match=r"\[cells, 1, d=64\]"):
        copy_rows(k_buffers[0], v_buffers[0], k_store.view(-1, 2, 32), v_store.view(-1, 2, 32), rows, heads, rows)
    with pytest.raises(ValueError, match="one dtype"):
        copy_rows(k_buffers[0], v_buffers[0], k_store.bfloat16(), v_store.bfloat16(), rows, heads, rows)
    with pytest.raises(ValueError, match="one shape"):
        copy_rows(k_buffers[0], v_buffers[0][:-1], k_store, v_store, rows, heads, rows)
    # The kernel reads V through K's strides, and indices by offset.
    wide = torch.zeros(16, 1, 64, device=device)[::2]
    with pytest.raises(ValueError, match="v_buffer and v_store must have k_buffer's and k_store's strides"):
        copy_rows(k_buffers[0], v_buffers[0], k_store, wide, rows, heads, rows)
    with pytest.raises(ValueError, match="src_slots must be contiguous"):
        copy_rows(k_buffers[0], v_buffers[0], k_store, v_store, torch.arange(8, device=device)[::2], heads, rows)
