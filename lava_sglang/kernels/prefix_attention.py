"""Attention of a batch of requests over their compressed prefixes, with the log-sum-exp.

A compressed prefix keeps a different number of rows per (layer, KV head), so each
(request, KV head) is one paged sequence over the store (flat K and V buffers of shape
[cells, 1, d]) in FlashInfer's metadata layout with page size 1: sequence s = request *
Hkv + kv_head has the store cells kv_indices[kv_indptr[s]:kv_indptr[s + 1]]. The G query
heads of the group attend together, so a program reads each key block once for all of
them. Every query token of a request sees the whole prefix (decode: one token; extend: all
q_len tokens): the causal part, over the request's own tokens, is the inner backend's, and
the two are merged by LSE (`attention_states.merge_attention_states`).

Like FlashInfer's wrappers, `CompressedPrefixAttention.plan` builds the metadata and the
split plan once per batch and `run` is called per layer. kv_indptr may hold one row per
layer ([L, B * Hkv + 1], absolute offsets into one kv_indices): lengths differ per layer
under LAVa, and the split plan, made for the longest layer of every sequence, serves all.

Split-K: a sequence is cut into chunks of `keys_per_split` keys, one program each, so that
batch 1 with a 32K-token document still fills the GPU; `_merge_splits_kernel` combines the
chunks by their LSE. With a single split per sequence the kernel writes the output directly.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from lava_sglang.checks import is_int, is_number
from lava_sglang.kernels import launch
from lava_sglang.kernels.attention_states import attention_with_lse

BLOCK_KEYS = 64
MAX_BLOCK_ROWS = 64
# `_merge_splits_kernel` holds all of a row's splits in one [splits, d] tile: past a few hundred
# the tile no longer compiles into registers (Triton refuses tiles of over 2**20 elements
# outright). The default plans stay far below: at most 64 splits (`launch.split_size`), 16
# for `PoolPrefixAttention`.
MAX_SPLITS = 256


@triton.jit
def request_rows(qo_indptr_ptr, seq, num_kv_heads, group):
    """Sequence `seq` = request * Hkv + KV head: its request, KV head, first query token and
    query rows (tokens x the group's query heads)."""
    request = seq // num_kv_heads
    q_start = tl.load(qo_indptr_ptr + request)
    return request, seq % num_kv_heads, q_start, (tl.load(qo_indptr_ptr + request + 1) - q_start) * group


@triton.jit
def empty_state(BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """The running max, sum and output before any key."""
    return (tl.full([BLOCK_M], float("-inf"), tl.float32), tl.zeros([BLOCK_M], tl.float32),
            tl.zeros([BLOCK_M, BLOCK_D], tl.float32))


@triton.jit
def query_rows(q_ptr, q_start, num_rows, row_tile, kv_head, group, stride_qt, stride_qh,
               HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """A program's query rows, (token, member of the KV head's group) token major: their q
    [BLOCK_M, BLOCK_D], tokens, query heads and validity."""
    rows = row_tile * BLOCK_M + tl.arange(0, BLOCK_M)
    row_valid = rows < num_rows
    tokens = (q_start + rows // group).to(tl.int64)
    heads = kv_head * group + rows % group
    dims = tl.arange(0, BLOCK_D)
    q = tl.load(q_ptr + tokens[:, None] * stride_qt + heads[:, None] * stride_qh + dims[None, :],
                mask=row_valid[:, None] & (dims < HEAD_DIM)[None, :], other=0.0)
    return q, tokens, heads, row_valid


@triton.jit
def online_softmax_step(q, k, v, key_valid, row_max, row_sum, acc, sm_scale):
    """Fold one block of keys and values into the running max, sum and output (flash
    attention). A block has at least one valid key, so row_max is finite after the first and
    the rescaling never sees -inf - -inf."""
    logits = launch.dot(q, tl.trans(k)) * sm_scale
    logits = tl.where(key_valid[None, :], logits, float("-inf"))
    new_max = tl.maximum(row_max, tl.max(logits, axis=1))
    rescale = tl.exp(row_max - new_max)
    probs = tl.exp(logits - new_max[:, None])
    row_sum = row_sum * rescale + tl.sum(probs, axis=1)
    # As in FlashAttention: probabilities in the value dtype, products accumulated in fp32.
    acc = acc * rescale[:, None] + launch.dot(probs.to(v.dtype), v)
    return new_max, row_sum, acc


@triton.jit
def store_state(out_ptr, lse_ptr, split, tokens, heads, row_valid, row_max, row_sum, acc,
                stride_os, stride_ot, stride_oh, stride_ls, stride_lt, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """Write a chunk's normalised output and LSE; an empty chunk (row_max = -inf, row_sum = 0)
    gives out 0 and lse -inf."""
    dims = tl.arange(0, BLOCK_D)
    nonzero_sum = tl.where(row_sum > 0, row_sum, 1.0)
    out = acc / nonzero_sum[:, None]
    lse = row_max + tl.log(nonzero_sum)
    tl.store(out_ptr + split * stride_os + tokens[:, None] * stride_ot + heads[:, None] * stride_oh + dims[None, :],
             out.to(out_ptr.dtype.element_ty), mask=row_valid[:, None] & (dims < HEAD_DIM)[None, :])
    tl.store(lse_ptr + split * stride_ls + tokens * stride_lt + heads, lse, mask=row_valid)


@triton.jit
def _prefix_attention_kernel(
    q_ptr, k_ptr, v_ptr, qo_indptr_ptr, kv_indptr_ptr, kv_indices_ptr, work_seq_ptr, work_split_ptr,
    out_ptr, lse_ptr,
    stride_qt, stride_qh, stride_kcell, stride_vcell,
    stride_os, stride_ot, stride_oh, stride_ls, stride_lt,
    num_kv_heads, group, keys_per_split, sm_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    work = tl.program_id(0)
    row_tile = tl.program_id(1)
    seq = tl.load(work_seq_ptr + work)
    split = tl.load(work_split_ptr + work).to(tl.int64)  # offsets into the partial buffers can pass 2**31
    _, kv_head, q_start, num_rows = request_rows(qo_indptr_ptr, seq, num_kv_heads, group)
    if row_tile * BLOCK_M >= num_rows:
        return
    q, tokens, heads, row_valid = query_rows(q_ptr, q_start, num_rows, row_tile, kv_head, group, stride_qt,
                                             stride_qh, HEAD_DIM, BLOCK_M, BLOCK_D)
    dims = tl.arange(0, BLOCK_D)
    dim_valid = dims < HEAD_DIM
    row_max, row_sum, acc = empty_state(BLOCK_M, BLOCK_D)
    start = tl.load(kv_indptr_ptr + seq) + split * keys_per_split
    end = tl.minimum(start + keys_per_split, tl.load(kv_indptr_ptr + seq + 1))
    for key_start in range(start, end, BLOCK_N):
        positions = key_start + tl.arange(0, BLOCK_N)
        key_valid = positions < end
        cells = tl.load(kv_indices_ptr + positions, mask=key_valid, other=0).to(tl.int64)
        kv_mask = key_valid[:, None] & dim_valid[None, :]
        k = tl.load(k_ptr + cells[:, None] * stride_kcell + dims[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_ptr + cells[:, None] * stride_vcell + dims[None, :], mask=kv_mask, other=0.0)
        row_max, row_sum, acc = online_softmax_step(q, k, v, key_valid, row_max, row_sum, acc, sm_scale)
    store_state(out_ptr, lse_ptr, split, tokens, heads, row_valid, row_max, row_sum, acc,
                stride_os, stride_ot, stride_oh, stride_ls, stride_lt, HEAD_DIM, BLOCK_D)


@triton.jit
def _merge_splits_kernel(
    partial_out_ptr, partial_lse_ptr, out_ptr, lse_ptr, token_request_ptr, num_splits_ptr,
    stride_ps, stride_pt, stride_ph, stride_pls, stride_plt, stride_ot, stride_oh, stride_lt,
    num_kv_heads, group,
    HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    request = tl.load(token_request_ptr + token)
    num_splits = tl.load(num_splits_ptr + request * num_kv_heads + head // group)
    splits = tl.arange(0, BLOCK_S).to(tl.int64)  # offsets into the partial buffers can pass 2**31
    split_valid = splits < num_splits
    dims = tl.arange(0, BLOCK_D)
    dim_valid = dims < HEAD_DIM
    lse = tl.load(partial_lse_ptr + splits * stride_pls + token * stride_plt + head, mask=split_valid,
                  other=float("-inf"))
    top = tl.max(lse, axis=0)
    weights = tl.exp(lse - tl.where(top == float("-inf"), 0.0, top))
    total = tl.sum(weights, axis=0)
    partial = tl.load(partial_out_ptr + splits[:, None] * stride_ps + token * stride_pt + head * stride_ph
                      + dims[None, :], mask=split_valid[:, None] & dim_valid[None, :], other=0.0)
    # Every split empty: top = -inf and total = 0, so out 0 and lse -inf.
    nonzero_total = tl.where(total > 0, total, 1.0)
    out = tl.sum(weights[:, None] * partial, axis=0) / nonzero_total
    tl.store(out_ptr + token * stride_ot + head * stride_oh + dims, out.to(out_ptr.dtype.element_ty), mask=dim_valid)
    tl.store(lse_ptr + token * stride_lt + head, top + tl.log(nonzero_total))


def _host_index(name: str, tensor: object, dims: tuple[int, ...]) -> torch.Tensor:
    if not isinstance(tensor, torch.Tensor) or tensor.dim() not in dims or tensor.dtype not in launch.INDEX_DTYPES:
        shape = list(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
        dtype = tensor.dtype if isinstance(tensor, torch.Tensor) else ""
        raise ValueError(f"{name} must be an int32/int64 tensor with {' or '.join(map(str, dims))} dims, "
                         f"got {dtype} {shape}")
    return tensor.detach().to("cpu", torch.int64)


INT32_MAX = 2**31 - 1


def _device_int32(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    return tensor.to(device=device, dtype=torch.int32).contiguous()


def check_positive_ints(**values) -> None:
    for name, value in values.items():
        if not is_int(value) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")


def set_heads(attention, num_q_heads: int, num_kv_heads: int, head_dim: int, sm_scale: float | None) -> None:
    """Check and set what both prefix attentions share: head counts, the GQA group, head dim
    and softmax scale (1/sqrt(d) by default)."""
    check_positive_ints(num_q_heads=num_q_heads, num_kv_heads=num_kv_heads, head_dim=head_dim)
    if num_q_heads % num_kv_heads:
        raise ValueError(f"num_q_heads={num_q_heads} must be a multiple of num_kv_heads={num_kv_heads}")
    attention.num_q_heads = num_q_heads
    attention.num_kv_heads = num_kv_heads
    attention.group = num_q_heads // num_kv_heads
    attention.head_dim = head_dim
    if sm_scale is not None and not (is_number(sm_scale) and 0 < sm_scale < math.inf):
        raise ValueError(f"sm_scale must be a finite number > 0 (or None: 1/sqrt(head_dim)), got {sm_scale!r}")
    attention.sm_scale = 1.0 / math.sqrt(head_dim) if sm_scale is None else float(sm_scale)


class CompressedPrefixAttention:
    """Batched attention over compressed prefixes: `plan` once per batch, `run` per layer.

    >>> attention = CompressedPrefixAttention(num_q_heads=32, num_kv_heads=8, head_dim=128)
    >>> attention.plan(qo_indptr, kv_indptr, kv_indices)
    >>> out, lse = attention.run(q, k_store, v_store, layer=layer)
    """

    def __init__(self, num_q_heads: int, num_kv_heads: int, head_dim: int, *, sm_scale: float | None = None):
        set_heads(self, num_q_heads, num_kv_heads, head_dim, sm_scale)
        self._planned = False

    def plan(self, qo_indptr: torch.Tensor, kv_indptr: torch.Tensor, kv_indices: torch.Tensor, *,
             keys_per_split: int | None = None) -> None:
        """Build the metadata and the split plan of one batch (reads its index tensors on the
        host, a few synchronisations per batch: not for CUDA-graph capture).

        qo_indptr: int [B + 1], request b's query tokens are rows qo_indptr[b]:qo_indptr[b + 1]
            of q (decode: arange(B + 1)).
        kv_indptr: int [B * Hkv + 1], or [L, B * Hkv + 1] with one row per layer; sequence
            s = b * Hkv + kv_head reads store cells kv_indices[kv_indptr[s]:kv_indptr[s + 1]].
        kv_indices: int [nnz] store cells, on the device the kernels run on.
        keys_per_split: keys per program (default: enough splits to fill the device).
        """
        launch.check_tensor("kv_indices", kv_indices, 1, launch.INDEX_DTYPES)
        device = kv_indices.device
        qo = _host_index("qo_indptr", qo_indptr, (1,))
        kv = _host_index("kv_indptr", kv_indptr, (1, 2))
        kv = kv[None] if kv.dim() == 1 else kv
        num_requests = qo.numel() - 1
        num_seqs = num_requests * self.num_kv_heads
        if num_requests < 1 or qo[0] != 0 or bool((qo.diff() < 0).any()):
            raise ValueError(f"qo_indptr must start at 0, be non-decreasing and have B + 1 >= 2 entries, "
                             f"got {qo.tolist()}")
        if kv.shape[1] != num_seqs + 1 or kv.shape[0] < 1:
            raise ValueError(f"kv_indptr must have B * Hkv + 1 = {num_seqs + 1} entries per layer "
                             f"(one sequence per request and KV head), got shape {list(kv_indptr.shape)}")
        if bool((kv.diff(dim=1) < 0).any()) or int(kv.min()) < 0 or int(kv.max()) > kv_indices.numel():
            raise ValueError(f"kv_indptr rows must be non-decreasing offsets into kv_indices "
                             f"(length {kv_indices.numel()})")
        if kv_indices.numel() > INT32_MAX:  # the kernels read int32 offsets: a larger one would wrap
            raise ValueError(f"kv_indices has {kv_indices.numel()} entries; the kernels index at most {INT32_MAX}")
        if kv_indices.numel() and int(kv_indices.min()) < 0:
            raise ValueError("kv_indices must be >= 0")
        if kv_indices.numel() and int(kv_indices.max()) > INT32_MAX:
            raise ValueError(f"kv_indices holds {int(kv_indices.max())}; the kernels read cells by int32 index, "
                             f"at most {INT32_MAX}")
        if keys_per_split is not None and (not is_int(keys_per_split) or keys_per_split < 1):
            raise ValueError(f"keys_per_split must be None or an int >= 1, got {keys_per_split!r}")

        q_lens = qo.diff()
        longest = kv.diff(dim=1).amax(dim=0)  # per sequence, over layers
        rows = q_lens.repeat_interleave(self.num_kv_heads) * self.group
        self._block_m = min(MAX_BLOCK_ROWS, launch.block_size(int(rows.max())))
        row_tiles = (rows + self._block_m - 1) // self._block_m
        if keys_per_split is None:
            keys_per_split = launch.split_size(int((longest * row_tiles).sum()), int(longest.max()),
                                               launch.programs_to_fill(device), BLOCK_KEYS)
        splits = ((longest + keys_per_split - 1) // keys_per_split).clamp_min(1)
        max_splits = int(splits.max())
        if max_splits > MAX_SPLITS:
            raise ValueError(f"keys_per_split={keys_per_split} cuts a {int(longest.max())}-key sequence into "
                             f"{max_splits} splits; the merge takes at most {MAX_SPLITS}")

        # One program per (sequence, chunk): work item i is chunk work_split[i] of work_seq[i].
        work_seq = torch.arange(num_seqs).repeat_interleave(splits)
        first_work_of_seq = (splits.cumsum(0) - splits).repeat_interleave(splits)
        work_split = torch.arange(work_seq.numel()) - first_work_of_seq
        self._qo_indptr = _device_int32(qo, device)
        self._kv_indptr = _device_int32(kv, device)
        self._kv_indices = _device_int32(kv_indices, device)
        self._work_seq = _device_int32(work_seq, device)
        self._work_split = _device_int32(work_split, device)
        self._num_splits = _device_int32(splits, device)
        self._token_request = _device_int32(torch.arange(num_requests).repeat_interleave(q_lens), device)
        self._row_tiles = max(int(row_tiles.max()), 1)
        self._max_splits = max_splits
        self._keys_per_split = keys_per_split
        self._num_tokens = int(qo[-1])
        self._max_index = int(kv_indices.max()) if kv_indices.numel() else -1
        self._planned = True

    @property
    def num_layers(self) -> int:
        self._require_plan()
        return self._kv_indptr.shape[0]

    @property
    def max_splits(self) -> int:
        """Most chunks any sequence is cut into (1: no split-K)."""
        self._require_plan()
        return self._max_splits

    def _require_plan(self) -> None:
        if not self._planned:
            raise ValueError("call plan() before run()")

    def _check_run_inputs(self, q: torch.Tensor, k_store: torch.Tensor, v_store: torch.Tensor, layer: int) -> None:
        self._require_plan()
        launch.check_tensor("q", q, 3, launch.FLOAT_DTYPES)
        expected = (self._num_tokens, self.num_q_heads, self.head_dim)
        if tuple(q.shape) != expected:
            raise ValueError(f"q must be [tokens, Hq, d] = {list(expected)} (tokens from qo_indptr), "
                             f"got {list(q.shape)}")
        for name, store in (("k_store", k_store), ("v_store", v_store)):
            launch.check_tensor(name, store, 3, launch.FLOAT_DTYPES)
            if store.shape[1:] != (1, self.head_dim) or store.shape[0] <= self._max_index:
                raise ValueError(f"{name} must be [cells > {self._max_index} (largest kv_index), 1, "
                                 f"d={self.head_dim}], got {list(store.shape)}")
            if store.dtype != q.dtype:
                raise ValueError(f"{name} must have q's dtype {q.dtype}, got {store.dtype}")
            launch.check_rows_contiguous(name, store)
        launch.check_rows_contiguous("q", q)
        launch.check_same_device(q=q, k_store=k_store, v_store=v_store, kv_indices=self._kv_indices)
        launch.check_triton_device(q.device)
        if not is_int(layer) or not 0 <= layer < self.num_layers:
            raise ValueError(f"layer must be an int in [0, {self.num_layers}), got {layer!r}")

    def run(self, q: torch.Tensor, k_store: torch.Tensor, v_store: torch.Tensor, *,
            layer: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Attention of q over the planned compressed prefixes of one layer.

        q: [tokens, Hq, d]; k_store, v_store: [cells, 1, d], q's dtype. Returns out
        [tokens, Hq, d] in q's dtype and lse [tokens, Hq] fp32 (natural log); a sequence
        with no rows gives out = 0, lse = -inf.
        """
        self._check_run_inputs(q, k_store, v_store, layer)
        num_tokens = self._num_tokens
        out = torch.empty(num_tokens, self.num_q_heads, self.head_dim, dtype=q.dtype, device=q.device)
        lse = torch.empty(num_tokens, self.num_q_heads, dtype=torch.float32, device=q.device)
        if num_tokens == 0:
            return out, lse
        if self._max_splits == 1:
            partial_out, partial_lse = out[None], lse[None]
        else:
            partial_out = torch.empty(self._max_splits, *out.shape, dtype=torch.float32, device=q.device)
            partial_lse = torch.empty(self._max_splits, *lse.shape, dtype=torch.float32, device=q.device)
        block_d = launch.block_size(self.head_dim)
        _prefix_attention_kernel[launch.checked_grid(self._work_seq.numel(), self._row_tiles)](
            q, k_store, v_store, self._qo_indptr, self._kv_indptr[layer], self._kv_indices,
            self._work_seq, self._work_split, partial_out, partial_lse,
            q.stride(0), q.stride(1), k_store.stride(0), v_store.stride(0),
            partial_out.stride(0), partial_out.stride(1), partial_out.stride(2),
            partial_lse.stride(0), partial_lse.stride(1),
            self.num_kv_heads, self.group, self._keys_per_split, self.sm_scale,
            HEAD_DIM=self.head_dim, BLOCK_M=self._block_m, BLOCK_N=BLOCK_KEYS, BLOCK_D=block_d,
            num_warps=launch.TILE_NUM_WARPS,
        )
        if self._max_splits > 1:
            _merge_splits_kernel[launch.checked_grid(num_tokens, self.num_q_heads)](
                partial_out, partial_lse, out, lse, self._token_request, self._num_splits,
                partial_out.stride(0), partial_out.stride(1), partial_out.stride(2),
                partial_lse.stride(0), partial_lse.stride(1), out.stride(0), out.stride(1), lse.stride(0),
                self.num_kv_heads, self.group,
                HEAD_DIM=self.head_dim, BLOCK_S=launch.block_size(self._max_splits, minimum=1), BLOCK_D=block_d,
            )
        return out, lse


def paged_attention_reference(
    q: torch.Tensor, qo_indptr: torch.Tensor, num_kv_heads: int, sm_scale: float | None, rows_of_sequence,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense torch attention of each request's query tokens over one key set per (request, KV
    head), the layout both prefix-attention kernels read: `rows_of_sequence(request, kv_head)`
    gives that sequence's keys and values ([S, d] each, S >= 0). Out in fp32; a sequence with
    no keys gives out 0 and lse -inf."""
    num_tokens, num_q_heads, head_dim = q.shape
    group = num_q_heads // num_kv_heads
    scale = 1.0 / math.sqrt(head_dim) if sm_scale is None else sm_scale
    qo = qo_indptr.tolist()
    out = torch.zeros(num_tokens, num_q_heads, head_dim, dtype=torch.float32, device=q.device)
    lse = torch.full((num_tokens, num_q_heads), float("-inf"), dtype=torch.float32, device=q.device)
    visible = torch.ones(1, dtype=torch.bool, device=q.device)
    for request in range(len(qo) - 1):
        tokens = slice(qo[request], qo[request + 1])
        for kv_head in range(num_kv_heads):
            keys, values = rows_of_sequence(request, kv_head)
            heads = slice(kv_head * group, (kv_head + 1) * group)
            query = q[tokens, heads].transpose(0, 1)[None, None]  # [1, 1, G, T, d]
            seq_out, seq_lse = attention_with_lse(query, keys[None, None], values[None, None], visible, scale)
            out[tokens, heads] = seq_out[0, 0].transpose(0, 1)
            lse[tokens, heads] = seq_lse[0, 0].transpose(0, 1)
    return out, lse


def prefix_attention_reference(
    q: torch.Tensor,
    k_store: torch.Tensor,
    v_store: torch.Tensor,
    qo_indptr: torch.Tensor,
    kv_indptr: torch.Tensor,
    kv_indices: torch.Tensor,
    *,
    num_kv_heads: int,
    sm_scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`CompressedPrefixAttention.run` for one layer (kv_indptr [B * Hkv + 1]) with dense
    torch attention per (request, KV head); out in fp32."""
    kv = kv_indptr.tolist()

    def rows_of_sequence(request: int, kv_head: int) -> tuple[torch.Tensor, torch.Tensor]:
        seq = request * num_kv_heads + kv_head
        cells = kv_indices[kv[seq]:kv[seq + 1]].long()
        return k_store[cells, 0], v_store[cells, 0]

    return paged_attention_reference(q, qo_indptr, num_kv_heads, sm_scale, rows_of_sequence)
