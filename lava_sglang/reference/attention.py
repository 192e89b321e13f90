"""Dense attention pieces of the reference runtime, in fp32.

Attention after a compressed prefix is computed the way the server does it: one partial
attention over the compressed prefix (a different kept set per KV head, padded here), one
over the request's own tokens (causal), merged by their log-sum-exp. The dense attention and
the merge are the kernels package's torch implementations
(`lava_sglang.kernels.attention_states`), shared with the server.
"""

from __future__ import annotations

import torch

from lava_sglang.kernels.attention_states import attention_with_lse, merge_attention_states

__all__ = ["attention_with_lse", "causal_visibility", "merge_attention_states"]


def causal_visibility(query_len: int, key_len: int, device: torch.device) -> torch.Tensor:
    """[T, S] bool: the T queries are the last T of the S keys, each sees itself and earlier."""
    query_pos = torch.arange(key_len - query_len, key_len, device=device)[:, None]
    return torch.arange(key_len, device=device)[None, :] <= query_pos
