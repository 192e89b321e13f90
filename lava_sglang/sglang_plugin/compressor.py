"""Observation capture and prefix compression, on plain tensors.

`WindowCapture` keeps, for each request whose window the cache will read (a fork commit, a
branch of a waiting prefix, a request cut to observe a shared prefix) and whose prefill is
long enough to be worth compressing, the post-RoPE queries of its last `window` tokens at
every layer (across chunked-prefill chunks). `plan_prefix` turns those queries and the prefix's K/V, read in
place from the KV pool, into the rows each (layer, KV head) keeps; `store.write_kept` copies
them into the store's cells.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch

from lava_sglang.policy import Branches, HeadShard, ObservationWindow, PlanBuilder, Policy, Reconstruct, WindowPolicy


@dataclass
class _CapturedQueries:
    end: int  # sequence position after the last captured query
    queries: torch.Tensor  # [rows <= window, Hq, d]


@dataclass
class _CapturedLayer:
    head: _CapturedQueries  # the first `window` queries of the request's first extend
    tail: _CapturedQueries  # the last `window` queries seen so far


class WindowCapture:
    """Window queries of long prefills, per request slot (`req_pool_idx`) and layer.

    Two windows per request: the tail (the last `window` queries, across chunked-prefill
    chunks) observes a prefix that ends where the request's prompt ends; the head (the first
    `window` queries the request computes, across chunks too: SGLang may give a request a
    first chunk of whatever room the batch has left) observes a shared prefix whose last
    `window` tokens the request was made to recompute (`--kv-compress-on shared`).
    """

    def __init__(self, window: int, min_prefix: int):
        self.window = window
        self.min_prefix = min_prefix
        self._slots: dict[int, dict[int, _CapturedLayer]] = {}
        # Request id -> request, for the requests whose windows the cache will read; weak, so a
        # request dropped before it is released (aborted while waiting) leaves nothing behind.
        self._observed: weakref.WeakValueDictionary = weakref.WeakValueDictionary()

    def observe(self, req, wanted: bool) -> None:
        """Capture the request's window queries from its next extend on, or not (any other
        request's would be held, unread, until its release)."""
        if wanted:
            self._observed[req.rid] = req
        else:
            self._observed.pop(req.rid, None)

    def rows_to_record(self, rid: str, prefix_len: int, extend_len: int) -> int:
        """How many of an extend's queries, from its first, to record: an observed request's up
        to its prompt's end, where every window the cache reads ends; 0 for any other, and for
        a prompt too short to be compressed. Every chunk of a chunked prefill counts, the first
        ones too: a last chunk shorter than the window joins the tail of the one before. What
        comes after the prompt (a decode step run in an extend batch by --enable-mixed-chunk, a
        retracted request's output prefilled again) would move the tail past it."""
        req = self._observed.get(rid)
        if req is None or len(req.origin_input_ids) < self.min_prefix:
            return 0
        return max(0, min(extend_len, len(req.origin_input_ids) - prefix_len))

    def record(self, layer: int, req_pool_idx: int, start: int, queries: torch.Tensor) -> None:
        """Queries [tokens, Hq, d] of positions start .. start + tokens - 1."""
        layers = self._slots.setdefault(req_pool_idx, {})
        end = start + queries.shape[0]
        tail = queries[-self.window:]
        previous = layers.get(layer)
        if previous is None:
            head = queries[:self.window]
            layers[layer] = _CapturedLayer(head=_CapturedQueries(start + head.shape[0], head.detach().clone()),
                                           tail=_CapturedQueries(end, tail.detach().clone()))
            return
        if previous.tail.end == start and tail.shape[0] < self.window:
            tail = torch.cat([previous.tail.queries, tail])[-self.window:]  # a chunk shorter than the window
        previous.tail = _CapturedQueries(end, tail.detach().clone())
        missing = self.window - previous.head.queries.shape[0]
        if previous.head.end == start and missing > 0:  # a first chunk shorter than the window
            head = torch.cat([previous.head.queries, queries[:missing]])
            previous.head = _CapturedQueries(start + min(missing, queries.shape[0]), head.detach().clone())

    def window_queries(self, req_pool_idx: int, seq_len: int, num_layers: int,
                       rows: int | None = None) -> list[torch.Tensor] | None:
        """Per layer [Hq, rows, d]: the queries of the last `rows` (default min(window, seq_len))
        positions before `seq_len`, or None when a layer's capture does not cover them."""
        layers = self._slots.get(req_pool_idx, {})
        rows = min(self.window, seq_len) if rows is None else rows
        windows = []
        for layer in range(num_layers):
            captured = layers.get(layer)
            covering = [window for window in (captured.tail, captured.head) if window.end == seq_len
                        and window.queries.shape[0] >= rows] if captured is not None else []
            if not covering:
                return None
            windows.append(covering[0].queries[-rows:].transpose(0, 1))
        return windows

    def drop(self, req) -> None:
        """Forget a released request's windows."""
        self._slots.pop(req.kv.req_pool_idx, None)
        self._observed.pop(req.rid, None)

    def clear(self) -> None:
        self._slots.clear()
        self._observed.clear()


def plan_prefix(policy: Policy, budget: float | int, window_queries: list[torch.Tensor], k_buffers, v_buffers,
                slots: torch.Tensor, keep_len: int, branch_windows: list[list[ObservationWindow]] | None = None,
                repeat_attention: list[torch.Tensor] | None = None, use_kernel: bool | None = None,
                head_shard: HeadShard | None = None) -> list[list[torch.Tensor]]:
    """Kept positions per (layer, KV head) among the first `keep_len` tokens of a prefix.

    The plan is made over all n = len(slots) tokens (the observation window ends at the last
    one). A fork prefix keeps n - 1 of them: a request matching the prefix recomputes its
    last token (SGLang matches at most n - 1 tokens of a prompt). `branch_windows` (per
    layer, one window per branch that ran after the whole prefix) adds the branches' votes
    to the tail's (observe "branches", docs/observe.md); `repeat_attention` (per layer
    [Hq, m], a repetition's attention on the prefix) replaces the windows (observe
    "reconstruct"). With `use_kernel` (default: on CUDA) the tail window's attention mass is
    the Triton `window_statistics` kernel's, read in place from the pool; the policy then
    turns it into scores as it does the torch mass. With `head_shard` (tensor parallel) the
    pool holds this rank's KV heads, and the plan is the single-process plan's rows for them.
    """
    seq_len = slots.numel()
    num_kv_heads = k_buffers[0].shape[1]
    use_kernel = slots.is_cuda if use_kernel is None else use_kernel
    observe = Reconstruct() if repeat_attention else Branches() if branch_windows else "tail"
    builder = PlanBuilder(policy, budget, seq_len=seq_len, num_layers=len(k_buffers), num_kv_heads=num_kv_heads,
                          observe=observe, head_shard=head_shard)
    for layer, queries in enumerate(window_queries):
        values = v_buffers[layer][slots].transpose(0, 1).float()
        if repeat_attention:
            builder.add_layer_repeat(repeat_attention[layer], values)
            continue
        if branch_windows:
            keys = k_buffers[layer][slots].transpose(0, 1).float()
            builder.add_layer_windows([ObservationWindow(queries.float()), *branch_windows[layer]], keys, values)
        elif use_kernel and builder.needs_queries and isinstance(policy, WindowPolicy):
            from lava_sglang.kernels.window_stats import window_statistics

            mass = window_statistics(queries, k_buffers[layer], v_buffers[layer], slots,
                                     gqa_reduce=policy.gqa_reduce).mass
            builder.add_layer_scores(policy.scores_from_mass(mass, values))
        else:
            builder.add_layer(queries.float(), k_buffers[layer][slots].transpose(0, 1).float(), values)
    plan = builder.finish()
    return [[positions[positions < keep_len] for positions in heads] for heads in plan.kept]
