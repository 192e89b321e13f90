"""Per-layer token scores from the observation window (lava.md, "Per-layer score").

Everything here is the torch reference: the Triton window-statistics kernel is tested
against `window_attention_mass` + `pool_scores` + `value_norm_scale` + `layer_entropy`.
All arithmetic is fp32 whatever the input dtype (the authors' bf16 scores create ties).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from lava_sglang.kernels.attention_states import causal_visibility


def window_attention_mass(q_window: torch.Tensor, keys: torch.Tensor, gqa_reduce: str) -> torch.Tensor:
    """Mean attention each prefix key receives from the window queries, reduced per KV head.

    q_window: [Hq, w, d] post-RoPE queries of the last w tokens of the scored sequence.
    keys: [Hkv, n, d] post-RoPE keys of the whole scored sequence.
    gqa_reduce: "max" (LAVa) or "mean" (the SnapKV family) over the G query heads of a group.
    Returns [Hkv, m] fp32 with m = n - w (the selectable prefix).

    The window is the sequence's own last w tokens: window query r sees the prefix and window
    keys 0 .. r, as a branch's queries see its own tokens (`prefix_attention_mass`).
    """
    window = q_window.shape[1]
    return _following_queries_mass(q_window, keys.float(), window, keys.shape[1] - window, gqa_reduce)


def prefix_attention_mass(
    queries: torch.Tensor, keys: torch.Tensor, own_keys: torch.Tensor, prefix_len: int, gqa_reduce: str
) -> torch.Tensor:
    """Mean attention each selectable prefix key receives from queries that follow the prefix.

    A branch window (observe.md): the queries are the last r tokens of a branch's own s tokens,
    which come after the whole n-token prefix; every query sees all n prefix keys and its own
    tokens causally (query i sees own keys 0 .. s - r + i). The softmax runs over those keys,
    as in the branch's real prefill.
    queries: [Hq, r, d]; keys: [Hkv, n, d] prefix keys; own_keys: [Hkv, s, d] with s >= r.
    Returns [Hkv, prefix_len] fp32 (the first prefix_len prefix keys).
    """
    all_keys = torch.cat([keys.float(), own_keys.float()], dim=1)
    return _following_queries_mass(queries, all_keys, own_keys.shape[1], prefix_len, gqa_reduce)


def _following_queries_mass(queries: torch.Tensor, all_keys: torch.Tensor, own_len: int, prefix_len: int,
                            gqa_reduce: str) -> torch.Tensor:
    """The mass of both: `all_keys` [Hkv, n + s, d] fp32 ends with the queries' own s keys,
    which the r queries see causally (query i sees own keys 0 .. s - r + i)."""
    rows, head_dim = queries.shape[1:]
    q = group_query_heads(queries, all_keys.shape[0])
    logits = torch.einsum("hgrd,hjd->hgrj", q, all_keys) / math.sqrt(head_dim)
    logits[..., all_keys.shape[1] - own_len:].masked_fill_(~causal_visibility(rows, own_len, all_keys.device),
                                                           float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return reduce_query_group(probs[..., :prefix_len].mean(dim=2), gqa_reduce)


def group_query_heads(per_query_head: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """[Hq, ...] -> [Hkv, Hq // Hkv, ...] fp32: the query heads grouped by the KV head they read
    (GQA: query heads g * G .. g * G + G - 1 share KV head g)."""
    num_q_heads = per_query_head.shape[0]
    if num_kv_heads < 1 or num_q_heads % num_kv_heads:
        raise ValueError(f"{num_q_heads} query heads cannot share {num_kv_heads} KV heads in equal groups (GQA)")
    return per_query_head.float().view(num_kv_heads, num_q_heads // num_kv_heads, *per_query_head.shape[1:])


def check_gqa_reduce(gqa_reduce: str) -> None:
    if gqa_reduce not in ("max", "mean"):
        raise ValueError(f"gqa_reduce must be 'max' or 'mean', got {gqa_reduce!r}")


def reduce_query_group(mass: torch.Tensor, gqa_reduce: str) -> torch.Tensor:
    """[Hkv, G, m] -> [Hkv, m]: "max" (LAVa) or "mean" (the SnapKV family) over a KV group."""
    check_gqa_reduce(gqa_reduce)
    return mass.amax(dim=1) if gqa_reduce == "max" else mass.mean(dim=1)


def pool_scores(scores: torch.Tensor, kernel: int) -> torch.Tensor:
    """Max-pool [Hkv, m] scores along tokens (stride 1, same length); padding never wins."""
    if kernel == 1:
        return scores
    return F.max_pool1d(scores.unsqueeze(0), kernel_size=kernel, stride=1, padding=kernel // 2).squeeze(0)


def value_l1_norms(values: torch.Tensor) -> torch.Tensor:
    """The L1 norm of every value, fp32 ([Hkv, n, d] -> [Hkv, n])."""
    return values.float().abs().sum(dim=-1)


def value_norm_scale(values: torch.Tensor, prefix_len: int) -> torch.Tensor:
    """vbar[h] = max over prefix tokens of the L1 norm of V[h, j] ([Hkv, n, d] -> [Hkv])."""
    return value_l1_norms(values[:, :prefix_len]).amax(dim=-1)


def layer_entropy(scores: torch.Tensor) -> float:
    """Normalised entropy of a layer's score mass over all (head, token) entries, in [0, 1].

    A layer with a single entry, or with no score mass at all, carries no information to
    spread; it reports 0 and the layer allocation treats it as such.
    """
    entries = scores.numel()
    total = scores.sum()
    if entries <= 1 or total <= 0:
        return 0.0
    p = scores.flatten() / total
    plogp = torch.where(p > 0, p * torch.log(p), torch.zeros_like(p))
    return min(max(float(-plogp.sum() / math.log(entries)), 0.0), 1.0)  # rounding can step past either end
