"""An extend over a cached prefix on the CPU engine: SGLang's torch_native backend against the
plugin's path, one attention layer.

SGLang's `torch_native` backend attends from every position of a request's sequence, the
cached prefix's included, and discards the prefix's rows; on a lava server an extend batch
with a cached prefix takes the plugin's path instead (`CompressedPrefixPath`,
`own_cached_prefixes`), which attends from the new tokens only. Both run here on the same
pool, request rows and queries (SmolLM2-135M's heads by default); their outputs are checked
equal first, then each is timed. Printed per (prefix, extend): ms per layer, the ratio, and
the seconds a whole forward (--layers) would save.

    python scripts/bench_cached_prefix_attention.py
    python scripts/bench_cached_prefix_attention.py --smoke     # tiny shapes, one repeat
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from importlib.metadata import version
from types import SimpleNamespace

import torch

from lava_sglang.argtypes import positive_int


def wrapped_torch_native(k_buffer: torch.Tensor, v_buffer: torch.Tensor, req_to_token: torch.Tensor):
    """SGLang's TorchNativeAttnBackend over one layer's K/V buffers [slots, Hkv, d] and the
    request rows `req_to_token`, with the plugin's path installed and bound to a stand-in
    cache that holds no compressed prefix, records no window and runs no repetition."""
    from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend

    from lava_sglang.sglang_plugin import attention
    from lava_sglang.store import CompressedStore, LayoutTables

    kv_pool = SimpleNamespace(get_key_buffer=lambda layer_id: k_buffer, get_value_buffer=lambda layer_id: v_buffer)
    req_to_token_pool = SimpleNamespace(req_to_token=req_to_token)
    tables = LayoutTables(max_entries=1, pool_slots=k_buffer.shape[0], num_layers=1, num_kv_heads=k_buffer.shape[1],
                          device="cpu")
    no_capture = SimpleNamespace(rows_to_record=lambda rid, prefix_len, extend_len: 0)
    attention.bind(SimpleNamespace(kv_pool=kv_pool, req_to_token_pool=req_to_token_pool,
                                   store=CompressedStore(tables), capture=no_capture, repetitions={}))
    backend = TorchNativeAttnBackend.__new__(TorchNativeAttnBackend)  # its __init__ wants a model runner
    backend.req_to_token_pool, backend.token_to_kv_pool, backend.swa_out_cache_loc = req_to_token_pool, kv_pool, None
    return attention.with_compressed_prefixes(backend)


class BatchFields(SimpleNamespace):
    """Fields of SGLang's ForwardBatch, in a class of their own: the attention path keeps a weak
    reference to its batch, which a SimpleNamespace cannot be."""


def extend_batch(req_pool_indices: list[int], prefix_lens: list[int], extend_lens: list[int]) -> BatchFields:
    """The fields of SGLang's ForwardBatch that both paths read, for an extend whose keys are
    in the pool already (called with save_kv_cache=False)."""
    return BatchFields(
        req_pool_indices=torch.tensor(req_pool_indices), rids=None, encoder_lens=None, out_cache_loc=None,
        extend_prefix_lens_cpu=prefix_lens, extend_seq_lens_cpu=extend_lens,
        seq_lens=torch.tensor([prefix + extend for prefix, extend in zip(prefix_lens, extend_lens)]),
        extend_prefix_lens=torch.tensor(prefix_lens), extend_seq_lens=torch.tensor(extend_lens))


def milliseconds(run, repeats: int) -> float:
    """Median wall ms of `repeats` calls after one warm-up call."""
    run()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append((time.perf_counter() - started) * 1e3)
    return statistics.median(times)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prefixes", type=positive_int, nargs="+", default=[1024, 2048, 4096],
                        help="cached prefix lengths in tokens")
    parser.add_argument("--extend", type=positive_int, default=32, help="new tokens per request (a question)")
    parser.add_argument("--heads", type=positive_int, nargs=2, default=[9, 3], metavar=("HQ", "HKV"),
                        help="query and KV heads (default 9 3, SmolLM2-135M's)")
    parser.add_argument("--head-dim", type=positive_int, default=64, help="head dim (default 64, SmolLM2-135M's)")
    parser.add_argument("--layers", type=positive_int, default=30, help="layers of a forward, for the seconds saved")
    parser.add_argument("--repeats", type=positive_int, default=10, help="timed runs per case (default 10)")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, one repeat")
    args = parser.parse_args(argv)
    if args.smoke:
        args.prefixes, args.extend, args.heads, args.head_dim, args.repeats = [40], 5, [4, 2], 16, 1
    if args.heads[0] % args.heads[1]:
        parser.error(f"--heads {args.heads[0]} {args.heads[1]}: the query heads must be a multiple of the KV heads")
    return args


def main(argv=None) -> list[dict]:
    """Prints the machine, the inputs and the table; returns its rows."""
    from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend
    from sglang.srt.layers.radix_attention import RadixAttention

    args = parse_args(argv)
    num_q_heads, num_kv_heads = args.heads
    print(f"machine: {platform.machine()}, {torch.get_num_threads()} torch threads, {platform.platform()}")
    print(f"versions: sglang {version('sglang')}, torch {torch.__version__}, python {platform.python_version()}")
    print(f"inputs: one request, prefixes {args.prefixes} cached + {args.extend} new tokens, {num_q_heads} query "
          f"/ {num_kv_heads} KV heads of dim {args.head_dim}, fp32, median of {args.repeats} calls per layer, "
          f"{args.layers} layers per forward")
    generator = torch.Generator().manual_seed(0)
    max_len = max(args.prefixes) + args.extend
    k_buffer = torch.randn(max_len, num_kv_heads, args.head_dim, generator=generator)
    v_buffer = torch.randn(max_len, num_kv_heads, args.head_dim, generator=generator)
    req_to_token = torch.randperm(max_len, generator=generator).to(torch.int32)[None]
    backend = wrapped_torch_native(k_buffer, v_buffer, req_to_token)
    layer = RadixAttention(num_q_heads, args.head_dim, args.head_dim ** -0.5, num_kv_heads, layer_id=0)
    rows = []
    print("\n| cached prefix | torch_native ms/layer | plugin ms/layer | ratio | s saved per forward |")
    print("|---|---|---|---|---|")
    for prefix_len in args.prefixes:
        batch = extend_batch([0], [prefix_len], [args.extend])
        queries = torch.randn(args.extend, num_q_heads * args.head_dim, generator=generator)

        def stock():
            return TorchNativeAttnBackend.forward_extend(backend, queries, None, None, layer, batch,
                                                         save_kv_cache=False)

        def plugin():
            return backend.forward_extend(queries, None, None, layer, batch, save_kv_cache=False)

        torch.testing.assert_close(plugin(), stock(), atol=1e-4, rtol=1e-4)
        stock_ms, plugin_ms = milliseconds(stock, args.repeats), milliseconds(plugin, args.repeats)
        row = {"prefix": prefix_len, "torch_native_ms": stock_ms, "plugin_ms": plugin_ms,
               "ratio": stock_ms / plugin_ms, "seconds_saved": (stock_ms - plugin_ms) * args.layers / 1e3}
        rows.append(row)
        print(f"| {prefix_len} | {stock_ms:.2f} | {plugin_ms:.2f} | {row['ratio']:.1f}x | {row['seconds_saved']:.2f} |")
    return rows


if __name__ == "__main__":
    main()
