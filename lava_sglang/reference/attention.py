"""Dense attention pieces of the reference runtime, in fp32.

Attention after a compressed prefix is computed the way the server does it: one partial
attention over the compressed prefix (a different kept set per KV head, padded here), one
over the request's own tokens (causal), merged by their log-sum-exp.
"""

from __future__ import annotations

import torch


def attention_with_lse(
    query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, visible: torch.Tensor, scaling: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Partial attention and its natural-log LSE.

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


def merge_attention_states(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine two partial attentions over disjoint key sets into attention over their union."""
    lse = torch.logaddexp(lse_a, lse_b)
    safe = lse.clamp_min(torch.finfo(torch.float32).min)  # both empty: weights 0, not nan
    weight_a = torch.exp(lse_a - safe).unsqueeze(-1)
    weight_b = torch.exp(lse_b - safe).unsqueeze(-1)
    return weight_a * out_a + weight_b * out_b, lse


def causal_visibility(query_len: int, key_len: int, device: torch.device) -> torch.Tensor:
    """[T, S] bool: the T queries are the last T of the S keys, each sees itself and earlier."""
    query_pos = torch.arange(key_len - query_len, key_len, device=device)[:, None]
    return torch.arange(key_len, device=device)[None, :] <= query_pos
