"""A decode step's attention with its metadata built on the device: the form a captured CUDA
graph can replay.

`CompressedPrefixPath` plans a batch on the host (which request reads which entry, each own
row's length), which is why SGLang's CUDA graphs stay off with a policy on (docs/gpu_path.md).
`DecodeGraphStep` computes the same attention for a decode batch and reads nothing back from
the device:

- its metadata buffers are allocated once, for the largest batch and the longest context
  (the kernels' intermediates are allocated per call, which a capture serves from the
  graph's private memory pool);
- `plan` fills them from the batch's device tensors (`req_pool_indices`, `seq_lens`) with
  device ops only: each request's table row from the first slot of its KV row
  (`LayoutTables.rows_for_slots`), its own row from the end of that entry's prefix
  (`LayoutTables.prefix_lens`), and SGLang's index builder with that start
  (`create_flashinfer_kv_indices_triton`, `kv_start_idx`);
- `run`, per layer, launches SGLang's split-K decode kernel over the own rows and the
  compressed-prefix kernel over the entries, both on grids fixed by the batch size, and
  merges the two by LSE.

Every request takes the same path: one without a compressed prefix reads its whole row as
its own and gets nothing (LSE -inf) from the prefix part, so a graph captured for a batch
size serves any mix. Not yet installed in SGLang's graph hooks (`plan` would go in the
backend's `init_forward_metadata_in_graph`, which a capture records and every replay re-runs;
docs/gpu_path.md): that needs a GPU session with SGLang, which the lent machine lacks.
"""

from __future__ import annotations

import torch

from lava_sglang.checks import is_int
from lava_sglang.kernels.attention_states import merge_attention_states
from lava_sglang.sglang_plugin.attention import POOL_DECODE_SPLITS
from lava_sglang.sglang_plugin.own_attention import OwnTokenAttention, decode_splits
from lava_sglang.sglang_plugin.touchpoints import triton_attention_ops
from lava_sglang.store import LayoutTables


class DecodeGraphStep:
    """A decode batch's attention over (compressed prefix) + (own tokens): `plan` once per
    step, `run` per layer; no host read in either.

    k_buffers, v_buffers: the pool's per-layer buffers [slots, Hkv, d]; tables: the store's
    `LayoutTables`; max_batch: the most requests of a step; max_context: the longest sequence
    (a request's own row is at most that long: it sizes the own rows' index buffer).
    """

    def __init__(self, k_buffers: list[torch.Tensor], v_buffers: list[torch.Tensor], tables: LayoutTables, *,
                 max_batch: int, max_context: int, num_q_heads: int, scaling: float):
        from lava_sglang.kernels.pool_prefix_attention import PoolPrefixAttention

        for name, value in (("max_batch", max_batch), ("max_context", max_context)):
            if not is_int(value) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        device = k_buffers[0].device
        self.tables = tables
        self.max_batch = max_batch
        self.max_context = max_context
        self.scaling = scaling
        self.prefix = PoolPrefixAttention(k_buffers, v_buffers, num_q_heads=num_q_heads,
                                          max_splits=POOL_DECODE_SPLITS, sm_scale=scaling)
        self.own = OwnTokenAttention(num_q_heads)
        self.own.decode = True
        self.kv_indptr = torch.zeros(max_batch + 1, dtype=torch.int32, device=device)
        self.kv_indices = torch.zeros(max_batch * max_context, dtype=torch.int64, device=device)
        self.num_kv_splits = torch.ones(max_batch, dtype=torch.int32, device=device)
        self.table_rows = torch.full((max_batch,), -1, dtype=torch.int32, device=device)
        self.qo_indptr = torch.arange(max_batch + 1, dtype=torch.int32, device=device)  # one query per request
        self.batch = 0

    def plan(self, req_to_token: torch.Tensor, req_pool_indices: torch.Tensor, seq_lens: torch.Tensor) -> None:
        """req_to_token: SGLang's [rows, context] token table; req_pool_indices, seq_lens: [B] on
        its device (seq_lens counting the new token, whose slot is in req_to_token)."""
        batch = req_pool_indices.numel()
        if not 1 <= batch <= self.max_batch or seq_lens.numel() != batch:
            raise ValueError(f"a step of 1 to {self.max_batch} requests with one sequence length each, got "
                             f"{batch} requests and {seq_lens.numel()} lengths")
        if req_to_token.shape[1] > self.max_context:  # a row longer than the buffers were sized for
            raise ValueError(f"req_to_token rows hold {req_to_token.shape[1]} tokens, more than max_context "
                             f"{self.max_context}")
        create_kv_indices, _, _ = triton_attention_ops()
        rows = self.tables.rows_for_slots(req_to_token[req_pool_indices, 0])
        own_starts = torch.where(rows >= 0, self.tables.prefix_lens[rows.clamp_min(0).long()], 0)
        # A real request's own row holds its new token at least; SGLang pads a graph's batch with
        # rows of length 1 (row 0), which may start with an entry: they read one key, not none
        # (an empty row would make the decode kernel divide 0 by 0).
        own_starts = torch.minimum(own_starts, seq_lens - 1).to(torch.int32)
        own_lens = (seq_lens - own_starts).to(torch.int32)
        self.table_rows[:batch] = rows
        self.kv_indptr[1:batch + 1] = torch.cumsum(own_lens, 0)
        create_kv_indices[(batch,)](req_to_token, req_pool_indices, own_lens, self.kv_indptr, own_starts,
                                    self.kv_indices, req_to_token.stride(0))
        self.num_kv_splits[:batch] = decode_splits(own_lens)
        self.own.kv_indptr, self.own.kv_indices = self.kv_indptr[:batch + 1], self.kv_indices
        self.own.num_kv_splits = self.num_kv_splits[:batch]
        self.prefix.plan(self.qo_indptr[:batch + 1], self.table_rows[:batch], self.tables.tables, num_tokens=batch,
                         max_q_len=1)
        self.batch = batch

    def run(self, layer: int, queries: torch.Tensor, k_buffer: torch.Tensor,
            v_buffer: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """queries [B, Hq, d] of the planned step; k_buffer, v_buffer: the layer's pool
        buffers, the step's new keys and values already written (`set_kv_buffer`, as
        `CompressedPrefixPath._attend` does). Returns out [B, Hq, dv] and the natural-log LSE
        [B, Hq], fp32."""
        if queries.shape[0] != self.batch:
            raise ValueError(f"the step was planned for {self.batch} requests, got {queries.shape[0]} queries")
        own_out, own_lse = self.own.run(queries, None, None, k_buffer, v_buffer, self.scaling)
        prefix_out, prefix_lse = self.prefix.run(queries.to(self.prefix.dtype).contiguous(), layer=layer)
        return merge_attention_states(prefix_out.float(), prefix_lse, own_out, own_lse)
