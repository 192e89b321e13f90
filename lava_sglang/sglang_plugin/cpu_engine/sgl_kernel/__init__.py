"""Pure-PyTorch stand-in for the few ops SGLang's CPU engine imports from the CPU build of `sgl_kernel`.

Development and CI plumbing, nothing more. The CPU build of `sgl_kernel` is not published on
PyPI, and the installed CUDA build cannot load without a GPU driver. This package is opt-in:
`lava_sglang.sglang_plugin.cpu_engine.cpu_engine_env` puts its parent directory first on the
PYTHONPATH of the SGLang server processes the project starts, and only on a machine with no
CUDA device where the real `sgl_kernel` cannot load. It is never imported by the project itself
and never shadows a working `sgl_kernel`.

Ops are registered with `torch.library` in the `sgl_kernel` namespace (so
`torch.ops.sgl_kernel.NAME` works) and re-exported as module attributes (so
`from sgl_kernel import NAME` works), mirroring the real package:

- `copy_all_layer_kv_cache_cpu`, `assign_req_to_token_pool_cpu`, `murmur_hash32_cpu`:
  implemented, same semantics as the Triton kernels next to their SGLang call sites;
- the speculative-decoding helpers SGLang imports at start-up: placeholders that raise if called.

Any other attribute raises AttributeError, so SGLang's guarded probes (`hasattr`, `try: from
sgl_kernel import X`) take their fallback paths. In particular `convert_weight_packed` is absent,
which keeps SGLang off the Intel AMX backend and on its native-PyTorch paths.
"""

from __future__ import annotations

import ctypes

import torch

_MASK32 = 0xFFFFFFFF


def _copy_all_layer_kv_cache(
    data_ptrs: torch.Tensor, strides: torch.Tensor, tgt_loc: torch.Tensor, src_loc: torch.Tensor
) -> None:
    """For every buffer b (base address data_ptrs[b], row stride strides[b] bytes, which is also
    the row width): rows[tgt_loc[i]] = rows[src_loc[i]]. All source rows of a buffer are read
    before any target row is written, so overlapping locations are safe (as in the Triton kernel)."""
    if data_ptrs.numel() == 0 or tgt_loc.numel() == 0:
        return
    tgt, src = tgt_loc.long(), src_loc.long()
    num_rows = int(torch.maximum(tgt.max(), src.max())) + 1
    for ptr, stride in zip(data_ptrs.view(torch.int64).tolist(), strides.tolist()):
        raw = (ctypes.c_uint8 * (num_rows * stride)).from_address(ptr)
        rows = torch.frombuffer(raw, dtype=torch.uint8).view(num_rows, stride)
        rows[tgt] = rows[src]  # advanced indexing gathers into a new tensor before the scatter


def _assign_req_to_token_pool(
    req_pool_indices: torch.Tensor,
    req_to_token: torch.Tensor,
    start_offset: torch.Tensor,
    end_offset: torch.Tensor,
    out_cache_loc: torch.Tensor,
    pool_len: int,
) -> None:
    """req_to_token[req_pool_indices[r], start_offset[r]:end_offset[r]] = the next
    end_offset[r] - start_offset[r] entries of out_cache_loc, requests taken in order."""
    assert req_to_token.shape[1] == pool_len, (tuple(req_to_token.shape), pool_len)
    lengths = (end_offset - start_offset).long()
    total = int(lengths.sum())
    if total == 0:
        return
    first = torch.cumsum(lengths, 0) - lengths  # where each request's run starts in out_cache_loc
    rows = req_pool_indices.long().repeat_interleave(lengths)
    cols = (start_offset.long() - first).repeat_interleave(lengths) + torch.arange(total)
    req_to_token[rows, cols] = out_cache_loc[:total].to(req_to_token.dtype)


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """x * c mod 2**32 for int64 x in [0, 2**32), split so no int64 product overflows."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & _MASK32


def _rotl32(x: torch.Tensor, r: int) -> torch.Tensor:
    return ((x << r) | (x >> (32 - r))) & _MASK32


def _murmur3_mix(h: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    k = _mul32(_rotl32(_mul32(k, 0xCC9E2D51), 15), 0x1B873593)
    h = _rotl32(h ^ k, 13)
    return (_mul32(h, 5) + 0xE6546B64) & _MASK32


def _murmur_hash32(seed: torch.Tensor, positions: torch.Tensor, col_indices: torch.Tensor) -> torch.Tensor:
    """[n, m] uint32: MurmurHash3 of (seed_low, seed_high, position) per row and column index."""
    assert seed.dtype == torch.uint64 and seed.dim() == 1 and seed.shape == positions.shape, (seed.dtype, seed.shape)
    assert col_indices.dim() == 1, col_indices.shape
    seed = seed.view(torch.int64)
    positions = positions.view(torch.int64) if positions.dtype == torch.uint64 else positions.long()
    h = torch.zeros_like(seed)
    h = _murmur3_mix(h, seed & _MASK32)
    h = _murmur3_mix(h, (seed >> 32) & _MASK32)
    h = _murmur3_mix(h, positions & _MASK32)
    h = _murmur3_mix(h[:, None], (col_indices.long() & _MASK32)[None, :])
    h = h ^ 16
    h = h ^ (h >> 16)
    h = _mul32(h, 0x85EBCA6B)
    h = h ^ (h >> 13)
    h = _mul32(h, 0xC2B2AE35)
    h = h ^ (h >> 16)
    return h.to(torch.uint32)


_OPS = {
    "copy_all_layer_kv_cache_cpu": (
        "(Tensor data_ptrs, Tensor strides, Tensor tgt_loc, Tensor src_loc) -> ()",
        _copy_all_layer_kv_cache,
    ),
    "assign_req_to_token_pool_cpu": (
        "(Tensor req_pool_indices, Tensor(a!) req_to_token, Tensor start_offset, Tensor end_offset, "
        "Tensor out_cache_loc, int pool_len) -> ()",
        _assign_req_to_token_pool,
    ),
    "murmur_hash32_cpu": ("(Tensor seed, Tensor positions, Tensor col_indices) -> Tensor", _murmur_hash32),
}

# Kept referenced for the life of the module: a Library that is garbage collected unregisters its ops.
_LIBRARY = torch.library.Library("sgl_kernel", "FRAGMENT")
for _name, (_schema, _impl) in _OPS.items():
    if not hasattr(torch.ops.sgl_kernel, _name):  # already registered, e.g. the module loaded twice
        _LIBRARY.define(_name + _schema)
        _LIBRARY.impl(_name, _impl, "CPU")


def copy_all_layer_kv_cache_cpu(data_ptrs, strides, tgt_loc, src_loc) -> None:
    torch.ops.sgl_kernel.copy_all_layer_kv_cache_cpu(data_ptrs, strides, tgt_loc, src_loc)


def assign_req_to_token_pool_cpu(
    req_pool_indices, req_to_token, start_offset, end_offset, out_cache_loc, pool_len
) -> None:
    torch.ops.sgl_kernel.assign_req_to_token_pool_cpu(
        req_pool_indices, req_to_token, start_offset, end_offset, out_cache_loc, pool_len
    )


def murmur_hash32_cpu(seed, positions, col_indices) -> torch.Tensor:
    return torch.ops.sgl_kernel.murmur_hash32_cpu(seed, positions, col_indices)


def _placeholder(name: str):
    def unsupported(*args, **kwargs):
        raise NotImplementedError(
            f"sgl_kernel.{name} is not implemented by lava-sglang's CPU-engine stand-in for sgl_kernel "
            "(speculative decoding is not supported on the CPU engine here); SGLang imports it only at start-up."
        )

    unsupported.__name__ = unsupported.__qualname__ = name
    return unsupported


for _name in (
    "fill_accept_out_cache_loc_cpu",
    "fill_bonus_tokens_cpu",
    "assign_draft_cache_locs_contiguous_cpu",
    "assign_extend_cache_locs_cpu",
    "build_tree_kernel_efficient_cpu",
    "verify_tree_greedy_cpu",
    "rotate_input_ids_cpu",
):
    globals()[_name] = _placeholder(_name)


def __getattr__(name: str):
    raise AttributeError(f"lava-sglang's CPU-engine stand-in for sgl_kernel has no attribute {name!r}")
