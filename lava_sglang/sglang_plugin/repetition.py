"""`--kv-observe reconstruct` on the server: the prefix's repetition is one internal request.

When a fork prefix P (n tokens) is committed, the plugin asks its own server (HTTP on
loopback, as SGLang's start-up warm-up request does) to prefill R = P + I + P, I being
`Reconstruct.instruction`, with `max_new_tokens` 0 and a rid starting with
`REPETITION_RID_PREFIX`. The scheduler runs it like any request: it matches the cached P,
prefills I + P in as many chunks as chunked prefill makes (so memory stays bounded), and
holds P while it runs. For each of its extend chunks the attention path calls
`RepetitionScores.add_chunk`, which folds the chunk's attention on P's selectable tokens
into a running max per layer (docs/observe.md, "reconstruct"). When the request is released,
the prefix is compressed by those scores, and the repetition's own tokens are freed with the
full copy.

Going through the server rather than a side forward keeps the scheduler in charge: the
repetition is batched, chunked, counted in the pool and preempted like any request, and the
plugin touches no more of SGLang than the HTTP API.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from dataclasses import dataclass, field

import requests
import torch

from lava_sglang.policy import repeat_attention_chunk

logger = logging.getLogger(__name__)

REPETITION_RID_PREFIX = "lava-repeat-"


@dataclass
class RepetitionScores:
    """The attention a repetition of an n-token prefix pays its first m tokens, per layer."""

    rid: str
    prefix_len: int  # n: the repetition's queries are at positions n .. n + num_queries - 1
    selectable: int  # m = n - min(window, n)
    num_queries: int  # u + n: the instruction and the prefix again
    num_layers: int
    repeat: list[torch.Tensor | None] = field(init=False)  # per layer [Hq, m] fp32
    # Per layer, the position up to which the repetition's queries are scored without a gap
    # (tokens of the prefix the request recomputes are not repetition queries).
    scored_until: list[int] = field(init=False)
    scoring_seconds: float = 0.0  # wall time of the scoring calls (on CUDA, unsynchronised: mostly launches)
    first_chunk_at: float | None = None  # time.monotonic() of the first scored chunk
    ended_at: float | None = None  # time.monotonic() of the request's release
    done: bool = False  # the request was released with every query scored
    failed: str | None = None  # why the request did not run (set by the submitting thread)

    def __post_init__(self):
        self.repeat = [None] * self.num_layers
        self.scored_until = [self.prefix_len] * self.num_layers

    @property
    def num_scored(self) -> int:
        """Repetition queries scored at every layer."""
        return min(self.scored_until) - self.prefix_len

    @property
    def complete(self) -> bool:
        return self.num_scored == self.num_queries

    def add_chunk(self, layer: int, queries: torch.Tensor, keys: torch.Tensor, first_position: int,
                  scaling: float) -> None:
        """One extend chunk of the repetition at one layer: queries [T, Hq, d] at positions
        first_position .. first_position + T - 1, keys [S, Hkv, d] of positions 0 .. S - 1."""
        started = time.perf_counter()
        skip = max(0, self.prefix_len - first_position)  # recomputed prefix tokens are not the repetition
        queries = queries[skip:]
        start, end = first_position + skip, first_position + skip + queries.shape[0]
        if queries.shape[0] > 0 and start <= self.scored_until[layer]:
            if self.first_chunk_at is None:
                self.first_chunk_at = time.monotonic()
            chunk_max = repeat_attention_chunk(queries.transpose(0, 1), keys.transpose(0, 1), start, self.prefix_len,
                                               (0, self.prefix_len), scaling)[:, :self.selectable]
            previous = self.repeat[layer]
            self.repeat[layer] = chunk_max if previous is None else torch.maximum(previous, chunk_max)
            self.scored_until[layer] = max(self.scored_until[layer], end)
        self.scoring_seconds += time.perf_counter() - started


class RepetitionClient:
    """Sends repetition requests to this server's /generate (and aborts them), each from a
    daemon thread: the scheduler loop must not wait on its own HTTP server.

    max_tokens: the model's context length; a repetition (2n + u tokens) must fit in it.
    """

    def __init__(self, url: str, max_tokens: int, api_key: str | None = None, timeout: float = 600.0):
        self.url = url.rstrip("/")
        self.max_tokens = max_tokens
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.timeout = timeout

    @staticmethod
    def new_rid() -> str:
        return REPETITION_RID_PREFIX + uuid.uuid4().hex

    def submit(self, scores: RepetitionScores, input_ids: list[int]) -> None:
        thread = threading.Thread(target=self._post, args=(scores, input_ids), name=f"lava-{scores.rid}",
                                  daemon=True)
        thread.start()

    def abort(self, rid: str) -> None:
        """Abort a repetition whose prefix no longer waits for it (its tokens would be wasted)."""
        threading.Thread(target=self._abort, args=(rid,), name=f"lava-abort-{rid}", daemon=True).start()

    def _abort(self, rid: str) -> None:
        try:
            requests.post(self.url + "/abort_request", json={"rid": rid}, headers=self.headers, timeout=self.timeout)
        except requests.RequestException as error:
            logger.warning("lava: could not abort repetition %s (%s)", rid, error)

    def _post(self, scores: RepetitionScores, input_ids: list[int]) -> None:
        payload = {"rid": scores.rid, "input_ids": input_ids, "sampling_params": {"max_new_tokens": 0}}
        try:
            response = requests.post(self.url + "/generate", json=payload, headers=self.headers, timeout=self.timeout)
            if response.status_code != 200:
                scores.failed = f"HTTP {response.status_code}: {response.text[:200]}"
        except requests.RequestException as error:
            scores.failed = str(error)
        if scores.failed is not None:
            logger.warning("lava: repetition %s of a %d-token prefix did not run (%s); the prefix is compressed "
                           "by its tail", scores.rid, scores.prefix_len, scores.failed)
