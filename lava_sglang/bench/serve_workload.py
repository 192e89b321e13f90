"""The serving benchmark's pure parts: the workload, the timed frontend endpoint, statistics.

Nothing here starts a server; `lava_sglang.bench.serve` drives these against one.
"""

from __future__ import annotations

import copy
import json
import math
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

from lava_sglang.bench.documents import Document, names_code, prompt_parts
from lava_sglang.bench.stats import wilson_interval

ORDERS = ("grouped", "interleaved")
#: A request counts as a document recomputation (a cache miss) when it found fewer than
#: (document tokens - MISS_SLACK) tokens in the cache. The slack covers the prompt's last
#: token (always recomputed) and `--kv-compress-on shared`'s recomputed window (32 by default).
MISS_SLACK = 64


# ------------------------------------------------------------------------------ workload


@dataclass(frozen=True)
class Visit:
    """One frontend fork program: document `document` once, one branch per question."""

    index: int
    document: int
    questions: tuple[int, ...]  # indices into the document's questions
    round: int  # this is the document's round-th visit (0 = first)


def build_workload(num_questions: Sequence[int], questions_per_visit: int, order: str) -> list[Visit]:
    """The visits for documents with num_questions[d] questions each.

    A document's questions are split into visits of `questions_per_visit` (0: all in one).
    `grouped`: all visits of document 0, then document 1, ...; `interleaved`: round-robin, the
    first visit of every document, then the second, ... (each document comes back after all
    the others: the access pattern that defeats an LRU cache smaller than the documents).
    """
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
    if questions_per_visit < 0:
        raise ValueError(f"questions_per_visit must be >= 0, got {questions_per_visit}")
    per_document = []
    for count in num_questions:
        if count < 1:
            raise ValueError(f"every document needs >= 1 question, got {list(num_questions)}")
        width = questions_per_visit or count
        per_document.append([tuple(range(start, min(start + width, count))) for start in range(0, count, width)])
    if order == "grouped":
        pairs = [(d, r) for d, visits in enumerate(per_document) for r in range(len(visits))]
    else:
        rounds = max(len(visits) for visits in per_document)
        pairs = [(d, r) for r in range(rounds) for d, visits in enumerate(per_document) if r < len(visits)]
    return [Visit(i, d, per_document[d][r], r) for i, (d, r) in enumerate(pairs)]


def program_inputs(document: Document, visit: Visit) -> tuple[str, list[str]]:
    """(prefix, suffixes) of `multi_question_qa` for one visit."""
    prefix, _ = prompt_parts(document.text, "")
    return prefix, [prompt_parts("", document.questions[q].text)[1] for q in visit.questions]


def is_correct(answer_text: str, expected: str | None) -> bool | None:
    """Whether the answer names the planted code (None for a question without one)."""
    if expected is None:
        return None
    return names_code(answer_text, expected)


# ---------------------------------------------------------------------- timed endpoint


def timed_endpoint(url: str):
    """An SGLang frontend backend (`sgl.RuntimeEndpoint`) that streams every generation to
    time its first token and records each request's timing and meta_info (the prefix commit
    that `fork()` sends included). `for_visit()` gives a copy with its own record list."""
    from sglang.lang.backend.runtime_endpoint import RuntimeEndpoint
    from sglang.utils import http_request

    class TimedEndpoint(RuntimeEndpoint):
        def for_visit(self) -> TimedEndpoint:
            other = copy.copy(self)
            other.calls = []
            other.lock = threading.Lock()
            return other

        def _record(self, call: dict) -> None:
            with self.lock:
                self.calls.append(call)

        def commit_lazy_operations(self, s):
            data = {"text": s.text_, "sampling_params": {"max_new_tokens": 0}}
            started = time.perf_counter()
            res = http_request(self.base_url + "/generate", json=data, api_key=self.api_key, verify=self.verify)
            self._assert_success(res)
            body = res.json()
            self._record({"kind": "commit", "seconds": time.perf_counter() - started,
                          "meta_info": body.get("meta_info", {})})

        def generate(self, s, sampling_params):
            started = time.perf_counter()
            first = None
            pieces, meta_info = [], {}
            for chunk, meta_info in self.generate_stream(s, sampling_params):
                if first is None:
                    first = time.perf_counter()
                pieces.append(chunk)
            end = time.perf_counter()
            finish = meta_info.get("finish_reason")
            if isinstance(finish, dict) and finish.get("type") == "abort":
                # SGLang ends an aborted stream with a normal chunk: a failure, not a wrong answer.
                raise RuntimeError(f"the server aborted the request ({finish.get('status_code')}: "
                                   f"{finish.get('message')})")
            self._record({"kind": "gen", "text": s.text_, "ttft": (first or end) - started, "e2e": end - started,
                          "meta_info": meta_info})
            return "".join(pieces), meta_info

    endpoint = TimedEndpoint(url)
    endpoint.calls, endpoint.lock = [], threading.Lock()
    return endpoint


def visit_records(visit: Visit, document: Document, prefix_tokens: int, calls: list[dict], answers: list[str],
                  seconds: float) -> tuple[dict, list[dict]]:
    """The visit's record and one record per question, from the endpoint's calls.

    Branch calls are matched to questions by their prompt text (the branches run in threads,
    so their calls arrive in any order)."""
    commits = [c for c in calls if c["kind"] == "commit"]
    gens = [c for c in calls if c["kind"] == "gen"]
    questions = []
    for q, answer in zip(visit.questions, answers):
        question = document.questions[q]
        call = next((c for c in gens if c["text"].endswith(prompt_parts("", question.text)[1])), None)
        if call is not None:
            gens.remove(call)  # a question asked twice in one visit has two calls
        meta = call["meta_info"] if call else {}
        questions.append({
            "visit": visit.index, "document": visit.document, "question": q, "round": visit.round,
            "answer": answer, "expected": question.answer, "correct": is_correct(answer, question.answer),
            "prompt_tokens": meta.get("prompt_tokens"), "cached_tokens": meta.get("cached_tokens"),
            "completion_tokens": meta.get("completion_tokens"),
            "ttft": call["ttft"] if call else None, "e2e": call["e2e"] if call else None,
            "server_e2e": meta.get("e2e_latency"),
        })
    commit_meta = commits[0]["meta_info"] if commits else {}
    record = {
        "visit": visit.index, "document": visit.document, "round": visit.round, "questions": len(visit.questions),
        "prefix_tokens": prefix_tokens, "seconds": seconds,
        "commit_seconds": commits[0]["seconds"] if commits else None,
        "commit_prompt_tokens": commit_meta.get("prompt_tokens"),
        "commit_cached_tokens": commit_meta.get("cached_tokens"),
    }
    return record, questions


# ------------------------------------------------------------------------------ statistics


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0..100), linear between closest ranks (numpy's default); None if empty."""
    data = sorted(v for v in values if v is not None)
    if not data:
        return None
    if not 0 <= q <= 100:
        raise ValueError(f"percentile must be in [0, 100], got {q}")
    position = (len(data) - 1) * q / 100
    low = math.floor(position)
    high = min(low + 1, len(data) - 1)
    return data[low] + (data[high] - data[low]) * (position - low)


def latency_summary(values: Sequence[float | None]) -> dict:
    data = [v for v in values if v is not None]
    summary = {f"p{q}": percentile(data, q) for q in (50, 90, 99)}
    summary["mean"] = sum(data) / len(data) if data else None
    summary["n"] = len(data)
    return summary


def is_miss(prompt_tokens: int | None, cached_tokens: int | None, document_tokens: int) -> bool:
    """A request recomputed its document: fewer than document_tokens - MISS_SLACK were cached."""
    if cached_tokens is None or prompt_tokens is None:
        return False
    return cached_tokens < min(document_tokens, prompt_tokens) - MISS_SLACK


def store_peaks(samples: list[dict], capacity: int | None, bytes_per_token: float | None) -> dict:
    """Peaks over the /server_info samples. A sample's `store` holds the pool counters
    (`pool_available`, `evictable`, `protected`) and, with a compressing policy, the
    compressed store's (`entries`, `borrowed_slots`, `bytes_stored`, ...). `--kv-policy none`
    reports the pool counters only; a server without the plugin reports neither: those
    fields are then None."""
    pools = [s["store"] for s in samples if s.get("store") and "pool_available" in s["store"]]
    stores = [p for p in pools if "entries" in p]
    running = [s["running_tokens"] for s in samples if s.get("running_tokens") is not None]
    used = [capacity - p["pool_available"] for p in pools] if capacity else []
    return {
        "samples": len(samples),
        "peak_running_tokens": max(running) if running else None,
        "peak_pool_used_tokens": max(used) if used else None,
        "peak_kv_bytes": max(used) * bytes_per_token if used and bytes_per_token else None,
        "peak_tree_tokens": max((p.get("evictable", 0) + p.get("protected", 0) for p in pools), default=None),
        "peak_store_entries": max((p["entries"] for p in stores), default=None),
        "mean_store_entries": sum(p["entries"] for p in stores) / len(stores) if stores else None,
        "peak_store_slots": max((p["borrowed_slots"] for p in stores), default=None),
        "peak_store_bytes": max((p["bytes_stored"] for p in stores), default=None),
    }


def summarize(policy: str, visits: list[dict], questions: list[dict], samples: list[dict], final_store: dict | None,
              wall_seconds: float, capacity: int | None, bytes_per_token: float | None,
              num_documents: int, truncated: bool) -> dict:
    """One policy's record for serving.json."""
    graded = [q["correct"] for q in questions if q["correct"] is not None]
    hits = sum(graded)
    requests = [(v["commit_prompt_tokens"], v["commit_cached_tokens"], v["prefix_tokens"]) for v in visits]
    requests += [(q["prompt_tokens"], q["cached_tokens"], next(v["prefix_tokens"] for v in visits
                                                              if v["visit"] == q["visit"])) for q in questions]
    prompt = sum(p for p, c, _ in requests if p is not None and c is not None)
    cached = sum(c for p, c, _ in requests if p is not None and c is not None)
    question_misses = sum(is_miss(p, c, d) for p, c, d in requests[len(visits):])

    def prefilled(visit: dict) -> bool:
        """The visit computed its document: its commit missed (or, without a commit, a question did)."""
        if visit["commit_prompt_tokens"] is not None:
            return is_miss(visit["commit_prompt_tokens"], visit["commit_cached_tokens"], visit["prefix_tokens"])
        return any(is_miss(q["prompt_tokens"], q["cached_tokens"], visit["prefix_tokens"])
                   for q in questions if q["visit"] == visit["visit"])

    commit_misses = [v for v in visits if prefilled(v)]
    # Without a commit, a visit's recomputation is its question's miss: count it once.
    question_misses -= sum(1 for v in commit_misses if v["commit_prompt_tokens"] is None)
    revisits = [v for v in visits if v["round"] > 0]
    revisit_hits = [v for v in revisits if v not in commit_misses]
    mean_prefix = sum(v["prefix_tokens"] for v in visits) / len(visits) if visits else None
    record = {
        "policy": policy,
        "visits": len(visits), "questions": len(questions), "truncated": truncated,
        "wall_seconds": wall_seconds,
        "accuracy": hits / len(graded) if graded else None,
        "accuracy_ci95": list(wilson_interval(hits, len(graded))) if graded else None,
        "cached_token_share": cached / prompt if prompt else None,
        "prompt_tokens": prompt, "cached_tokens": cached,
        # A document's first prefill is unavoidable; a recomputation is any later one.
        "recomputations": sum(v["round"] > 0 for v in commit_misses) + question_misses,
        "document_prefills": len(commit_misses),
        "revisits": len(revisits),
        "revisit_hit_rate": len(revisit_hits) / len(revisits) if revisits else None,
        "question_throughput": len(questions) / wall_seconds if wall_seconds > 0 else None,
        "visit_throughput": len(visits) / wall_seconds if wall_seconds > 0 else None,
        "ttft": latency_summary([q["ttft"] for q in questions]),
        "e2e": latency_summary([q["e2e"] for q in questions]),
        "program_latency": latency_summary([v["seconds"] for v in visits]),
        "prefill_commit_seconds": latency_summary([v["commit_seconds"] for v in commit_misses]),
        "mean_document_tokens": mean_prefix,
        "capacity_tokens": capacity,
        "bytes_per_token": bytes_per_token,
        "documents": num_documents,
        # The final read too: a compression that finished after the last sample counts.
        **store_peaks(samples + ([{"store": final_store}] if final_store else []), capacity, bytes_per_token),
    }
    if final_store:
        compressions = final_store.get("compressions", 0)
        record["compressions"] = compressions
        record["compress_seconds_per_document"] = (final_store["compress_seconds"] / compressions
                                                   if compressions else None)
    else:
        record["compressions"] = None
        record["compress_seconds_per_document"] = None
    # --kv-observe reconstruct: the repetitions' wall time, and their chunks' own forwards,
    # against their documents' prefills.
    cost = (final_store or {}).get("repetition_cost") or {}
    record["repetition_documents"] = cost.get("documents")
    record["repetition_seconds_per_document"] = (cost["repetition_seconds"] / cost["documents"]
                                                 if cost.get("documents") else None)
    record["repetition_cost_ratio"] = cost.get("ratio")
    record["repetition_forward_seconds_per_document"] = (
        cost["forward_seconds"] / cost["documents"] if cost.get("documents") and cost.get("forward_seconds") is not None
        else None)
    record["repetition_forward_ratio"] = cost.get("forward_ratio")
    # Repetitions whose commit gave no prefill to compare with (mostly cached), left out above.
    record["repetition_not_compared"] = cost.get("not_compared")
    # Prefixes still waiting for their compression (their repetition's included) when the figures were read.
    record["compressions_unfinished"] = final_store.get("pending", 0) if final_store else None
    # Documents resident: the compressed store's entries where the server reports them (summed
    # over --dp-size ranks and servers behind a router, which each compress their own copies,
    # so capped at the documents: an upper bound where copies repeat); else the radix tree's
    # tokens over the document length where it reports its pool (--kv-policy none); else (no
    # plugin) the most full-length copies its pool can hold at once, an upper bound.
    if record["peak_store_entries"] is not None:
        record["documents_resident"] = min(num_documents, record["peak_store_entries"])
        record["documents_resident_source"] = "peak compressed store entries, capped at the documents (/server_info)"
    elif record["peak_tree_tokens"] is not None and mean_prefix:
        record["documents_resident"] = min(num_documents, int(record["peak_tree_tokens"] // mean_prefix))
        record["documents_resident_source"] = "peak radix tree tokens / document tokens (/server_info)"
    elif capacity and mean_prefix:
        record["documents_resident"] = min(num_documents, capacity // math.ceil(mean_prefix))
        record["documents_resident_source"] = "upper bound: pool capacity / document tokens"
    else:
        record["documents_resident"] = None
        record["documents_resident_source"] = None
    return record


def to_json(value) -> str:
    return json.dumps(value, indent=1, default=float) + "\n"
