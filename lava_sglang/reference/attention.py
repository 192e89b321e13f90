"""Dense attention pieces of the reference runtime, in fp32.

Attention after a compressed prefix is computed the way the server does it: one partial
attention over the compressed prefix (a different kept set per KV head, padded here), one
over the request's own tokens (causal), merged by their log-sum-exp. The dense attention, the
causal mask and the merge are the kernels package's torch implementations
(`lava_sglang.kernels.attention_states`), shared with the server.
"""

from __future__ import annotations

from lava_sglang.kernels.attention_states import attention_with_lse, causal_visibility, merge_attention_states

__all__ = ["attention_with_lse", "causal_visibility", "merge_attention_states"]
