"""Each request's attention over its own tokens, with the LSE, by the kernels of the SGLang
attention backend the plugin wraps: SGLang's own Triton kernels, or FlashInfer's wrappers.

A request that reads a compressed prefix attends to two things: the prefix's kept rows
(`CompressedPrefixBatch`) and its own tokens, the part of its KV row after the prefix. This
module computes the second on CUDA, with no per-request loop and no padding; by default
(`OwnTokenAttention`) with the kernels of SGLang's `triton` attention backend:

- `plan` (once per forward batch, as FlashInfer's wrappers plan): SGLang's
  `create_flashinfer_kv_indices_triton` gathers each request's row from `own_start` (the end
  of its compressed prefix; 0 without one) through `kv_start_idx`, into `kv_indptr` /
  `kv_indices`. A decode batch reads its whole own row, the new token included (it is in the
  pool by then); an extend batch reads the own tokens cached before the extend, and the
  extend's own keys come with the call.
- `run` (per layer): decode with SGLang's split-K `decode_attention_fwd`, whose per-split LSE
  merged by logsumexp is the query's LSE (as SGLang's decode-context-parallel path merges
  it); extend with `extend_attention_fwd(..., lse_extend=...)`, causal over the extend.

Under SGLang's `flashinfer` backend, `FlashInferOwnAttention` plans FlashInfer's paged
decode and prefill wrappers on the same own rows (page size 1, int32 indices, as SGLang plans
them) and returns their base-2 LSE in natural log.

The result is merged with the compressed prefix's attention by LSE, as the torch path's is.
Without CUDA the tests run the Triton kernels under TRITON_INTERPRET=1 on fp32 tensors, and
the FlashInfer wrapping against a stand-in wrapper that records its plan.
"""

from __future__ import annotations

import math

import torch

from lava_sglang.sglang_plugin.touchpoints import triton_attention_ops

#: Keys per split of the decode kernel's first stage, and the most splits a request gets.
KEYS_PER_DECODE_SPLIT = 256
MAX_DECODE_SPLITS = 8


def decode_splits(own_lens: torch.Tensor) -> torch.Tensor:
    """Splits of the decode kernel per request: one per KEYS_PER_DECODE_SPLIT own keys, 1 to
    MAX_DECODE_SPLITS; int32, on own_lens' device."""
    return ((own_lens + KEYS_PER_DECODE_SPLIT - 1) // KEYS_PER_DECODE_SPLIT).clamp(1, MAX_DECODE_SPLITS).to(
        torch.int32)


def cached_own_lens(own_starts: list[int], seq_lens: list[int], extend_lens: list[int], *,
                    decode: bool) -> torch.Tensor:
    """Own keys of each request in the pool before the batch's extend keys (a decode's new
    token counts: it is in the pool by then), [B] int64; raises if an own start lies past them."""
    if not len(own_starts) == len(seq_lens) == len(extend_lens):
        raise ValueError(f"one entry per request: {len(own_starts)} own starts, {len(seq_lens)} sequence lengths, "
                         f"{len(extend_lens)} extend lengths")
    own_lens = torch.tensor(seq_lens) - torch.tensor(own_starts) - (0 if decode else torch.tensor(extend_lens))
    if bool((own_lens < (1 if decode else 0)).any()):
        raise ValueError(f"own tokens must start within the sequence: own starts {own_starts}, sequence "
                         f"lengths {seq_lens}, extend lengths {extend_lens}")
    return own_lens


def lengths_indptr(lengths) -> torch.Tensor:
    """Where each of B consecutive runs of these lengths starts, and the total: [B + 1] int32, on
    the host (FlashInfer's plans take their indptrs there: no read back from the device)."""
    indptr = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    indptr[1:] = torch.cumsum(torch.as_tensor(lengths), 0)
    return indptr


def own_kv_indices(req_to_token: torch.Tensor, req_pool_indices: torch.Tensor, own_starts: list[int],
                   kv_indptr: torch.Tensor, index_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """FlashInfer's page-size-1 metadata of each request's own keys on req_to_token's device:
    kv_indptr (a copy of the host one given, `lengths_indptr`) and kv_indices (index_dtype),
    the slots of row req_pool_indices[i] of req_to_token from own_starts[i] on, gathered by
    SGLang's index builder (`kv_start_idx`)."""
    create_kv_indices, _, _ = triton_attention_ops()
    batch = len(own_starts)
    if not req_pool_indices.numel() == batch == kv_indptr.numel() - 1:
        raise ValueError(f"one entry per request: {req_pool_indices.numel()} requests, {batch} own starts, "
                         f"{kv_indptr.numel() - 1} own lengths")
    device = req_to_token.device
    device_indptr = kv_indptr.to(device)
    kv_indices = torch.empty(int(kv_indptr[-1]), dtype=index_dtype, device=device)
    create_kv_indices[(batch,)](req_to_token, req_pool_indices, kv_indptr.diff().to(device), device_indptr,
                                torch.tensor(own_starts, dtype=torch.int32, device=device), kv_indices,
                                req_to_token.stride(0))
    return device_indptr, kv_indices


class OwnTokenAttention:
    """Attention over own tokens for one forward batch: `plan` once, `run` per layer."""

    def __init__(self, num_q_heads: int):
        self.num_q_heads = num_q_heads
        self.decode = False
        self.kv_indptr = self.kv_indices = self.qo_indptr = None
        self.num_kv_splits = None
        self.max_extend_len = 0

    def plan(self, req_to_token: torch.Tensor, req_pool_indices: torch.Tensor, own_starts: list[int],
             seq_lens: list[int], extend_lens: list[int], *, decode: bool) -> None:
        """req_to_token: SGLang's [slots, context] token table; req_pool_indices: [B] on its
        device; own_starts, seq_lens (counting the extend), extend_lens: [B] on the host, as
        the scheduler knows them, so the plan reads nothing back from the device."""
        own_lens = cached_own_lens(own_starts, seq_lens, extend_lens, decode=decode)
        device = req_to_token.device
        self.decode = decode
        self.kv_indptr, self.kv_indices = own_kv_indices(req_to_token, req_pool_indices, own_starts,
                                                         lengths_indptr(own_lens), torch.int64)
        if decode:
            self.num_kv_splits = decode_splits(own_lens).to(device)
        else:
            self.qo_indptr = lengths_indptr(extend_lens).to(device)
            self.max_extend_len = max(extend_lens)

    def run(self, queries: torch.Tensor, k_extend: torch.Tensor | None, v_extend: torch.Tensor | None,
            k_buffer: torch.Tensor, v_buffer: torch.Tensor, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
        """queries [tokens, Hq, d]; k_extend, v_extend [tokens, Hkv, d] the extend's own keys and
        values (None for decode); k_buffer, v_buffer: the layer's pool buffers; scaling: the
        layer's softmax scale. Returns out [tokens, Hq, dv] and the natural-log LSE [tokens, Hq], fp32."""
        _, decode_attention_fwd, extend_attention_fwd = triton_attention_ops()
        num_tokens = queries.shape[0]
        value_dim = v_buffer.shape[-1]
        out = queries.new_empty((num_tokens, self.num_q_heads, value_dim), dtype=torch.float32)
        queries = queries.contiguous()
        if self.decode:
            split_out = queries.new_empty((num_tokens, self.num_q_heads, MAX_DECODE_SPLITS, value_dim),
                                          dtype=torch.float32)
            split_lse = queries.new_full((num_tokens, self.num_q_heads, MAX_DECODE_SPLITS), float("-inf"),
                                         dtype=torch.float32)
            decode_attention_fwd(queries, k_buffer, v_buffer, out, self.kv_indptr, self.kv_indices, split_out,
                                 split_lse, self.num_kv_splits, MAX_DECODE_SPLITS, scaling, 1.0, 1.0)
            return out, torch.logsumexp(split_lse, dim=-1)
        lse = queries.new_empty((num_tokens, self.num_q_heads), dtype=torch.float32)
        extend_attention_fwd(queries, k_extend.contiguous(), v_extend.contiguous(), out, k_buffer, v_buffer,
                             self.qo_indptr, self.kv_indptr, self.kv_indices, None, True, None, self.max_extend_len,
                             1.0, 1.0, sm_scale=scaling, lse_extend=lse)
        return out, lse


class FlashInferOwnAttention:
    """Attention over own tokens for one forward batch by FlashInfer's paged wrappers, called
    as SGLang's `flashinfer` backend calls them: `plan` once, `run` per layer.

    Each request's paged sequence (page size 1) is its KV row from its own start to its end,
    the batch's new keys included (the path writes them to the pool before attending): a
    decode batch runs the decode wrapper, an extend batch the paged prefill wrapper, causal
    (FlashInfer aligns a request's queries with the end of its keys)."""

    def __init__(self, decode_wrapper, prefill_wrapper, *, num_q_heads: int, num_kv_heads: int, head_dim: int):
        self.decode_wrapper, self.prefill_wrapper = decode_wrapper, prefill_wrapper
        self.num_q_heads, self.num_kv_heads, self.head_dim = num_q_heads, num_kv_heads, head_dim
        self.decode = False

    def plan(self, req_to_token: torch.Tensor, req_pool_indices: torch.Tensor, own_starts: list[int],
             seq_lens: list[int], extend_lens: list[int], *, decode: bool, q_dtype: torch.dtype,
             kv_dtype: torch.dtype) -> None:
        """Arguments as OwnTokenAttention.plan's; q_dtype, kv_dtype: the queries' and the pool's."""
        own_lens = cached_own_lens(own_starts, seq_lens, extend_lens, decode=decode)
        if not decode:
            own_lens = own_lens + torch.tensor(extend_lens)
        # The indptrs and page lengths go to the plan on the host, which it reads there (given
        # device tensors, FlashInfer's plan copies them back, a synchronisation mid-forward).
        kv_indptr = lengths_indptr(own_lens)
        _, kv_indices = own_kv_indices(req_to_token, req_pool_indices, own_starts, kv_indptr, torch.int32)
        last_page_len = torch.ones(len(own_starts), dtype=torch.int32)
        heads = (self.num_q_heads, self.num_kv_heads, self.head_dim, 1)  # page size 1
        self.decode = decode
        if decode:
            self.decode_wrapper.begin_forward(kv_indptr, kv_indices, last_page_len, *heads, q_data_type=q_dtype,
                                              kv_data_type=kv_dtype)
        else:
            self.prefill_wrapper.begin_forward(lengths_indptr(extend_lens), kv_indptr, kv_indices, last_page_len,
                                               *heads, q_data_type=q_dtype, kv_data_type=kv_dtype, causal=True)

    def run(self, queries: torch.Tensor, k_buffer: torch.Tensor, v_buffer: torch.Tensor,
            scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
        """queries [tokens, Hq, d]; k_buffer, v_buffer: the layer's pool buffers; scaling: the
        layer's softmax scale (passed per call, as SGLang passes it). Returns out [tokens, Hq, dv]
        and the natural-log LSE [tokens, Hq], fp32 (FlashInfer's LSE is base 2)."""
        queries = queries.contiguous()
        if self.decode:
            out, lse = self.decode_wrapper.forward_return_lse(queries, (k_buffer, v_buffer), sm_scale=scaling)
        else:
            out, lse = self.prefill_wrapper.forward_return_lse(queries, (k_buffer, v_buffer), causal=True,
                                                               sm_scale=scaling)
        return out.float(), lse.float() * math.log(2)
