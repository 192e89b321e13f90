"""Triton kernels for the server, each with the torch reference it is tested against.

- `window_stats`: one layer's LAVa/SnapKV window statistics read in place from the KV pool.
- `compaction`: copy the kept K/V rows from the pool into the compressed store's cells.
- `prefix_attention`: batched attention over compressed prefixes (paged, page size 1), with LSE.
- `pool_prefix_attention`: the same over kept rows read in place from the KV pool through the
  store's layout tables, on a grid fixed by the batch's shape (CUDA-graph safe): the server's
  prefix attention on CUDA.
- `attention_states`: dense attention with LSE and the LSE merge (torch; SGLang's merge on CUDA).

Triton decides when a kernel module is imported whether its kernels run compiled or under
the interpreter (TRITON_INTERPRET=1, how the tests run them on the CPU). So this package
imports its modules on first use of a name: importing it, or the torch-only
`attention_states` (as the reference runtime does), defines no kernel.
"""

import importlib

_EXPORTS = {
    "attention_with_lse": "attention_states",
    "merge_attention_states": "attention_states",
    "copy_rows": "compaction",
    "copy_rows_reference": "compaction",
    "CompressedPrefixAttention": "prefix_attention",
    "prefix_attention_reference": "prefix_attention",
    "PoolPrefixAttention": "pool_prefix_attention",
    "pool_prefix_attention_reference": "pool_prefix_attention",
    "WindowStatistics": "window_stats",
    "window_statistics": "window_stats",
    "window_statistics_reference": "window_stats",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
