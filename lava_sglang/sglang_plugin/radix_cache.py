"""The radix cache SGLang runs with a policy on (`--radix-cache-backend lava`): what gets
compressed, and when.

The tree with compressed nodes, its accounting and eviction are `compressed_tree.py`; this
class adds the triggers and the observation. A fork commit (`_is_fork_prefix`: a prompt of at
least `min_prefix` tokens with max_new_tokens=0 and no logprobs, what a frontend program
sends before `fork()`) is compressed when it is released, by its tail window, or after it has
waited (`pending.py`) for what observes it. A commit of a prefix already in the tree
recomputes its last `window` tokens, so that it has a tail window.

With `--kv-compress-on shared`, a prompt prefix of at least `min_prefix` tokens that a
second request matches in the ordinary tree is compressed too: that request's match is cut
`window` tokens short, so it recomputes the prefix's last `window` tokens (their queries are
the observation window); when it finishes, the whole shared prefix becomes a compressed node,
the ordinary nodes below it move under that node, and the full-length copy is freed.

With `--kv-observe branches`, a fork prefix is not compressed when it is committed: it
waits (`PendingPrefix`, at most `--kv-observe-wait` seconds) while the forked branches run
on the full prefix; each branch leaves its observation window (its last tokens' queries and
its own keys) when it is released, and once no request runs on the prefix any more it is
compressed with the tail's and the branches' windows combined (docs/observe.md). Requests
after that read the compressed copy. The wait pins nothing: the full prefix stays an
ordinary evictable node, and a pending prefix that was evicted meanwhile is forgotten (its
last token alone does not count: the compressed copy does not hold it).
With `--kv-observe reconstruct` a committed fork prefix waits the same way for its
repetition, one internal request per chunk of the prefix (`repetition.py`), whose attention
scores it; each chunk's own tokens are freed as soon as its request is released.

A prefix is compressed only while no request runs on its full copy (otherwise a later
request retries), so a compressed node never coexists with its own full-length copy: after
a compression, an ordinary match of the prefix is shorter than the compressed one, and
match and insert take the same path. (A request cut to recompute the prefix's window holds
the copy's ancestor at the cut; what the compression left there goes when it is released,
`_free_superseded_copy`.) A request that held only an ancestor of the prefix (a
chunked prefill's first chunk, a shared chat header) and computed the rest itself moves to
the compressed copy at its next checkpoint (`checkpoint`).
"""

from __future__ import annotations

import logging
import time
import uuid
import weakref
from collections import deque
from functools import partial

import torch

from lava_sglang.policy import ObservationWindow, PlanRefused, resolve_budget
from lava_sglang.sglang_plugin.compressed_tree import CompressedNode, CompressedRadixCache, prompt_key
from lava_sglang.sglang_plugin.compressor import WindowCapture, plan_prefix
from lava_sglang.sglang_plugin.config import (BRANCHES, DEFERRED_OBSERVE_SOURCES, FORK, MAX_BRANCH_OWN_TOKENS,
                                              MAX_BRANCH_WINDOW_BYTES, MAX_PENDING_PREFIXES, RECONSTRUCT, SHARED,
                                              KvPolicyConfig)
from lava_sglang.sglang_plugin.metrics import StoreMetrics
from lava_sglang.sglang_plugin.pending import PendingPrefix, RepetitionCost
from lava_sglang.sglang_plugin.repetition import RepetitionClient, RepetitionScores
from lava_sglang.sglang_plugin.tensor_parallel import TensorParallel
from lava_sglang.sglang_plugin.touchpoints import (cached_prompt_tokens, has_input_embeddings, radix_cache_api,
                                                   seconds_since_first_forward)
from lava_sglang.store import CellLayout, slots_needed, write_kept

*_, MatchPrefixParams = radix_cache_api()

logger = logging.getLogger(__name__)

MAX_RETIRED_REPETITIONS = 64  # stopped repetitions whose chunk rids are remembered, to free a straggler's tokens


def fork_prefix(full_key):
    """What a fork commit of an n-token prompt compresses: its first n - 1 tokens (a request
    that matches the prefix recomputes its last token: SGLang matches at most n - 1 tokens of
    a prompt)."""
    return full_key[:len(full_key) - 1]


def _rounded(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds, 3)


def _of_prefill(seconds: float | None, prefill_seconds: float | None) -> str:
    """`seconds` as a multiple of the prefix's prefill, for the repetition's log line."""
    if seconds is None:
        return "not timed"
    if not prefill_seconds:
        return "the prefix's prefill was not timed"
    return f"{seconds / prefill_seconds:.2f}x the prefix's prefill"


class LavaRadixCache(CompressedRadixCache):
    def __init__(self, params, *, config: KvPolicyConfig, kv_pool, metrics: StoreMetrics | None = None,
                 repetition_client: RepetitionClient | None = None, tensor_parallel: TensorParallel | None = None):
        self.config = config
        self.repetition_client = repetition_client  # sends the repetitions of --kv-observe reconstruct
        self.tensor_parallel = tensor_parallel  # None, or what the TP ranks exchange to keep the same prefixes
        # The repetitions' request ids: one random base per server (every TP rank must know
        # them, and a client must not guess them), then a count.
        self.repetition_rid_base = uuid.uuid4().hex if tensor_parallel is None else tensor_parallel.from_first_rank(
            uuid.uuid4().hex)
        self._repetition_rid_prefix = f"{self.repetition_rid_base}-"
        self.repetitions_started = 0
        self.policy = config.make_policy()
        self.capture = WindowCapture(config.window, config.min_prefix)
        # A request whose match was cut to observe a shared prefix -> that prefix's key; weak, so
        # a request dropped before it is released (aborted while waiting) leaves nothing behind.
        self.shared_prefix_keys: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        # A request whose match was cut `window` tokens short of a prefix (a fork commit, a shared
        # prefix's sharer) -> (that prefix's key, where it was cut), for `_free_superseded_copy`.
        self.window_cuts: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self.pending: list[PendingPrefix] = []
        self.repetitions: dict[str, RepetitionScores] = {}  # by chunk request id, while the request may run
        self.retired_repetitions: dict[str, int] = {}  # chunk rid -> prefix length, for stopped repetitions
        self._retirements: deque[list[str]] = deque()  # the rids each stopped repetition left there, oldest first
        self.repetitions_cut_short = 0  # prefixes compressed by their tail because the repetition did not finish
        self.last_repetition: dict | None = None  # the cost of the last repetition that compressed a prefix
        self.repetition_cost = RepetitionCost()
        super().__init__(params, kv_pool=kv_pool, metrics=metrics)

    # ----------------------------------------------------------------- state

    def reset(self):
        for repetition in self._live_repetitions():
            repetition.failed = "the cache was flushed"
            self.retire_repetition(repetition)
        self.capture.clear()
        self.shared_prefix_keys.clear()
        self.window_cuts.clear()
        self.pending = []
        self.repetitions = {}
        self.repetitions_cut_short = 0
        self.last_repetition = None
        self.repetition_cost = RepetitionCost()
        super().reset()

    def stats(self) -> dict:
        """The store's and the repetitions' counters for /server_info (the plugin adds the
        pool's, `touchpoints.pool_counters`)."""
        return {
            **self.store.stats(),
            "pending": len(self.pending),
            "repetitions": len(self._live_repetitions()),
            "repetition_scored": [[scores.num_scored, scores.num_queries] for scores in self._live_repetitions()],
            "repetitions_cut_short": self.repetitions_cut_short,
            "last_repetition": self.last_repetition,
            "repetition_cost": self.repetition_cost.stats(),
        }

    def _repeated_len(self, rid: str) -> int | None:
        """The prefix length a repetition chunk's request repeats, live or stopped; None for others."""
        scores = self.repetitions.get(rid)
        return scores.prefix_len if scores is not None else self.retired_repetitions.get(rid)

    def _live_repetitions(self) -> list[RepetitionScores]:
        """The repetitions under way, each once (`repetitions` is keyed by chunk request id)."""
        return list({id(scores): scores for scores in self.repetitions.values()}.values())

    # -------------------------------------------------------------- matching

    def match_prefix(self, params):
        req = params.req
        if req is not None:  # a shared prefix is recorded afresh at every match (a queued request is matched again)
            self.shared_prefix_keys.pop(req, None)
            self.window_cuts.pop(req, None)
        repeated_len = self._repeated_len(req.rid) if req is not None and isinstance(req.rid, str) else None
        if req is not None:
            self.capture.observe(req, repeated_len is None and self._reads_window_of(req))
        if repeated_len is not None and len(params.key) > repeated_len:
            # A repetition chunk reuses the prefix only: a longer match (a branch's first token
            # can equal the instruction's) would leave repetition queries uncomputed, unscored.
            # A stopped repetition's chunk that still runs is matched alike, as on every TP rank.
            return super().match_prefix(MatchPrefixParams(key=params.key[:repeated_len], req=req))
        if req is not None and self._needs_commit_window(req):
            # A fork commit of a prefix already in the tree (cached by plain requests) would
            # recompute only its last token: it recomputes its last `window`, whose queries observe it.
            cut = max(0, len(req.origin_input_ids) - self.config.window)
            self.window_cuts[req] = (fork_prefix(prompt_key(req)), cut)
            return super().match_prefix(MatchPrefixParams(key=params.key[:cut], req=req))
        result = super().match_prefix(params)
        if req is None or SHARED not in self.config.compress_on or self._pending_of(params.key) is not None:
            return result
        shared_len = result.device_prefix_len
        if (shared_len < self.config.min_prefix or not self.config.evicts(shared_len) or self._is_fork_prefix(req)
                or not self.on_ordinary_path(result.last_device_node)):
            return result
        key = params.key.page_aligned(self.page_size)
        if self._waits_on_path_of(key[:shared_len]):
            return result  # not compressed while a fork prefix that starts with it waits (`_compress_shared_prefix`)
        # Recompute the shared prefix's last `window` tokens: their queries observe it.
        self.shared_prefix_keys[req] = key[:shared_len]
        self.window_cuts[req] = (key[:shared_len], shared_len - self.config.window)
        self.capture.observe(req, True)
        return super().match_prefix(MatchPrefixParams(key=key[:shared_len - self.config.window], req=req))

    def _reads_window_of(self, req) -> bool:
        """Whether the cache will read the request's window queries: a fork commit's tail scores
        (or, under reconstruct, stands in for) its prefix; under branches a branch's window
        observes the prefix it extends (its whole prompt, as `_observe_branch` reads it: the
        key SGLang matches stops short of it), of at most MAX_BRANCH_OWN_TOKENS own tokens (a
        longer one adds no window), among the first MAX_BRANCH_WINDOWS matched, less those
        released or aborted without a window (`PendingPrefix.claim_branch`, which takes the
        place). A request cut to observe a shared prefix is marked where it is cut. Decided
        when a request is matched: one already running when a prefix starts to wait (a
        frontend's branches are sent after the commit) is not a branch."""
        if FORK in self.config.compress_on and self._is_fork_prefix(req):
            return True
        if self.config.observe != BRANCHES:
            return False
        pending = self._windowed_branch_of(prompt_key(req))
        return pending is not None and pending.claim_branch(req.rid)

    def _needs_commit_window(self, req) -> bool:
        """Whether a fork commit must recompute its tail window to be compressed: it is one,
        and its prefix is neither compressed nor waiting. (A policy that reads no attention
        plans from the window's layers too; recomputing `window` tokens is cheaper than a
        second path.)"""
        if FORK not in self.config.compress_on or not self._is_fork_prefix(req):
            return False
        full_key = prompt_key(req)
        return self.compressed_match(fork_prefix(full_key)) is None and not self._is_pending(full_key)

    # ----------------------------------------------------------- compression

    def on_release(self, req, *, checkpointed: bool) -> None:
        repeated_len = None
        try:
            # By this server's random base, which a client cannot guess (it may send "...lava-repeat-..."); a
            # chunk whose repetition is forgotten still is no commit, though max_new_tokens is 0.
            if isinstance(req.rid, str) and req.rid.startswith(self._repetition_rid_prefix):
                repeated_len = self._end_repetition(req, checkpointed)
            elif checkpointed and FORK in self.config.compress_on and self._is_fork_prefix(req):
                # A policy that reads no attention (streamingllm) has nothing to wait for.
                if (self.config.observe in DEFERRED_OBSERVE_SOURCES and self.policy.needs_scores
                        and len(self.pending) < MAX_PENDING_PREFIXES):
                    self._serving_on("keeping a fork prefix for its observation", self._defer_fork_prefix, req)
                else:
                    self._compress_fork_prefix(req)
            elif (checkpointed and FORK in self.config.compress_on and self._is_commit(req)
                  and self._waits_beyond(prompt_key(req))):
                logger.info("lava: prefix of %d tokens not compressed: a longer fork prefix that starts with it waits "
                            "to be observed", len(req.origin_input_ids))
            elif checkpointed and req in self.shared_prefix_keys:
                self._compress_shared_prefix(req, self.shared_prefix_keys[req])
            elif (checkpointed or req.finished()) and self.pending and self.config.observe == BRANCHES:
                self._serving_on("recording a branch's window", partial(self._end_branch, checkpointed=checkpointed),
                                 req)
        finally:
            self.capture.drop(req)
            self.shared_prefix_keys.pop(req, None)
            window_cut = self.window_cuts.pop(req, None)
            super().on_release(req, checkpointed=checkpointed)
        if repeated_len is not None:  # a repetition chunk's tokens go now, before the next chunk is sent
            self.free_beyond(prompt_key(req), repeated_len)
        elif window_cut is not None:
            self._free_superseded_copy(*window_cut)
        if self.pending:
            self._compress_ready_pending()

    def _free_superseded_copy(self, prefix_key, cut_len: int) -> None:
        """A released request whose match was cut at `cut_len` to recompute `prefix_key`'s
        window (a fork commit, a shared prefix's sharer) held the node ending there while
        another one compressed the prefix: that compression freed the full copy only down to
        the held node. Once the prefix itself is compressed, that rest goes too where nothing
        else holds it: a compressed prefix does not keep its own near-full copy beside it."""
        compressed = self.compressed_match(prefix_key)
        if compressed is None or len(compressed.key) != len(prefix_key):
            return
        found = self._walk_ordinary(prefix_key)
        if found is not None and found[1] is not self.root_node and found[0].numel() == cut_len:
            self.free_uncompressed_path(found[1])

    def release_aborted_request(self, handle) -> None:
        """An aborted request (SGLang calls this on every rank, with the request's handle) gives
        back its place among a waiting prefix's captured branches: one dropped from the
        waiting queue (its abort, its timeout, the queue's limit) is never released. A
        repetition chunk dropped so stops its repetition here, on every rank: the thread that
        sends the chunks sees the abort on the first rank only, and the others would wait
        --kv-observe-wait without progress before the ranks agree the prefix is ready."""
        for pending in self.pending:
            pending.release_branch(handle.rid)
        repetition = self.repetitions.get(handle.rid)
        if repetition is not None and repetition.failed is None:
            repetition.failed = f"chunk {handle.rid} was aborted"
            logger.warning("lava: repetition chunk %s of a %d-token prefix was aborted before it ran; the repetition "
                           "stops", handle.rid, repetition.prefix_len)
        super().release_aborted_request(handle)

    def _serving_on(self, step: str, action, req) -> None:
        """`action(req)`, a step of a request's release that copies tensors (the window queries,
        a branch's keys at every layer): a failure (e.g. out of memory) is logged and the step
        skipped, so the scheduler keeps serving: the prefix is observed without that branch's
        window, or a fork prefix not kept for its observation stays uncompressed (a later
        commit of it tries again). With tensor parallel it is raised: the ranks must keep the
        same windows."""
        try:
            action(req)
        except Exception:
            if self.tensor_parallel is not None:
                raise
            logger.exception("lava: %s failed for request %s; skipped", step, req.rid)

    def compress_ready_when_idle(self) -> None:
        """The scheduler is idle (`plugin._before_scheduler_idle`, on its idle turns): a waiting
        prefix that became ready with no request released (its --kv-observe-wait passed with no
        branch, or its repetition failed in the thread that sends it, e.g. a chunk aborted while
        queued) is compressed now, not at the next release. Not under tensor parallel: there the
        ranks agree on readiness by a collective, and their idle loops do not run in step."""
        if self.pending and self.tensor_parallel is None:
            now = time.monotonic()
            if any(pending.ready(now) for pending in self.pending):
                self._compress_ready_pending()

    def _is_fork_prefix(self, req) -> bool:
        """A fork commit to compress: what a frontend program sends before `fork()` (and
        `select()` before scoring its choices), a prompt of at least `min_prefix` tokens with
        max_new_tokens=0 that asks for no logprobs, and whose prefix the budget shrinks. A
        scoring request (`select()`'s, return_logprob) is not one: its prompt is a choice
        appended to the prefix, not the prefix. Nor is a commit that extends a prefix waiting to
        be compressed (a nested `fork()` in a branch): it is a branch of that prefix, which is
        compressed once, and like a commit that extends a compressed prefix it is not compressed
        itself. Nor, in the reverse order, is a commit that a waiting prefix extends: it is
        cached as stock SGLang caches it, as is a commit that parts from a waiting prefix at the
        last token of the shorter of the two (the shorter one's compression would free the
        other's copy; a commit of as many tokens would compress the same n - 1). (Two waiting
        prefixes on one path would undo each other: the shorter one's compression frees what is
        cached below it, the longer one's the shorter's full copy.)"""
        if not (self._is_commit(req) and self.config.evicts(len(req.origin_input_ids) - 1)):
            return False
        if not self.pending:
            return True
        key = prompt_key(req)
        return (self._pending_of(key) is None and not self._waits_beyond(key)
                and not any(pending.shares_fork_prefix(key) for pending in self.pending))

    def _is_commit(self, req) -> bool:
        """Whether the request has the shape of a fork commit (see `_is_fork_prefix`). One given
        embeddings is not: its ids are placeholders."""
        return (req.sampling_params.max_new_tokens == 0 and not req.return_logprob
                and len(req.origin_input_ids) >= self.config.min_prefix and not has_input_embeddings(req))

    def _compress_fork_prefix(self, req) -> None:
        """Compress the first n - 1 tokens of the n-token prefix the request committed."""
        full_key = prompt_key(req)
        if self.already_compressed(fork_prefix(full_key)):
            return
        slots, last_node = self.ordinary_slots(full_key)
        if slots.numel() != len(full_key):
            logger.info("lava: prefix of %d tokens is not in the tree (%d cached); not compressed",
                        len(full_key), slots.numel())
            return
        full_copy = self.fork_prefix_node(last_node)
        if full_copy.lock_ref > 0:
            logger.info("lava: requests still run on the %d-token prefix; compressed when a later one commits it",
                        len(full_key))
            return
        window_queries = self._captured_window(req, len(full_key))
        if window_queries is not None and self._compress_path(fork_prefix(full_key), slots, last_node,
                                                              window_queries) is not None:
            self.free_below(full_copy)  # plain requests' tokens after the document, if it was cached by them
            self.free_uncompressed_path(full_copy)

    # ------------------------------------- observe "branches" and "reconstruct"

    def _is_pending(self, full_key) -> bool:
        """Whether the fork prefix committed as `full_key` waits for what observes it."""
        return any(pending.is_for(full_key) for pending in self.pending)

    def _waits_on_path_of(self, key) -> bool:
        """Whether a prefix waiting to be compressed starts with the whole of `key` (or is it)."""
        return any(pending.starts_with(key) for pending in self.pending)

    def _waits_beyond(self, key) -> bool:
        """Whether a prefix waiting to be compressed starts with the whole of `key` and goes beyond it."""
        return any(pending.extends(key) for pending in self.pending)

    def _pending_of(self, key) -> PendingPrefix | None:
        """The waiting prefix `key` extends (one at most: two never wait on one path, `_is_fork_prefix`)."""
        return next((pending for pending in self.pending if pending.covers(key)), None)

    def _defer_fork_prefix(self, req) -> None:
        """Keep a committed fork prefix's tail window until its branches have run, or (under
        reconstruct) until its repetition has."""
        full_key = prompt_key(req)
        if self.already_compressed(fork_prefix(full_key)) or self._is_pending(full_key):
            return
        tail_queries = self._captured_window(req, len(full_key))
        if tail_queries is None:
            return
        repetition = None
        if self.config.observe == RECONSTRUCT:
            if not self._room_to_compress(full_key):
                return
            repetition = self._start_repetition(req)
            if repetition is None:
                self._compress_fork_prefix(req)  # nothing to wait for: the tail window, now
                return
        # The commit's prefill stands for the prefix's only where it computed most of it: a commit
        # of a document plain requests cached recomputes its window alone, and the repetition's
        # cost would read as hundreds of prefills.
        computed_most = 2 * cached_prompt_tokens(req) <= len(full_key)
        pending = PendingPrefix(full_key, tail_queries, self.config.observe_wait,
                                time.monotonic() + self.config.observe_wait, repetition=repetition,
                                prefill_seconds=seconds_since_first_forward(req) if computed_most else None)
        self.pending.append(pending)
        logger.info("lava: prefix of %d tokens waits for its %s (at most %.0f s)", len(full_key),
                    "repetition" if repetition is not None else "branches", self.config.observe_wait)

    def _room_to_compress(self, full_key) -> bool:
        """Whether the pool could ever hold the fork prefix's compressed copy beside its full
        copy, as a compression needs: a repetition costs about two prefills, and one is not
        started for a prefix that nearly fills the pool (it stays as stock SGLang caches it).
        Everything else in the pool is evictable or finishes, so only the pool's size counts
        here; `_compress` checks the room there is then. The copy's slots, estimated: the plan
        keeps the budget's tokens per layer and KV head on average, and the per-layer
        safeguard's rounding at most half a token more per head, so at most one slot more
        (`slots_needed`: a slot holds one cell per layer and KV head)."""
        slots_estimate = min(len(full_key) - 1, resolve_budget(self.config.budget, len(full_key)) + 1)
        if slots_estimate + len(full_key) <= self.kv_pool.size:
            return True
        logger.warning("lava: a %d-token prefix and its compressed copy (about %d slots) do not fit in the %d-slot "
                       "pool together; no repetition started, kept uncompressed", len(full_key), slots_estimate,
                       self.kv_pool.size)
        return False

    def _start_repetition(self, req) -> RepetitionScores | None:
        """Ask the server to prefill, chunk after chunk, the prefix, a repeat instruction and
        the chunk; None (the caller compresses by the tail) where that cannot be done faithfully."""
        client = self.repetition_client
        reason = None
        if client is None or getattr(req, "tokenizer", None) is None:
            reason = "no server address or tokenizer (--skip-tokenizer-init)"
        elif req.extra_key is not None or req.cache_salt is not None:
            # The repetition is a plain request: it would miss a salted or LoRA prefix.
            reason = "the prefix has a cache salt, extra key or LoRA adapter"
        elif getattr(req, "multimodal_inputs", None) is not None:
            # Its image placeholders are not token ids a plain request can send.
            reason = "the prefix holds multimodal inputs"
        scores = None
        if reason is None:
            try:
                scores = RepetitionScores.plan(
                    req.origin_input_ids, self.config.repetition(),
                    lambda text: req.tokenizer.encode(text, add_special_tokens=False), self.config.window,
                    self.kv_pool.layer_num, getattr(req.tokenizer, "apply_chat_template", None),
                    rid_base=f"{self.repetition_rid_base}-{self.repetitions_started}")
                self.repetitions_started += 1
            except Exception as error:  # a tokenizer failure must not stop the scheduler
                reason = f"the repeat instruction could not be tokenized ({error})"
        if scores is not None and scores.longest_request > client.max_prompt_tokens:
            reason = (f"the prefix and its repetition chunk (--kv-observe-chunk {self.config.observe_chunk}) exceed "
                      f"the longest prompt the server admits, {client.max_prompt_tokens} tokens (the context length "
                      "or the KV pool, less SGLang's margin)")
        if reason is None and self._sends_requests:
            try:
                client.submit(scores)
            except Exception as error:  # e.g. no thread to send it; under tensor parallel the ranks must agree
                if self.tensor_parallel is not None:
                    raise
                reason = f"its chunks could not be sent ({error})"
        if reason is not None:
            logger.warning("lava: no repetition of a %d-token prefix: %s; compressed by its tail",
                           len(req.origin_input_ids), reason)
            return None
        # Registered once sent: the chunks reach this scheduler only after it returns.
        scores.pool_used_at_start = self.pool_used()
        for rid in scores.rids:
            self.repetitions[rid] = scores
        return scores

    @property
    def _sends_requests(self) -> bool:
        """Whether this scheduler sends the repetition's requests (under tensor parallel, one rank does)."""
        return self.tensor_parallel is None or self.tensor_parallel.sends_requests

    def _end_repetition(self, req, checkpointed: bool) -> int | None:
        """A repetition chunk's request was released: the length of the prefix it repeated
        (its own tokens beyond it are to be freed), or None if it is not known any more."""
        scores = self.repetitions.pop(req.rid, None)
        if scores is None:
            return self.retired_repetitions.pop(req.rid, None)  # its repetition was stopped meanwhile
        scores.end_chunk(req.rid, checkpointed, seconds_since_first_forward(req))
        if scores.failed is not None:
            self.retire_repetition(scores)
            logger.warning("lava: repetition of a %d-token prefix stopped (%s)", scores.prefix_len, scores.failed)
        return scores.prefix_len

    def _windowed_branch_of(self, key) -> PendingPrefix | None:
        """The waiting prefix `key` is a branch of, where the branch is short enough to add a
        window: a longer one (a continuation, not a question) would hold its own keys at every
        layer until the compression."""
        pending = self._pending_of(key)
        if pending is None or len(key) - len(pending.full_key) > MAX_BRANCH_OWN_TOKENS:
            return None
        return pending

    def _end_branch(self, req, checkpointed: bool) -> None:
        """A request released for good (finished, not retracted): if it is one of its waiting
        prefix's recorded branches, its window is recorded (where its tokens were cached) and
        its place given back (`PendingPrefix.claim_branch`), so that a branch that leaves no
        window (its output discarded, a chunked prefill aborted) does not keep a later one from
        leaving its own."""
        pending = self._windowed_branch_of(prompt_key(req))
        if pending is None or req.rid not in pending.captured_branch_rids:
            return
        try:
            if checkpointed:
                self._observe_branch(req, pending)
        finally:
            pending.release_branch(req.rid)

    def _observe_branch(self, req, pending: PendingPrefix) -> None:
        """Record the observation window of a released request that ran after the whole of
        `pending`: its last min(window, own tokens) queries and its own tokens' keys."""
        branch_key = prompt_key(req)
        prefix_len = len(pending.full_key)
        slots, _ = self.ordinary_slots(branch_key)
        if slots.numel() != len(branch_key):
            return  # the branch's own tokens are not all in the tree
        own_len = len(branch_key) - prefix_len
        queries = self.capture.window_queries(req.kv.req_pool_idx, len(branch_key), self.kv_pool.layer_num,
                                              rows=min(self.config.window, own_len))
        if queries is None:
            return
        own_slots = slots[prefix_len:]
        fp32_bytes = 4 * sum(layer_queries.numel() + own_len * self.kv_pool.k_buffer[layer][0].numel()
                             for layer, layer_queries in enumerate(queries))
        held_bytes = self._branch_window_bytes()
        if held_bytes + fp32_bytes > MAX_BRANCH_WINDOW_BYTES:
            logger.warning("lava: the waiting prefixes' branch windows hold %.0f MiB, their most (%.0f MiB); a "
                           "branch of a %d-token prefix adds none", held_bytes / 2**20,
                           MAX_BRANCH_WINDOW_BYTES / 2**20, prefix_len)
            pending.branch_refused = True
            return
        pending.branches.append([
            ObservationWindow(layer_queries.float(), self.kv_pool.k_buffer[layer][own_slots].transpose(0, 1).float())
            for layer, layer_queries in enumerate(queries)])

    def _branch_window_bytes(self) -> int:
        """What the waiting prefixes' branch windows hold (queries and own keys, fp32)."""
        return sum(window.queries.nbytes + window.own_keys.nbytes
                   for pending in self.pending for branch in pending.branches for window in branch)

    def _compress_ready_pending(self) -> None:
        """Compress each pending prefix no request runs on any more that has heard from a
        branch or waited long enough; forget those that left the tree."""
        now = time.monotonic()
        waiting = list(self.pending)
        ready = [pending.ready(now) for pending in waiting]
        scored = [pending.repetition is not None and pending.repetition.done for pending in waiting]
        if self.tensor_parallel is not None:  # a rank's clock and its repetition's state: all ranks must agree
            agreed = self.tensor_parallel.all_agree(ready + scored)
            ready, scored = agreed[:len(waiting)], agreed[len(waiting):]
        for pending, is_ready, is_scored in zip(waiting, ready, scored):
            full_key = pending.full_key
            prefix_key = fork_prefix(full_key)
            slots, last_node = self.ordinary_slots(full_key, touch=False)  # waiting is not a use
            if slots.numel() < len(prefix_key) or self.already_compressed(prefix_key):
                logger.info("lava: a %d-token prefix was %s while it waited to be observed%s", len(full_key),
                            "compressed by another path" if slots.numel() >= len(prefix_key) else "evicted",
                            "; its repetition stops" if pending.repetition is not None else "")
                self._forget(pending)
                continue
            # The commit's last token can go alone: where branches that merged it with their
            # questions' first split the tree after it, it is a 1-token leaf, the least recently
            # used. The compressed copy does not hold it; the plan is made over the rest (a tail
            # window's queries are then read as the last of those n - 1 tokens': each one's
            # softmax misses one key, a close approximation for a rare case).
            last_token_evicted = slots.numel() < len(full_key)
            full_copy = last_node if last_token_evicted else self.fork_prefix_node(last_node)
            if full_copy.lock_ref > 0 or not is_ready:
                continue
            repetition = pending.repetition if is_scored else None
            cut_short = pending.repetition is not None and repetition is None
            if cut_short:  # read before _forget, whose abort would be taken for the cause
                stalled = f"no progress within --kv-observe-wait {self.config.observe_wait:g} s"
                if self.tensor_parallel is not None:  # the ranks agreed: the cause may be another rank's
                    stalled = f"stopped on another rank, or {stalled}"
                cut_short_reason = pending.repetition.failed or stalled
            self._forget(pending)
            branch_windows = [[branch[layer] for branch in pending.branches] for layer in range(self.kv_pool.layer_num)]
            repeat_attention = repetition.repeat if repetition is not None else None
            if repeat_attention is not None and last_token_evicted:  # one selectable token fewer
                repeat_attention = [layer_scores[:, :slots.numel() - self.config.window]
                                    for layer_scores in repeat_attention]
            node = self._compress_path(prefix_key, slots, last_node, pending.tail_queries,
                                       branch_windows if pending.branches else None, repeat_attention)
            if node is None:  # not compressed (no room, no row kept, an error: logged): it stays an ordinary
                continue       # prefix, and what is cached below it stays too, as stock SGLang would keep it
            # The full copy goes before anything else runs: an error in the accounting below must
            # not leave the prefix held twice.
            self.free_below(full_copy)
            self.free_uncompressed_path(full_copy)
            if cut_short:  # counted once compressed: a prefix left uncompressed was not compressed by its tail
                self.repetitions_cut_short += 1
                logger.warning("lava: the repetition of a %d-token prefix scored %d of its %d tokens (%s); the prefix "
                               "was compressed by its tail window instead", len(full_key),
                               pending.repetition.num_scored, pending.repetition.num_queries, cut_short_reason)
            if repetition is not None:
                seconds = repetition.ended_at - repetition.first_chunk_at
                self.repetition_cost.add(seconds, pending.prefill_seconds, repetition.forward_seconds)
                self.last_repetition = {"prefix_tokens": repetition.prefix_len, "chunks": len(repetition.chunks),
                                        "tokens_prefilled": repetition.num_queries, "seconds": round(seconds, 3),
                                        "forward_seconds": _rounded(repetition.forward_seconds),
                                        "scoring_seconds": round(repetition.scoring_seconds, 3),
                                        "prefill_seconds": _rounded(pending.prefill_seconds),
                                        "extra_slots_peak": repetition.extra_slots_peak}
                logger.info("lava: prefix %d observed by its repetition: %d tokens prefilled in %d chunk(s), %.2f s "
                            "from its first chunk to its release (%s), %s in its chunks' own forwards (%s), %.0f ms "
                            "of it scoring, at most %d pool slots beyond what was in use when it began",
                            node.entry.entry_id, repetition.num_queries, len(repetition.chunks), seconds,
                            _of_prefill(seconds, pending.prefill_seconds),
                            "n/a" if repetition.forward_seconds is None else f"{repetition.forward_seconds:.2f} s",
                            _of_prefill(repetition.forward_seconds, pending.prefill_seconds),
                            repetition.scoring_seconds * 1e3, repetition.extra_slots_peak)
            else:
                logger.info("lava: prefix %d observed by its tail and %d branch window(s)", node.entry.entry_id,
                            len(pending.branches))

    def _forget(self, pending: PendingPrefix) -> None:
        """Stop waiting for `pending`; a repetition of it still queued or running is aborted."""
        self.pending.remove(pending)
        if pending.repetition is not None:
            self.retire_repetition(pending.repetition)

    def retire_repetition(self, repetition: RepetitionScores) -> None:
        """Stop a repetition: no further chunk is sent, a queued or running one is aborted, and
        a chunk that still runs (an abort can miss a request not yet registered) has its
        tokens freed when it is released. The chunks are sent one after another, each once the
        one before was released, so where this scheduler sends them only the first not yet
        released can run: only its rid is remembered (the others' would never be released, only
        held until their repetition is forgotten). A tensor-parallel rank that does not send them
        remembers them all: the sending rank, whose own scoring may not have failed, goes on
        sending them, and every rank must free their tokens alike. The last
        MAX_RETIRED_REPETITIONS stopped repetitions are remembered, each whole."""
        unreleased = [rid for rid in repetition.rids if self.repetitions.pop(rid, None) is not None]
        if not unreleased:  # stopped already, or every chunk released
            return
        remembered = unreleased[:1] if self._sends_requests else unreleased
        self.retired_repetitions.update(dict.fromkeys(remembered, repetition.prefix_len))
        self._retirements.append(remembered)
        while len(self._retirements) > MAX_RETIRED_REPETITIONS:  # whole repetitions: a rank must not lose part of one
            for rid in self._retirements.popleft():
                self.retired_repetitions.pop(rid, None)
        if self.repetition_client is not None and self._sends_requests:
            self.repetition_client.abort(repetition, remembered)

    def _compress_shared_prefix(self, req, prefix_key) -> None:
        """Compress a prompt prefix the request shared with an earlier one; the ordinary nodes
        below it (the requests' own tokens) move under the compressed node and the full copy
        is freed. Skipped while other requests run on the prefix (a later sharer retries), so
        a compressed prefix never coexists with its own full copy."""
        if self.already_compressed(prefix_key):
            return
        if self._waits_on_path_of(prefix_key):
            # it would move the waiting prefix under a compressed node, where it is not compressed
            logger.info("lava: shared prefix of %d tokens not compressed: a fork prefix below it waits to be "
                        "observed", len(prefix_key))
            return
        if self._pending_of(prefix_key) is not None:
            # it would free the full copy of the waiting prefix it extends, whose branches then match none of it
            logger.info("lava: shared prefix of %d tokens not compressed: a fork prefix it extends waits to be "
                        "observed", len(prefix_key))
            return
        slots, last_node = self.ordinary_slots(prefix_key)
        # Its subtree must be free: the nodes below move under the compressed node, and a lock
        # taken below the full copy would be given back through the compressed one.
        if slots.numel() != len(prefix_key) or last_node.lock_ref > 0:
            logger.info("lava: shared prefix of %d tokens is in use or no longer in the tree; not compressed now",
                        len(prefix_key))
            return
        window_queries = self._captured_window(req, len(prefix_key))
        node = self._compress_path(prefix_key, slots, last_node, window_queries) if window_queries else None
        if node is None:
            return
        for child_key, child in last_node.children.items():
            child.parent = node
            node.children[child_key] = child
        last_node.children = {}
        self._update_leaf_status(node)
        self.free_uncompressed_path(last_node)

    def _captured_window(self, req, seq_len: int) -> list[torch.Tensor] | None:
        window_queries = self.capture.window_queries(req.kv.req_pool_idx, seq_len, self.kv_pool.layer_num)
        if window_queries is None:
            logger.info("lava: observation window of a %d-token prefix was not captured; not compressed", seq_len)
        return window_queries

    def _compress_path(self, prefix_key, slots: torch.Tensor, last_node, window_queries, branch_windows=None,
                       repeat_attention=None) -> CompressedNode | None:
        """Compress `prefix_key` (its KV in `slots`, the path ending at `last_node`) with the
        given windows or repetition scores (`plan_prefix`); None when there is no room, or when
        compressing failed (logged): the prefix stays uncompressed and the scheduler, which
        calls this from a request's release, keeps serving. With tensor parallel a failure is
        raised (the ranks' pools must stay alike), but for a plan every rank refuses alike."""
        self.inc_lock_ref(last_node)  # keep the full prefix while it is read
        try:
            return self._compress(prefix_key, slots, window_queries, branch_windows, repeat_attention)
        except PlanRefused as refusal:
            logger.warning("lava: a %d-token prefix is kept uncompressed: %s", len(prefix_key), refusal)
            return None
        except Exception:
            if self.tensor_parallel is not None:
                raise
            logger.exception("lava: compressing a %d-token prefix failed; it is kept uncompressed", len(prefix_key))
            return None
        finally:
            self.dec_lock_ref(last_node)

    def _compress(self, prefix_key, slots: torch.Tensor, window_queries, branch_windows=None,
                  repeat_attention=None) -> CompressedNode | None:
        started = time.perf_counter()
        if not self.can_store_one_more():
            logger.warning("lava: the store holds %d compressed prefixes, its most, each in use; a %d-token prefix "
                           "is kept uncompressed", len(self.store.entries), slots.numel())
            return None
        k_buffers, v_buffers = self.kv_pool.k_buffer, self.kv_pool.v_buffer
        tensor_parallel = self.tensor_parallel
        kept = plan_prefix(self.policy, self.config.budget, window_queries, k_buffers, v_buffers, slots,
                           keep_len=len(prefix_key), branch_windows=branch_windows, repeat_attention=repeat_attention,
                           head_shard=tensor_parallel.head_shard() if tensor_parallel is not None else None)
        kept_lengths = torch.tensor([[len(rows) for rows in heads] for heads in kept], dtype=torch.int64)
        kept_rows = int(kept_lengths.sum())
        # Every TP rank takes the slots the rank with the most rows needs: pools stay alike.
        largest_rows = kept_rows if tensor_parallel is None else tensor_parallel.largest(kept_rows)
        if largest_rows == 0:
            # A copy without slots has a row of padding only, which no request could tell from
            # its own tokens (e.g. a 1-token budget with --kv-window 1 keeps the fork's last token,
            # which the copy leaves to the branches).
            logger.warning("lava: the plan keeps no row of a %d-token prefix (budget %s, window %d); kept "
                           "uncompressed", len(prefix_key), self.config.budget, self.config.window)
            return None
        num_slots = slots_needed(largest_rows, *kept_lengths.shape)
        owned = self.alloc_slots(num_slots)
        if owned is None:
            logger.warning("lava: no room for %d slots to compress a %d-token prefix; kept uncompressed",
                           num_slots, slots.numel())
            return None
        entry = None
        try:
            # After the slots: an eviction for them may have made the room; nothing is dropped
            # for a compression that then fails for want of slots.
            self.make_room_in_store()
            layout = CellLayout(owned.to(torch.int64), kept_lengths)
            write_kept(layout, kept, k_buffers, v_buffers, slots)
            head_dim = k_buffers[0].shape[-1]
            bytes_per_row = 2 * head_dim * k_buffers[0].element_size()
            entry = self.store.add(len(prefix_key), layout, policy=self.policy.name,
                                   compress_seconds=time.perf_counter() - started, bytes_per_row=bytes_per_row)
            node = self.add_compressed(prefix_key, entry)
        except BaseException:  # nothing half-made stays: the slots and the entry go back
            if entry is not None:
                self.store.withdraw(entry.entry_id)
            self.token_to_kv_pool_allocator.free(owned)
            raise
        logger.info(
            "lava: compressed prefix %d: %d tokens, policy %s, kept ratio %.3f (%d rows in %d slots), "
            "%.1f MiB saved, %.1f ms", entry.entry_id, entry.prefix_len, entry.policy, entry.kept_ratio,
            layout.kept_rows, num_slots, entry.bytes_saved / 2**20, entry.compress_seconds * 1e3)
        self.metrics.compressed(entry, self.store)
        return node
