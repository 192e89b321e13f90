"""Decode over compressed prefixes vs FlashInfer decode over the full prefixes.

For every document length, batch size and keep ratio: one decode step of one layer. Ours:
`CompressedPrefixAttention` over each (request, KV head)'s kept rows in a flat store (per-head
lengths spread from 0.5x to 1.5x the kept mean, as LAVa's head budgets differ), and
`PoolPrefixAttention` (what the server runs on CUDA) over the same rows read in place from
pool slots through the store's layout tables, eagerly and replayed from a CUDA graph (where
its host overhead is gone: the prefix part of the decode step a graph-captured server would run,
without the own-token attention and the merge that follow it). Baseline: FlashInfer's
BatchDecodeWithPagedKVCacheWrapper over the whole document, page size 1, in SGLang's layout
(tensor cores when the GQA group is >= 4, as SGLang's FlashInfer backend chooses). Printed:
time, ratio to the full-prefix time, bytes read and the achieved HBM bandwidth.

    python kernels/bench_prefix_attention.py                # Llama-3-8B shape, GPU
    python kernels/bench_prefix_attention.py --smoke        # tiny shapes; CPU under the interpreter
"""

from __future__ import annotations

import argparse

import torch

import benchmarking


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--documents", type=int, nargs="+", default=[8192, 32768], help="prefix lengths in tokens")
    parser.add_argument("--keep", type=float, nargs="+", default=[0.1, 0.2, 0.5, 1.0], help="keep ratios")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 16, 64], help="batch sizes")
    parser.add_argument("--heads", type=int, nargs=2, default=[32, 8], metavar=("HQ", "HKV"))
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--peak-gbps", type=float, default=None, help="peak HBM GB/s (default: datasheet table)")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes; runs on the CPU under TRITON_INTERPRET=1")
    args = parser.parse_args()
    if args.smoke:
        args.documents, args.keep, args.batch, args.heads, args.head_dim = [80], [0.5, 1.0], [1, 2], [4, 2], 64
    return args


def head_lengths(document: int, keep: float, batch: int, num_kv_heads: int) -> torch.Tensor:
    """Kept rows per (request, KV head): mean keep * document, spread linearly over the heads
    from 0.5x to 1.5x the mean (less where 1.5x would exceed the document)."""
    amplitude = min(0.5, (1 - keep) / keep)
    spread = torch.linspace(1 - amplitude, 1 + amplitude, num_kv_heads) if num_kv_heads > 1 else torch.ones(1)
    return (spread * keep * document).round().clamp(1, document).long().repeat(batch)


def decode_inputs(lengths: torch.Tensor, batch: int, num_q_heads: int, head_dim: int, device: torch.device):
    """q [B, Hq, d], K/V store [rows, 1, d] and FlashInfer-layout metadata over it."""
    rows = int(lengths.sum())
    q = torch.randn(batch, num_q_heads, head_dim, device=device, dtype=torch.bfloat16)
    k_store = torch.randn(rows, 1, head_dim, device=device, dtype=torch.bfloat16)
    v_store = torch.randn_like(k_store)
    kv_indptr = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)]).to(device, torch.int32)
    kv_indices = torch.arange(rows, device=device, dtype=torch.int32)
    qo_indptr = torch.arange(batch + 1, device=device, dtype=torch.int32)
    return q, k_store, v_store, qo_indptr, kv_indptr, kv_indices


def read_bytes(kv_rows: int, batch: int, num_q_heads: int, head_dim: int) -> int:
    """K and V rows (bf16) and their int32 indices, q and out (bf16), lse (fp32)."""
    return kv_rows * (2 * head_dim * 2 + 4) + batch * num_q_heads * (2 * head_dim * 2 + 4)


def pool_inputs(lengths: torch.Tensor, batch: int, num_kv_heads: int, head_dim: int, device: torch.device):
    """One compressed entry per request in a one-layer pool (rows in scattered slots), the
    store's layout tables over them, and each request's table row."""
    from lava_sglang.store import CellLayout, LayoutTables, slots_needed

    per_request = lengths.view(batch, num_kv_heads)
    counts = [slots_needed(int(kept.sum()), 1, num_kv_heads) for kept in per_request]
    pool_slots = sum(counts) + 1
    k_buffer = torch.randn(pool_slots, num_kv_heads, head_dim, device=device, dtype=torch.bfloat16)
    v_buffer = torch.randn_like(k_buffer)
    tables = LayoutTables(max_entries=batch, pool_slots=pool_slots, num_layers=1, num_kv_heads=num_kv_heads,
                          device=device)
    slots = torch.randperm(pool_slots - 1) + 1
    rows, start = [], 0
    for kept, count in zip(per_request, counts):
        rows.append(tables.add(CellLayout(slots[start:start + count].clone(), kept[None]), prefix_len=int(kept.max())))
        start += count
    return k_buffer, v_buffer, tables, torch.tensor(rows, dtype=torch.int32, device=device)


def replayed_ms(fn, device: torch.device) -> float | None:
    """fn's time replayed from a CUDA graph; None off the GPU or where fn cannot be captured."""
    try:
        replay = benchmarking.graph_replay(fn, device)
    except RuntimeError as error:
        print(f"note: not captured in a CUDA graph: {error}")
        return None
    return benchmarking.time_ms(replay, device) if replay is not None else None


def full_prefix_baseline(document: int, batch: int, num_q_heads: int, num_kv_heads: int, head_dim: int,
                         device: torch.device):
    """A callable running decode over the full prefixes, and its name: FlashInfer on the GPU,
    torch's SDPA there when FlashInfer is not installed, the torch dense reference on the CPU
    (FlashInfer needs CUDA)."""
    if device.type != "cuda":
        from lava_sglang.kernels import prefix_attention_reference

        lengths = torch.full((batch * num_kv_heads,), document)
        q, k_store, v_store, qo_indptr, kv_indptr, kv_indices = decode_inputs(
            lengths, batch, num_q_heads, head_dim, device)
        return (lambda: prefix_attention_reference(q, k_store, v_store, qo_indptr, kv_indptr, kv_indices,
                                                   num_kv_heads=num_kv_heads)), "torch dense reference"
    try:
        import flashinfer
    except ImportError:
        q = torch.randn(batch, num_q_heads, 1, head_dim, device=device, dtype=torch.bfloat16)
        keys = torch.randn(batch, num_kv_heads, document, head_dim, device=device, dtype=torch.bfloat16)
        values = torch.randn_like(keys)
        return (lambda: torch.nn.functional.scaled_dot_product_attention(q, keys, values, enable_gqa=True)), \
            "torch SDPA, full prefix (FlashInfer not installed)"

    pool = batch * document
    k_buffer = torch.randn(pool, 1, num_kv_heads, head_dim, device=device, dtype=torch.bfloat16)
    v_buffer = torch.randn_like(k_buffer)
    workspace = torch.zeros(128 * 1024 * 1024, dtype=torch.uint8, device=device)
    wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
        workspace, "NHD", use_tensor_cores=num_q_heads // num_kv_heads >= 4)
    wrapper.plan(torch.arange(batch + 1, device=device, dtype=torch.int32) * document,
                 torch.arange(pool, device=device, dtype=torch.int32),
                 torch.ones(batch, device=device, dtype=torch.int32),
                 num_q_heads, num_kv_heads, head_dim, 1, q_data_type=torch.bfloat16, kv_data_type=torch.bfloat16)
    q = torch.randn(batch, num_q_heads, head_dim, device=device, dtype=torch.bfloat16)
    return (lambda: wrapper.run(q, (k_buffer, v_buffer), return_lse=True)), "FlashInfer BatchDecode, full prefix"


def main() -> None:
    args = parse_args()
    device = benchmarking.choose_device(args.smoke)
    from lava_sglang.kernels import CompressedPrefixAttention
    from lava_sglang.kernels.pool_prefix_attention import PoolPrefixAttention

    num_q_heads, num_kv_heads = args.heads
    peak, peak_source = benchmarking.peak_gbps(device, args.peak_gbps)
    print("# Decode over compressed prefixes vs the full prefix")
    for line in benchmarking.describe_machine(device):
        print(f"machine: {line}")
    print(f"inputs: Hq={num_q_heads} Hkv={num_kv_heads} d={args.head_dim} bf16, one layer, one decode token per "
          f"request; documents {args.documents}; keep {args.keep}; batch {args.batch}; per-head kept lengths "
          f"0.5x..1.5x the mean (capped at the document); page size 1, contiguous cells"
          f"{'; SMOKE shapes' if args.smoke else ''}")
    print(f"peak HBM: {f'{peak:.0f} GB/s' if peak else 'n/a'} ({peak_source})")
    print()
    print("| document | batch | keep | kept rows/head | ms | x full | MB read | GB/s | % peak | splits | pool ms "
          "| pool splits | graph ms | graph x full |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for document in args.documents:
        for batch in args.batch:
            baseline, baseline_name = full_prefix_baseline(document, batch, num_q_heads, num_kv_heads,
                                                           args.head_dim, device)
            full_ms = benchmarking.time_ms(baseline, device)
            full_graph_ms = replayed_ms(baseline, device)
            full_bytes = read_bytes(batch * num_kv_heads * document, batch, num_q_heads, args.head_dim)
            rows = [("full", document, full_ms, full_bytes, "", None, "", None)]
            for keep in args.keep:
                lengths = head_lengths(document, keep, batch, num_kv_heads)
                q, k_store, v_store, *metadata = decode_inputs(lengths, batch, num_q_heads, args.head_dim, device)
                attention = CompressedPrefixAttention(num_q_heads, num_kv_heads, args.head_dim)
                attention.plan(*metadata)
                ms = benchmarking.time_ms(lambda: attention.run(q, k_store, v_store), device)
                k_buffer, v_buffer, tables, table_rows = pool_inputs(lengths, batch, num_kv_heads, args.head_dim,
                                                                     device)
                pool = PoolPrefixAttention([k_buffer], [v_buffer], num_q_heads=num_q_heads)
                pool.plan(metadata[0], table_rows, tables.tables, num_tokens=batch, max_q_len=1)

                def pool_step():
                    pool.run(q, layer=0)

                pool_ms = benchmarking.time_ms(pool_step, device)
                graph_ms = replayed_ms(pool_step, device)
                kv_rows = int(lengths.sum())
                rows.append((f"{keep:g}", kv_rows / (batch * num_kv_heads), ms,
                             read_bytes(kv_rows, batch, num_q_heads, args.head_dim), str(attention.max_splits),
                             pool_ms, str(pool.splits(batch)), graph_ms))
            for keep, rows_per_head, ms, nbytes, splits, pool_ms, pool_splits, graph_ms in rows:
                gbps = nbytes / ms / 1e6
                share = f"{100 * gbps / peak:.0f}" if peak else "n/a"
                pool = f"{pool_ms:.4g}" if pool_ms is not None else ""
                if pool_ms is None:
                    graph = f"{full_graph_ms:.4g} | 1.00" if full_graph_ms is not None else "n/a | "
                else:
                    graph = f"{graph_ms:.4g}" if graph_ms is not None else "n/a"
                    graph += f" | {graph_ms / full_graph_ms:.2f}" if graph_ms and full_graph_ms else " | n/a"
                print(f"| {document} | {batch} | {keep} | {rows_per_head:.0f} | {ms:.4g} | {ms / full_ms:.2f} | "
                      f"{nbytes / 1e6:.3g} | {gbps:.3g} | {share} | {splits} | {pool} | {pool_splits} | {graph} |")
    print()
    print(f"keep = full: the baseline ({baseline_name}), timed eagerly; other rows: CompressedPrefixAttention.run "
          "(ms, x full, GB/s: its flat store). x full: time over the baseline's time for the same document and batch. "
          "splits: most chunks per sequence (split-K). pool ms: PoolPrefixAttention.run, the server's CUDA path, "
          "eager, one layer of a planned batch (every plan here is per batch and untimed); pool splits: its "
          "chunks per sequence (from the batch size); graph ms: replayed from a CUDA graph, the baseline's too "
          "(its row), and graph x full compares the two replays (n/a off the GPU).")
    if device.type != "cuda":
        print("CPU smoke run: the numbers only show the script works; they are not GPU measurements.")


if __name__ == "__main__":
    main()
