"""Partial attention states: (output, natural-log LSE) pairs, and merging them.

Attention after a compressed prefix is computed in two parts over disjoint key sets (the
compressed prefix, the request's own tokens) and merged by log-sum-exp. This module holds
the dense torch attention that makes such a state (the reference the attention kernel is
tested against, and the reference runtime's attention) and the merge, which the server
and the reference runtime share (a test checks it against SGLang's `merge_state`). Torch
only: importing it compiles no Triton kernel.
"""

from __future__ import annotations

import torch


def causal_visibility(query_len: int, key_len: int, device: torch.device) -> torch.Tensor:
    """[T, S] bool: the T queries are the last T of the S keys, each sees itself and earlier."""
    query_pos = torch.arange(key_len - query_len, key_len, device=device)[:, None]
    return torch.arange(key_len, device=device)[None, :] <= query_pos


def attention_with_lse(
    query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, visible: torch.Tensor, scaling: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Partial attention and its natural-log LSE, in fp32.

    query: [B, Hkv, G, T, d]; keys, values: [B, Hkv, S, d]; visible: bool, broadcastable to
    [B, Hkv, G, T, S]. Returns out [B, Hkv, G, T, d] and lse [B, Hkv, G, T]; a query that
    sees no key gets out = 0 and lse = -inf.
    """
    logits = torch.einsum("bhgtd,bhsd->bhgts", query.float(), keys.float()) * scaling
    logits = logits.masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(logits, dim=-1)
    probs = torch.exp(logits - lse.unsqueeze(-1).clamp_min(torch.finfo(torch.float32).min))
    out = torch.einsum("bhgts,bhsd->bhgtd", probs, values.float())
    return out, lse


def _cpu_flash_attention(*tensors: torch.Tensor):
    """PyTorch's CPU flash-attention op (it returns the LSE), or None where it does not apply:
    a tensor not fp32 on the CPU, or the private op missing from this PyTorch."""
    flash = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if flash is None or any(t.device.type != "cpu" or t.dtype != torch.float32 for t in tensors):
        return None
    return flash


def has_cpu_flash_attention(*tensors: torch.Tensor) -> bool:
    """Whether PyTorch's CPU flash-attention kernel applies to these tensors (fp32 on the CPU,
    the op present): where it does not, the functions below form the dense logits instead."""
    return _cpu_flash_attention(*tensors) is not None


def flash_attention_with_lse(
    query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, visible: torch.Tensor, scaling: float
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """`attention_with_lse` of one sequence by PyTorch's CPU flash-attention kernel, which
    returns the LSE that the public SDPA API does not, at a fraction of the cost of forming
    the logits; None where that kernel does not apply (not fp32 on the CPU, or the private op
    missing from this PyTorch), for the caller to fall back on `attention_with_lse`.

    query [Hkv, G, T, d]; keys, values [Hkv, S, d]; visible [T, S]. Returns out [Hkv, G, T, d]
    and lse [Hkv, G, T]; a row that sees no key gets out = 0 and lse = -inf, as in
    `attention_with_lse` (the kernel alone would give lse 0, a full weight in a merge).
    """
    flash = _cpu_flash_attention(query, keys, values)
    if flash is None:
        return None
    num_kv_heads, group, num_rows, head_dim = query.shape
    if num_rows == 0 or keys.shape[1] == 0:
        return _empty_state(query, values.shape[-1])
    bias = torch.zeros(visible.shape, dtype=torch.float32).masked_fill_(~visible, float("-inf"))
    out, lse = flash(query.reshape(1, num_kv_heads * group, num_rows, head_dim),
                     keys.repeat_interleave(group, dim=0)[None], values.repeat_interleave(group, dim=0)[None],
                     0.0, False, attn_mask=bias[None, None], scale=scaling)
    out, lse = out.view(num_kv_heads, group, num_rows, -1), lse.view(num_kv_heads, group, num_rows)
    blind_rows = ~visible.any(dim=-1)
    if blind_rows.any():
        out[:, :, blind_rows] = 0.0
        lse[:, :, blind_rows] = float("-inf")
    return out, lse


def _empty_state(query: torch.Tensor, value_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The state of queries [..., d] over no key (or of no query): out 0, lse -inf, fp32.
    PyTorch's CPU flash kernel dies with SIGFPE on an empty side, so it is never called with one."""
    out = torch.zeros((*query.shape[:-1], value_dim), dtype=torch.float32, device=query.device)
    return out, torch.full(query.shape[:-1], float("-inf"), dtype=torch.float32, device=query.device)


def rows_attention_with_lse(
    query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scaling: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every query row attending to every key, no mask: query [R, d], keys and values [S, d].
    Returns out [R, d] and lse [R], fp32 (no key: out 0, lse -inf). PyTorch's CPU
    flash-attention kernel on the CPU (`flash_attention_with_lse`), else `attention_with_lse`
    (another device, or a PyTorch without that op)."""
    query, keys, values = query.float(), keys.float(), values.float()
    if query.shape[0] == 0 or keys.shape[0] == 0:
        return _empty_state(query, values.shape[-1])
    flash = _cpu_flash_attention(query, keys, values)
    if flash is not None:
        out, lse = flash(query[None, None], keys[None, None], values[None, None], 0.0, False, scale=scaling)
        return out[0, 0], lse[0, 0]
    everything = torch.ones((), dtype=torch.bool, device=query.device)
    out, lse = attention_with_lse(query[None, None, None], keys[None, None], values[None, None], everything, scaling)
    return out[0, 0, 0], lse[0, 0, 0]


def flash_extend_attention_with_lse(
    query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scaling: float
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Attention of the last T of S positions of one sequence over the S keys, causally
    (query t sees keys 0 .. S - T + t): a request's extend over its cached and new tokens.
    By PyTorch's CPU flash-attention kernel with no mask, in two calls merged by LSE: the
    S - T cached keys, which every query sees (the group's G query heads folded into the
    rows of their KV head, so keys are not repeated per query head), and the T new keys,
    causal and square. None where the kernel does not apply (as `flash_attention_with_lse`).

    query [Hkv, G, T, d]; keys, values [Hkv, S, d], S >= T. Returns out [Hkv, G, T, d] and
    lse [Hkv, G, T].
    """
    flash = _cpu_flash_attention(query, keys, values)
    if flash is None:
        return None
    num_kv_heads, group, num_rows, head_dim = query.shape
    num_cached = keys.shape[1] - num_rows
    if num_cached < 0:
        raise ValueError(f"{num_rows} queries are the last of {keys.shape[1]} keys: need S >= T")
    if num_rows == 0:
        return _empty_state(query, values.shape[-1])
    new_out, new_lse = flash(query.reshape(1, num_kv_heads * group, num_rows, head_dim),
                             keys[None, :, num_cached:].repeat_interleave(group, dim=1),
                             values[None, :, num_cached:].repeat_interleave(group, dim=1), 0.0, True, scale=scaling)
    new_out = new_out.view(num_kv_heads, group, num_rows, -1)
    new_lse = new_lse.view(num_kv_heads, group, num_rows)
    if num_cached == 0:
        return new_out, new_lse
    cached_out, cached_lse = flash(query.reshape(1, num_kv_heads, group * num_rows, head_dim),
                                   keys[None, :, :num_cached], values[None, :, :num_cached], 0.0, False, scale=scaling)
    return merge_attention_states(cached_out.view(num_kv_heads, group, num_rows, -1),
                                  cached_lse.view(num_kv_heads, group, num_rows), new_out, new_lse)


def merge_attention_states(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine two partial attentions over disjoint key sets into attention over their union.

    out_*: [..., d], lse_*: [...] (natural log). Any leading shape; computed in fp32. Both
    sides empty (lse = -inf) gives out = 0, lse = -inf.
    """
    lse = torch.logaddexp(lse_a.float(), lse_b.float())
    safe = lse.clamp_min(torch.finfo(torch.float32).min)  # both empty: weights 0, not nan
    weight_a = torch.exp(lse_a - safe).unsqueeze(-1)
    weight_b = torch.exp(lse_b - safe).unsqueeze(-1)
    return weight_a * out_a.float() + weight_b * out_b.float(), lse
