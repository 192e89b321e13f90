"""`--kv-observe reconstruct` on the server: the prefix's repetition, one internal request per chunk.

When a fork prefix P (n tokens) is committed, the plugin splits it into chunks of
`--kv-observe-chunk` tokens (`Reconstruct`, docs/observe.md) and asks its own server (HTTP
on loopback, as SGLang's start-up warm-up request does) to prefill, one chunk after the
other, P + I_t + P[start:end], I_t being the chunk's repeat instruction, with
`max_new_tokens` 0 and a rid naming `REPETITION_RID_TAG` after a random base. The scheduler runs each
like any request: it matches the cached P and prefills I_t and the chunk (in as many pieces
as chunked prefill makes). For each piece the attention path calls
`RepetitionScores.add_chunk`, which folds the piece's attention on the tokens the chunk
copies into a running max per layer. When a chunk's request is released its own tokens are
freed at once, before the next chunk is sent, so scoring holds at most one chunk and its
instruction beyond the prefix (KVzip's bound; the reference runtime does the same). Once
every chunk has run, the prefix is compressed by those scores.

Going through the server rather than a side forward keeps the scheduler in charge: the
repetition is batched, chunked, counted in the pool and preempted like any request, and the
plugin touches no more of SGLang than the HTTP API.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import requests
import torch

from lava_sglang.policy import (Reconstruct, assistant_turn_text, repeat_attention_chunk, repeat_chunks,
                               repeat_view_positions)

logger = logging.getLogger(__name__)

# In the chunks' request ids, after a random base: SGLang's scheduler aborts every request whose
# rid starts with an aborted one's, so a fixed prefix would let one client's abort of its own
# request "lava-repeat-" stop every repetition.
REPETITION_RID_TAG = "lava-repeat"


def add_known(total: float | None, seconds: float | None) -> float | None:
    """total + seconds, or None once either is unknown (a sum with a missing term is not a sum)."""
    return None if total is None or seconds is None else total + seconds


@dataclass
class RepetitionChunk:
    """One chunk's request: it repeats prefix positions `copied` after the instruction
    `prompt`, so its queries sit at positions n .. n + num_queries - 1."""

    rid: str
    copied: tuple[int, int]
    prompt: list[int]
    # Per layer, the position up to which the chunk's queries are scored without a gap
    # (tokens of the prefix the request recomputes are not repetition queries).
    scored_until: list[int] = field(default_factory=list)
    done: bool = False  # released with every query scored

    @property
    def num_queries(self) -> int:
        return len(self.prompt) + self.copied[1] - self.copied[0]


@dataclass
class RepetitionScores:
    """The attention a chunked repetition of an n-token prefix pays its first m tokens, per layer."""

    prefix_len: int  # n: every chunk's queries are at positions n .. n + num_queries - 1
    selectable: int  # m = n - min(window, n)
    num_layers: int
    source: Reconstruct
    chunks: list[RepetitionChunk]
    prefix_ids: list[int]
    repeat: list[torch.Tensor | None] = field(init=False)  # per layer [Hq, m] fp32
    scoring_seconds: float = 0.0  # wall time of the scoring calls (on CUDA, unsynchronised: mostly launches)
    first_chunk_at: float | None = None  # time.monotonic() of the first scored piece
    last_progress_at: float | None = None  # time.monotonic() of the last scored piece or chunk release
    ended_at: float | None = None  # time.monotonic() of the last chunk's release
    # Summed over chunks, each one's first forward to its release: the clock the prefix's
    # prefill is timed by, without the gaps between chunks (the next chunk's round trip, the
    # other requests' batches the scheduler runs between them); None once a chunk was not stamped.
    forward_seconds: float | None = 0.0
    failed: str | None = None  # why the repetition did not run whole (set by either thread)
    pool_used_at_start: int = 0  # pool slots in use when the repetition was asked for
    pool_used_peak: int = 0  # the most pool slots in use while a chunk was scored

    def __post_init__(self):
        self.repeat = [None] * self.num_layers
        for chunk in self.chunks:
            chunk.scored_until = [self.prefix_len] * self.num_layers

    @classmethod
    def plan(cls, prefix_ids: Sequence[int], source: Reconstruct, encode: Callable[[str], list[int]], window: int,
             num_layers: int, apply_chat_template: Callable | None = None,
             rid_base: str | None = None) -> "RepetitionScores":
        """The chunks of a prefix's repetition: those that copy selectable tokens (a chunk of
        the window alone would score nothing the plan reads). apply_chat_template: the
        tokenizer's, for `Reconstruct.chat_turn`; without a usable template the chunks are
        introduced by the instruction alone (logged). rid_base: what the chunks' request ids
        start with, before REPETITION_RID_TAG (default: a random one); the ranks of one
        tensor-parallel group plan the same repetition with the same one."""
        assistant_turn = ""
        if source.chat_turn:
            try:
                if apply_chat_template is None:
                    raise ValueError("no tokenizer chat template was given")
                assistant_turn = assistant_turn_text(apply_chat_template)
            except ValueError as error:  # a base model: the plain prompt
                logger.warning("lava: %s; the repetition runs with --kv-observe-prompt plain", error)
                source = dataclasses.replace(source, chat_turn=False)
        prefix_ids = list(prefix_ids)
        prefix_len = len(prefix_ids)
        selectable = prefix_len - min(window, prefix_len)
        base = f"{rid_base or uuid.uuid4().hex}-{REPETITION_RID_TAG}"
        chunks = []
        for index, (start, end) in enumerate(repeat_chunks(prefix_len, source.chunk_tokens)):
            if start >= selectable:
                break
            prompt = source.chunk_prompt(prefix_ids, start, encode, assistant_turn)
            chunks.append(RepetitionChunk(f"{base}-{index}", (start, end), prompt))
        return cls(prefix_len=prefix_len, selectable=selectable, num_layers=num_layers, source=source, chunks=chunks,
                   prefix_ids=prefix_ids)

    def input_ids(self, chunk: RepetitionChunk) -> list[int]:
        """Chunk `chunk`'s request: the prefix, its instruction, the tokens it copies (made when
        it is sent: a long prefix is held once, not once per chunk)."""
        start, end = chunk.copied
        return self.prefix_ids + chunk.prompt + self.prefix_ids[start:end]

    @property
    def longest_request(self) -> int:
        """Tokens of the longest chunk request."""
        return self.prefix_len + max((chunk.num_queries for chunk in self.chunks), default=0)

    @property
    def rids(self) -> list[str]:
        return [chunk.rid for chunk in self.chunks]

    def chunk(self, rid: str) -> RepetitionChunk | None:
        return next((chunk for chunk in self.chunks if chunk.rid == rid), None)

    @property
    def num_queries(self) -> int:
        """Tokens the repetition prefills: every chunk's instruction and copy."""
        return sum(chunk.num_queries for chunk in self.chunks)

    @property
    def num_scored(self) -> int:
        """Repetition queries scored at every layer."""
        return sum(min(chunk.scored_until) - self.prefix_len for chunk in self.chunks)

    @property
    def done(self) -> bool:
        """Every chunk was released with all its queries scored."""
        return all(chunk.done for chunk in self.chunks)

    @property
    def extra_slots_peak(self) -> int:
        """The most pool slots in use beyond those at the start, while a chunk was scored."""
        return max(0, self.pool_used_peak - self.pool_used_at_start)

    def attended_positions(self, rid: str, seq_len: int) -> torch.Tensor | None:
        """The positions of its row the repetition queries of chunk `rid` (those of its first
        seq_len tokens that are past the prefix) attend to under view "chunk": the prefix's
        view (`repeat_view_positions`), then the repetition's tokens up to seq_len. None: the
        whole row (view "prefix", or not one of this repetition's chunks)."""
        chunk = self.chunk(rid)
        if self.source.view != "chunk" or chunk is None or seq_len <= self.prefix_len:
            return None
        return torch.cat([repeat_view_positions(chunk.copied, self.source.sink_tokens),
                          torch.arange(self.prefix_len, seq_len)])

    def add_chunk(self, rid: str, layer: int, queries: torch.Tensor, keys: torch.Tensor, first_position: int,
                  scaling: float, pool_used: int = 0, lse: torch.Tensor | None = None) -> None:
        """One extend piece of chunk `rid` at one layer: queries [T, Hq, d] at positions
        first_position .. first_position + T - 1, keys [S, Hkv, d] of positions 0 .. S - 1;
        pool_used: pool slots in use now; lse [T, Hq]: the queries' log-sum-exp over every key
        they see, from the attention that computed them (the global normaliser, used when
        the scores are normalised globally, and then required under view "chunk", whose
        queries see fewer keys than `keys` holds)."""
        if lse is None and self.source.view == "chunk" and self.source.normalize == "global":
            raise ValueError('under view "chunk" a globally normalised repetition needs its attention\'s lse')
        started = time.perf_counter()
        chunk = self.chunk(rid)
        skip = max(0, self.prefix_len - first_position)  # recomputed prefix tokens are not the repetition
        queries = queries[skip:]
        if lse is not None and self.source.normalize == "global":
            lse = lse[skip:].transpose(0, 1)
        else:
            lse = None
        start, end = first_position + skip, first_position + skip + queries.shape[0]
        if chunk is not None and queries.shape[0] > 0 and start <= chunk.scored_until[layer]:
            self.last_progress_at = time.monotonic()
            if self.first_chunk_at is None:
                self.first_chunk_at = self.last_progress_at
            self.pool_used_peak = max(self.pool_used_peak, pool_used)
            copy_start, copy_end = chunk.copied
            scored_end = min(copy_end, self.selectable)
            scores = repeat_attention_chunk(queries.transpose(0, 1), keys.transpose(0, 1), start, self.prefix_len,
                                            chunk.copied, scaling, self.source.normalize,
                                            self.source.sink_tokens, lse=lse)[:, :scored_end - copy_start]
            if self.repeat[layer] is None:
                self.repeat[layer] = scores.new_zeros(scores.shape[0], self.selectable)
            seen = self.repeat[layer][:, copy_start:scored_end]
            torch.maximum(seen, scores, out=seen)
            chunk.scored_until[layer] = max(chunk.scored_until[layer], end)
        self.scoring_seconds += time.perf_counter() - started

    def end_chunk(self, rid: str, checkpointed: bool, forward_seconds: float | None = None) -> RepetitionChunk | None:
        """Chunk `rid`'s request was released, `forward_seconds` after its first forward began
        (None: not stamped): done if it was scored whole."""
        chunk = self.chunk(rid)
        if chunk is None:
            return None
        self.forward_seconds = add_known(self.forward_seconds, forward_seconds)
        chunk.done = checkpointed and min(chunk.scored_until) - self.prefix_len == chunk.num_queries
        self.last_progress_at = time.monotonic()
        if not chunk.done and self.failed is None:
            self.failed = (f"chunk {rid} released with {min(chunk.scored_until) - self.prefix_len} of "
                           f"{chunk.num_queries} repetition tokens scored")
        if self.done or self.failed is not None:
            self.ended_at = time.monotonic()
        return chunk


class RepetitionClient:
    """Sends a repetition's chunk requests to this server's /generate, one after the other
    from a daemon thread (the scheduler loop must not wait on its own HTTP server), and aborts
    them.

    max_prompt_tokens: the longest prompt the server admits (`touchpoints.max_prompt_tokens`);
    every chunk request (prefix, instruction, chunk) must fit in it.
    dp_rank: with `--dp-size` > 1, the data-parallel rank of the scheduler sending them: the
    chunks must reach the rank whose cache holds the prefix, not whichever rank SGLang's
    controller picks.
    verify: `requests`' `verify=` for a server behind HTTPS (`touchpoints.ssl_verify`): a
    self-signed certificate would otherwise fail every chunk.
    timeout: seconds to connect, and for an abort to be answered; a chunk's answer is waited
    for as long as it takes.
    """

    def __init__(self, url: str, max_prompt_tokens: int, api_key: str | None = None, timeout: float = 600.0,
                 dp_rank: int | None = None, admin_api_key: str | None = None, verify: bool | str = True):
        self.url = url.rstrip("/")
        self.max_prompt_tokens = max_prompt_tokens
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        # /abort_request takes only the admin key once the server has one (SGLang's ADMIN_OPTIONAL).
        self.abort_headers = {"Authorization": f"Bearer {admin_api_key}"} if admin_api_key else self.headers
        self.timeout = timeout
        self.routing = {} if dp_rank is None else {"routed_dp_rank": dp_rank}
        self.verify = verify

    def submit(self, scores: RepetitionScores) -> None:
        thread = threading.Thread(target=self._post_chunks, args=(scores,), name=f"lava-{scores.chunks[0].rid}",
                                  daemon=True)
        thread.start()

    def abort(self, scores: RepetitionScores, rids: list[str]) -> None:
        """Abort a repetition whose prefix no longer waits for it (its tokens would be wasted):
        no further chunk is sent, and `rids`, the chunks that may be queued or running, are
        aborted. Never raises: a chunk that cannot be aborted runs to its end, and its tokens
        are freed at its release."""
        if scores.failed is None:
            scores.failed = "aborted"
        if not rids:
            return
        try:
            threading.Thread(target=self._abort, args=(rids,), name=f"lava-abort-{rids[0]}", daemon=True).start()
        except Exception as error:  # e.g. no thread to spare: called from the scheduler, which must go on
            logger.warning("lava: could not abort repetition %s (%s)", ", ".join(rids), error)

    def _abort(self, rids: list[str]) -> None:
        for rid in rids:
            try:
                response = requests.post(self.url + "/abort_request", json={"rid": rid}, headers=self.abort_headers,
                                         timeout=self.timeout, verify=self.verify)
                failure = None if response.status_code == 200 else f"HTTP {response.status_code}"
            except requests.RequestException as error:
                failure = str(error)
            if failure is not None:  # the chunk runs to its end; its tokens are still freed at its release
                logger.warning("lava: could not abort repetition %s (%s)", rid, failure)

    def _post_chunks(self, scores: RepetitionScores) -> None:
        for chunk in scores.chunks:
            if scores.failed is not None:
                return
            failure = None
            try:
                payload = {"rid": chunk.rid, "input_ids": scores.input_ids(chunk),
                           "sampling_params": {"max_new_tokens": 0}, **self.routing}
                # No read timeout: a chunk may queue and run for long under load, and the waiting prefix
                # bounds the repetition by its progress (--kv-observe-wait), aborting a stalled one.
                response = requests.post(self.url + "/generate", json=payload, headers=self.headers,
                                         timeout=(self.timeout, None), verify=self.verify)
                if response.status_code != 200:
                    failure = f"HTTP {response.status_code}: {response.text[:200]}"
                elif _finish_type(response) == "abort":  # aborted while queued: released without a release hook
                    failure = f"chunk {chunk.rid} was aborted"
            except requests.RequestException as error:
                failure = str(error)
            except Exception as error:  # a bug here: the prefix must not wait out --kv-observe-wait for it
                logger.exception("lava: sending repetition chunk %s failed", chunk.rid)
                failure = f"sending chunk {chunk.rid} failed ({error})"
            if failure is not None:
                if scores.failed is None:  # else the plugin stopped it (an abort answers so) and has said why
                    scores.failed = failure
                    logger.warning("lava: repetition chunk %s of a %d-token prefix did not run (%s); the repetition "
                                   "stops", chunk.rid, scores.prefix_len, failure)
                return


def _finish_type(response) -> str | None:
    """The finish reason type of a /generate response ('abort' for an aborted request)."""
    try:
        reason = response.json()["meta_info"]["finish_reason"]
    except (ValueError, KeyError, TypeError):
        return None
    return reason.get("type") if isinstance(reason, dict) else None
