"""Serving benchmark: multi-question document QA through the real SGLang server.

D documents x Q questions (the quality benchmark's retrieval documents: planted facts, so
every answer is graded) are sent as frontend fork programs (`lava_sglang.frontend.
multi_question_qa`: the document once, one branch per question) by several concurrent
clients, against one server per policy that this module starts (`ServerProcess`: the CPU
engine without a GPU, the GPU otherwise) or against one existing server or SGLang's router in
front of several (`--url`, loopback only; documents resident are then reported per server).
Per policy it reports accuracy, cached-token share, peak KV memory (main pool +
compressed store, sampled from /server_info), compression time per document, throughput,
TTFT / end-to-end latency percentiles (every generation is streamed to time its first
token) and document recomputations (cache misses), into serving.{json,md,png} (after each
policy, what was measured so far into serving_partial.*, which the whole run removes).

`--memory-bound` caps the KV pool (`--max-total-tokens`) so stock SGLang keeps only
`--resident-documents` documents, and asks more documents than that, a few questions per
visit, in interleaved order (every document comes back after all the others), `none`
against `lava` at 0.2 by default.

    lava-sglang bench serve --documents 4 --questions 4
    lava-sglang bench serve --memory-bound
    python -m lava_sglang.bench.serve --url http://127.0.0.1:30000 --documents 2
"""

from __future__ import annotations

import argparse
import ipaddress
import math
import platform
import shlex
import sys
import tempfile
import threading
import time
import urllib.parse
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import requests

from lava_sglang.argtypes import (COMPRESSING_POLICIES, REPORT_FLAGS, at_least, check_results, file_stem, keep_ratio,
                                  output_folder, positive_float, positive_int, read_json, read_notes,
                                  refuse_run_flags)
from lava_sglang.bench.serve_workload import (MISS_SLACK, ORDERS, build_workload, program_inputs, summarize,
                                              timed_endpoint, visit_records)
from lava_sglang.bench import code_revision
from lava_sglang.bench.documents import CODE_DIGITS, RETRIEVAL_ANSWER_TOKENS
from lava_sglang.checks import is_number
from lava_sglang.sglang_plugin.server_process import (CPU_DEFAULT_MAX_TOTAL_TOKENS, ServerExited, ServerProcess,
                                                       check_request_fits)

POLICIES = ["none", *COMPRESSING_POLICIES]
RESULTS_DIR = Path(__file__).resolve().parents[2] / "docs" / "results"
MIN_CONTEXT = 128  # the shortest document (tokens) this benchmark builds
#: The longest --max-seconds: a week, far below what Python's thread waits take (threading.TIMEOUT_MAX).
MAX_WORKLOAD_SECONDS = 7 * 86400
#: The shortest --sample-interval: a shorter one would poll /server_info without pause.
MIN_SAMPLE_INTERVAL = 0.1
# --memory-bound's defaults (each overridable by its flag).
# One client in the memory-bound case: a document being compressed is held in full next to
# the store until its plan is made, so the cap must fit the in-flight documents as well;
# with one in flight, 10 compressed documents at 0.2 fit a pool that stock SGLang fills with 3.
MEMORY_BOUND = {"policies": ["none", "lava"], "documents": 10, "questions": 8, "questions_per_visit": 2,
                "order": "interleaved", "resident_documents": 3, "clients": 1}
# Two visits per document, round-robin: the first visit's questions run on the full document
# while the default source (reconstruct) scores it, so only a later visit reads the compressed
# copy; with every question in one visit, a deferred policy would never be read compressed.
STANDARD = {"policies": POLICIES, "documents": 4, "questions": 4, "questions_per_visit": 2, "order": "interleaved",
            "resident_documents": None, "clients": 2}


@dataclass
class ServeConfig:
    policies: list[str] = field(default_factory=lambda: list(POLICIES))
    budget: float = 0.2
    documents: int = 4
    questions: int = 4  # per document
    questions_per_visit: int = 2  # fork width; 0: all of a document's questions in one program
    order: str = "interleaved"
    context: int = 1024  # document tokens
    clients: int = 2
    max_tokens: int = RETRIEVAL_ANSWER_TOKENS  # a code cut short would be counted wrong
    max_total_tokens: int | None = None
    resident_documents: int | None = None
    memory_bound: bool = False
    max_seconds: float = 900.0  # per policy, server start excluded
    sample_interval: float = 2.0
    server_args: list[str] = field(default_factory=list)
    seed: int = 0
    url: str | None = None
    model: str | None = None

    def validate(self) -> None:
        unknown = [p for p in self.policies if p not in POLICIES]
        if unknown or not self.policies:
            raise ValueError(f"--policies: unknown {unknown}; choose from {POLICIES}")
        if len(set(self.policies)) < len(self.policies):  # one server and one report row per policy
            raise ValueError(f"--policies: each at most once, got {self.policies}")
        if not 0 < self.budget <= 1:
            raise ValueError(f"--budget must be a keep ratio in (0, 1], got {self.budget}")
        if min(self.documents, self.questions, self.clients) < 1:
            raise ValueError("--documents, --questions and --clients must be >= 1")
        if self.max_tokens < CODE_DIGITS:  # every answer would be graded wrong (SmolLM2 spells one digit a token)
            raise ValueError(f"--max-tokens must be >= {CODE_DIGITS}: a shorter answer cannot name a "
                             f"{CODE_DIGITS}-digit code, got {self.max_tokens}")
        if not 0 <= self.questions_per_visit <= self.questions:
            raise ValueError(f"--questions-per-visit must be 0 (all in one visit) to --questions ({self.questions}), "
                             f"got {self.questions_per_visit}")
        if self.seed < 0:  # random.Random(-s) draws what Random(s) draws
            raise ValueError(f"--seed must be >= 0, got {self.seed}")
        if self.order not in ORDERS:
            raise ValueError(f"--order must be one of {ORDERS}, got {self.order!r}")
        if self.context < MIN_CONTEXT:
            raise ValueError(f"--context must be >= {MIN_CONTEXT} tokens, got {self.context}")
        check_extra_server_args(self.server_args)
        if not 0 < self.max_seconds <= MAX_WORKLOAD_SECONDS:
            raise ValueError(f"--max-seconds must be in (0, {MAX_WORKLOAD_SECONDS}] (a week), "
                             f"got {self.max_seconds:g}")
        if not MIN_SAMPLE_INTERVAL <= self.sample_interval <= self.max_seconds:
            raise ValueError(f"--sample-interval must be in [{MIN_SAMPLE_INTERVAL}, --max-seconds "
                             f"({self.max_seconds:g})] seconds, got {self.sample_interval:g}")
        if self.url:
            check_loopback(self.url)


#: Server flags this command sets itself, and what to use instead. Appended after them, a flag in
#: --server-args would win over the label the report gives the run.
SET_BY_THIS_COMMAND = {"--kv-policy": "--policies", "--kv-budget": "--budget",
                       "--max-total-tokens": "--max-total-tokens", "--model-path": "--model",
                       "--host": "--url (to benchmark a server started apart)",
                       "--port": "--url (to benchmark a server started apart)",
                       "--config": "the flags themselves in --server-args"}
#: SGLang flags whose server the programs' answers cannot be read from: its streamed chunks
#: hold only their new text, which SGLang's frontend takes for the whole answer so far (it
#: keeps the part beyond the length read before), so every answer would be cut short.
UNREADABLE_ANSWERS = {"--incremental-streaming-output": "incremental_streaming_output"}


def check_extra_server_args(server_args: list[str]) -> None:
    """Refuse --server-args that would change what the report says ran: a flag this command
    sets, also abbreviated (SGLang's parser takes any unambiguous prefix of a flag, which the
    plugin's checks before a server starts do not), or a plugin's --kv-* flag abbreviated; and
    a flag whose answers the programs cannot read (`UNREADABLE_ANSWERS`), abbreviated too.
    SGLang's own --kv-* flags (--kv-cache-dtype) pass."""
    from lava_sglang.sglang_plugin.config import FLAGS

    plugin_flags = [flag for flag, *_ in FLAGS.values()]
    for flag in (arg.partition("=")[0] for arg in server_args if arg.startswith("--")):
        full = next((name for name in SET_BY_THIS_COMMAND if name.startswith(flag) and len(flag) > 3), None)
        if full is not None:
            raise ValueError(f"--server-args {flag} ({full}): this command sets it for each server; use "
                             f"{SET_BY_THIS_COMMAND[full]}")
        unreadable = next((name for name in UNREADABLE_ANSWERS if name.startswith(flag) and len(flag) > 3), None)
        if unreadable is not None:
            raise ValueError(f"--server-args {flag} ({unreadable}): the programs' streamed answers would be cut "
                             "short (each chunk holds only its new text, which SGLang's frontend takes for the whole)")
        if flag not in plugin_flags and any(name.startswith(flag) for name in plugin_flags if len(flag) > 3):
            raise ValueError(f"--server-args {flag}: an abbreviation of a plugin flag; write one of "
                             f"{', '.join(name for name in plugin_flags if name.startswith(flag))} in full")


def check_loopback(url: str) -> None:
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme not in ("http", "https") or parsed.path not in ("", "/"):
        raise ValueError(f"--url must be a server's address, http(s)://host:port, got {url!r}")
    host = parsed.hostname or ""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise ValueError(f"--url must be a loopback address (127.0.0.1, localhost, ::1), got {url!r}")


# ----------------------------------------------------------------------------- the run


def make_documents(tokenizer, config: ServeConfig):
    """The retrieval documents, each with `config.questions` questions (its planted facts,
    cycled when there are more questions than facts)."""
    from lava_sglang.bench.documents import MAX_FACTS, retrieval_documents

    def count(text: str) -> int:
        return len(tokenizer(text).input_ids)

    # As many distinct facts as questions, up to what the document has paragraph breaks for.
    for facts in range(min(config.questions, MAX_FACTS), 0, -1):
        try:
            documents = retrieval_documents(count, config.context, [facts] * config.documents, seed=config.seed)
            break
        except ValueError:  # fewer paragraph boundaries than facts
            continue
    else:
        raise ValueError(f"cannot plant a fact in a {config.context}-token document; use a longer --context")
    for document in documents:
        document.questions = [document.questions[i % facts] for i in range(config.questions)]
    return documents


def memory_bound_capacity(prefix_tokens: list[int], resident_documents: int) -> int:
    """A pool that holds `resident_documents` of the longest document, plus room for the
    branches' own tokens, rounded up to 64."""
    return int(math.ceil((resident_documents * max(prefix_tokens) + 256) / 64) * 64)


def server_urls(url: str) -> list[str]:
    """The SGLang servers behind `url`: the workers of SGLang's router (its /workers), sorted
    because the router lists them in no fixed order, or `url` itself when it is a server."""
    try:
        response = requests.get(url + "/workers", timeout=60)
        workers = response.json().get("workers") if response.status_code == 200 else None
        return sorted(worker["url"] for worker in workers) if workers else [url]
    except (requests.RequestException, ValueError, AttributeError, KeyError, TypeError):
        return [url]


def total(values) -> int | float | None:
    """The sum of `values`, or None when any of them is unknown."""
    values = list(values)
    return sum(values) if None not in values else None


def server_counters(states: list[dict], keys: tuple[str, ...] = ("store",)) -> dict | None:
    """A server's plugin counters, summed over its /server_info `internal_states` (one per
    --dp-size rank): the first of `keys` each rank's `lava_kv_policy` reports."""
    per_rank = []
    for state in states:
        policy = state.get("lava_kv_policy") or {}
        per_rank.append(next((policy[key] for key in keys if policy.get(key)), None))
    return combined_store(per_rank)


def combined_store(stores: list[dict | None]) -> dict | None:
    """The plugin's counters of several servers as one: the numbers summed, the repetition
    cost's ratio taken over the summed seconds; None when no server reports any."""
    present = [store for store in stores if store]
    if len(present) <= 1:
        return present[0] if present else None
    total = {key: sum(store.get(key, 0) for store in present) for key, value in present[0].items()
             if is_number(value)}
    costs = [store["repetition_cost"] for store in present if store.get("repetition_cost")]
    if costs:
        cost = {key: sum(c[key] for c in costs) for key in ("documents", "repetition_seconds", "prefill_seconds")}
        cost["not_compared"] = sum(c.get("not_compared", 0) for c in costs)  # 0 from a server that predates it
        forwards = [c.get("forward_seconds") for c in costs]
        cost["forward_seconds"] = None if None in forwards else sum(forwards)
        for ratio, seconds in (("ratio", "repetition_seconds"), ("forward_ratio", "forward_seconds")):
            cost[ratio] = (cost[seconds] / cost["prefill_seconds"]
                           if cost[seconds] is not None and cost["prefill_seconds"] else None)
        total["repetition_cost"] = cost
    return total


class Sampler(threading.Thread):
    """Polls every server's /server_info (the compressed store and pool counters) and
    /v1/loads (tokens held by running requests) every `interval` seconds until stopped."""

    def __init__(self, urls: list[str], interval: float):
        super().__init__(daemon=True)
        self.urls, self.interval = urls, interval
        self.samples: list[dict] = []
        self.halt = threading.Event()

    def sample(self) -> dict:
        sample = {"t": time.time()}
        stores, running = [], []
        for url in self.urls:
            try:
                states = requests.get(url + "/server_info", timeout=60).json()["internal_states"]
                # `pool`: the pool counters under --kv-policy none, where a plugin reports them.
                stores.append(server_counters(states, ("store", "pool")))
            except (requests.RequestException, ValueError, KeyError, AttributeError, TypeError):
                stores.append(None)
            try:
                loads = requests.get(url + "/v1/loads", timeout=60).json()
                rows = loads.get("loads", [loads]) if isinstance(loads, dict) else loads
                running.append(sum(int(row.get("num_used_tokens", 0)) for row in rows))
            except (requests.RequestException, ValueError, AttributeError, TypeError):
                pass
        if any(stores) and None not in stores:  # a server missing would read as free memory
            sample["store"] = combined_store(stores)
            sample["server_entries"] = [(store or {}).get("entries") for store in stores]
        if running:
            sample["running_tokens"] = sum(running)
        return sample

    def run(self) -> None:
        while not self.halt.is_set():
            self.samples.append(self.sample())
            self.halt.wait(self.interval)

    def stop(self) -> list[dict]:
        self.halt.set()
        self.join(timeout=120)
        self.samples.append(self.sample())
        return self.samples


def server_facts(url: str) -> dict:
    """What the server says about itself: capacity, KV bytes per token, its policy options, and
    the flags it runs with whose answers the programs cannot read (`UNREADABLE_ANSWERS`)."""
    info = requests.get(url + "/server_info", timeout=60).json()
    state = info["internal_states"][0]
    memory = state.get("memory_usage", {})
    rank_capacities = [rank.get("memory_usage", {}).get("token_capacity") or rank.get("max_total_num_tokens")
                       for rank in info["internal_states"]]  # one per --dp-size rank
    kv_gb = memory.get("kvcache")
    return {
        "capacity_tokens": total(rank_capacities),
        # build_memory_usage reports GiB (bytes / 2**30), rounded; the policy's own figure wins below.
        "bytes_per_token": kv_gb * 2**30 / rank_capacities[0] if kv_gb and rank_capacities[0] else None,
        "kv_policy": {k: v for k, v in state.get("lava_kv_policy", {}).items() if k != "store"},
        "store": server_counters(info["internal_states"]),
        "model_path": info.get("model_path"),
        "dtype": info.get("dtype"),
        "version": info.get("version"),
        "unreadable_answers": [flag for flag, field in UNREADABLE_ANSWERS.items() if info.get(field)],
    }


#: Seconds after --max-seconds a visit still under way is waited for; then it is taken as held
#: by a server that no longer answers (a program's requests have no timeout of their own).
STUCK_SECONDS = 600.0


class VisitResults:
    """What the clients' visits give, under one lock. Once closed, a visit that still ends is
    left out, and each one under way then counts as a failed program (abandoned)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.visits: list[dict] = []
        self.questions: list[dict] = []
        self.errors: list[str] = []
        self.under_way = 0
        self.closed = False

    def begin(self) -> None:
        with self.lock:
            self.under_way += 1

    def end(self, record: dict | None = None, questions: list[dict] = (), error: str | None = None) -> bool:
        """A visit's record and its questions', or its error; False (left out) once closed."""
        with self.lock:
            self.under_way -= 1
            if self.closed:
                return False
            if error is not None:
                self.errors.append(error)
            else:
                self.visits.append(record)
                self.questions.extend(questions)
            return True

    def close(self) -> tuple[list[dict], list[dict], list[str]]:
        """(visit records, question records, errors) of the visits that ended, and one error
        per visit still under way."""
        with self.lock:
            self.closed = True
            abandoned = [f"a visit still under way {STUCK_SECONDS:g} s after --max-seconds, abandoned (the server "
                         "did not answer it)"] * self.under_way
            return list(self.visits), list(self.questions), self.errors + abandoned


def run_clients(visits, clients: int, deadline: float, run_visit, stuck_seconds: float = STUCK_SECONDS) -> None:
    """`run_visit(visit)` for every visit in order, `clients` at a time, until all are done or
    time.perf_counter() passes `deadline` (visits already started finish; those still under
    way `stuck_seconds` after it are left running, abandoned). An interrupt (Ctrl-C) or an
    error raised out of `run_visit` stops the other clients after their current visit, and is
    raised once they have; a second Ctrl-C stops waiting for them. The clients are daemon
    threads: a visit held by a server that no longer answers does not keep the process alive
    once the run gives up on it (with --url nothing else would end it)."""
    pending = iter(visits)
    lock = threading.Lock()
    stop = threading.Event()
    errors: list[BaseException] = []

    def client() -> None:
        try:
            while time.perf_counter() < deadline and not stop.is_set():
                with lock:
                    visit = next(pending, None)
                if visit is None:
                    return
                run_visit(visit)
        except BaseException as error:  # at once: the other clients stop after their visit
            stop.set()
            errors.append(error)

    threads = [threading.Thread(target=client, name=f"client-{index}", daemon=True) for index in range(clients)]
    for thread in threads:
        thread.start()
    try:
        for thread in threads:
            thread.join(timeout=max(0.0, deadline + stuck_seconds - time.perf_counter()))
    except BaseException:  # Ctrl-C reaches the main thread: the visits under way finish
        stop.set()
        for thread in threads:
            thread.join()
        raise
    stop.set()  # a client past the bound starts no other visit, should its visit end after all
    if errors:
        raise errors[0]


def flush_cache(url: str, attempts: int = 30, pause: float = 2.0) -> None:
    """Empty the server's cache before a run, so that what it reports (its store's counters,
    its hits) is this run's. SGLang refuses a flush while any request is queued or running
    (its own or the plugin's repetition chunks): tried again, and raised if it never takes."""
    for attempt in range(attempts):
        response = requests.post(url + "/flush_cache", timeout=120)
        if response.ok:
            return
        if attempt < attempts - 1:
            time.sleep(pause)
    raise TimeoutError(f"{url}/flush_cache refused {attempts} times over {attempts * pause:.0f} s (HTTP "
                       f"{response.status_code}: {response.text.strip()[:200]}): the server is busy; run again when "
                       "it is idle")


#: Seconds the final figures wait, after the workload, for the servers' last compressions (a
#: prefix waits for its repetition at most --kv-observe-wait, 30 s by default).
SETTLE_SECONDS = 60.0


def settled_stores(urls: list[str], timeout: float = SETTLE_SECONDS, pause: float = 0.5) -> list[dict | None]:
    """Each server's counters once no prefix waits for its compression (`pending` 0: a prefix in
    its repetition waits too), or as they are `timeout` s after the workload ended: read
    straight away, the last documents' compressions and repetitions would be missing from the
    figures. The wait is not in the workload's time."""
    deadline = time.monotonic() + timeout
    while True:
        finals = [server_facts(server)["store"] for server in urls]
        unfinished = sum((final or {}).get("pending", 0) for final in finals)
        if not unfinished or time.monotonic() >= deadline:
            return finals
        time.sleep(pause)


def per_server(urls: list[str], finals: list[dict | None], samples: list[dict]) -> list[dict]:
    """Behind a router: each server's peak compressed-store entries over the samples (None for
    a server without a store, as under --kv-policy none) and its compressions."""
    def peak_entries(index: int) -> int | None:
        entries = [sample["server_entries"][index] for sample in samples if sample.get("server_entries")]
        return max((count for count in entries if count is not None), default=None)

    return [{"url": server, "peak_store_entries": peak_entries(index),
             "compressions": (final or {}).get("compressions")}
            for index, (server, final) in enumerate(zip(urls, finals))]


def run_workload(url: str, documents, prefix_tokens: list[int], visits, config: ServeConfig, label: str,
                 progress: bool) -> dict:
    """Every visit as a fork program, `config.clients` at a time, in order, until done or
    `config.max_seconds` (visits already started finish). Returns the policy's record."""
    from tqdm import tqdm

    from lava_sglang.frontend import multi_question_qa

    endpoint = timed_endpoint(url)
    flush_cache(url)
    urls = server_urls(url)  # several behind SGLang's router
    facts = server_facts(urls[0])
    capacity = total([facts["capacity_tokens"], *(server_facts(server)["capacity_tokens"] for server in urls[1:])])
    sampler = Sampler(urls, config.sample_interval)
    results = VisitResults()
    started = time.perf_counter()
    bar = tqdm(total=sum(len(v.questions) for v in visits), desc=label, unit="question", disable=not progress)

    def run_visit(visit) -> None:
        document = documents[visit.document]
        prefix, suffixes = program_inputs(document, visit)
        visit_endpoint = endpoint.for_visit()
        begin = time.perf_counter()
        results.begin()
        try:
            state = multi_question_qa.run(prefix=prefix, suffixes=suffixes, max_tokens=config.max_tokens,
                                          backend=visit_endpoint)
            answers = state["answers"]
        except Exception as error:  # a failed program is counted, the run goes on
            results.end(error=f"visit {visit.index}: {type(error).__name__}: {error}")
            return
        record, questions = visit_records(visit, document, prefix_tokens[visit.document], visit_endpoint.calls,
                                          answers, time.perf_counter() - begin)
        if results.end(record, questions):
            bar.update(len(questions))

    sampler.start()
    try:
        run_clients(visits, config.clients, started + config.max_seconds, run_visit)
    finally:
        wall = time.perf_counter() - started
        visit_rows, question_rows, errors = results.close()
        samples = sampler.stop()
        bar.close()
    finals = settled_stores(urls)
    store = combined_store(finals)
    bytes_per_token = facts["bytes_per_token"]
    if store and store.get("prefix_tokens"):  # the plugin's exact figure: full bytes / tokens
        bytes_per_token = (store["bytes_stored"] + store["bytes_saved"]) / store["prefix_tokens"]
    record = summarize(label, visit_rows, question_rows, samples, store, wall, capacity,
                       bytes_per_token, len(documents), truncated=len(visit_rows) + len(errors) < len(visits))
    if len(urls) > 1:
        record["servers"] = per_server(urls, finals, samples)
    record["errors"] = errors
    record["kv_policy_options"] = facts["kv_policy"]
    record["visit_records"] = sorted(visit_rows, key=lambda r: r["visit"])
    record["question_records"] = sorted(question_rows, key=lambda r: (r["visit"], r["question"]))
    return record


def policy_server_args(policy: str, config: ServeConfig, capacity: int | None, cuda: bool) -> list[str]:
    """The flags of `policy`'s server, `--server-args` last, less the plugin flags it refuses
    as doing nothing there: stock SGLang's (`none`) gets none of them, a policy that scores
    nothing (streamingllm) no --kv-observe-* flag."""
    from lava_sglang.policy import POLICIES as POLICY_REGISTRY
    from lava_sglang.sglang_plugin.config import FLAGS, OBSERVE_FLAG_READERS

    args = ["--kv-policy", policy, "--enable-cache-report"]
    if policy != "none":
        args += ["--kv-budget", str(config.budget)]
    if not cuda:
        args += ["--dtype", "float32"]  # the CPU engine's exact mode
    if capacity:
        args += ["--max-total-tokens", str(capacity)]
    if policy == "none":
        unread = [flag for flag, *_ in FLAGS.values()]
    elif not POLICY_REGISTRY[policy].needs_scores:
        unread = [FLAGS[f"kv_{name}"][0] for name in OBSERVE_FLAG_READERS]
    else:
        unread = []
    return args + without_flags(config.server_args, unread)


def without_flags(server_args: list[str], flags: list[str]) -> list[str]:
    """`server_args` less `flags` and their values (each takes one value, `--flag value` or
    `--flag=value`; abbreviations of the plugin's are refused by `check_extra_server_args`)."""
    kept, skip_value = [], False
    for arg in server_args:
        if skip_value:
            skip_value = False
        elif arg in flags:
            skip_value = True
        elif arg.partition("=")[0] not in flags:
            kept.append(arg)
    return kept


def check_server_flags(config: ServeConfig, capacity: int | None, cuda: bool, prefix_tokens: list[int]) -> None:
    """Every policy's server flags checked as its server will check them at launch (its --kv-*
    flags and the SGLang options a policy cannot serve with), before any server starts: a
    `--server-args` that one policy's server refuses (`--kv-observe branches` for kvzip,
    `--page-size 16` for every compressing one) would otherwise stop the run after the
    policies before it had taken their time. And every compressing server must compress the
    documents (`prefix_tokens`, each fork prefix's tokens): a document below its
    --kv-min-prefix, or a budget that keeps a whole document, would measure stock SGLang
    under the policy's name."""
    from lava_sglang.sglang_plugin.config import ConfigError
    from lava_sglang.sglang_plugin.plugin import check_launch_args

    for policy in config.policies:
        try:
            server = check_launch_args(policy_server_args(policy, config, capacity, cuda))
        except ConfigError as error:
            raise ValueError(f"--server-args: the {policy} server would refuse them: {error}; leave {policy} out "
                             f"with --policies") from None
        check_compresses(server, f"the {policy} server", prefix_tokens, "pass --server-args=\"--kv-min-prefix N\"",
                         f"--budget {config.budget}", "give a smaller ratio")


def check_compresses(server, name: str, prefix_tokens: list[int], min_prefix_fix: str, budget_name: str,
                     budget_fix: str) -> None:
    """Every document compressed by `server` (a KvPolicyConfig; nothing to check without a
    policy): none below its --kv-min-prefix, and its budget keeps fewer tokens than the
    shortest fork prefix (the prefix less its last token, which the commit recomputes)."""
    if not server.enabled:
        return
    shortest = min(prefix_tokens)
    if shortest < server.min_prefix:
        raise ValueError(f"a document of {shortest} tokens is below {name}'s --kv-min-prefix {server.min_prefix}: "
                         f"it would not be compressed (raise --context, or {min_prefix_fix})")
    if not server.evicts(shortest - 1):
        raise ValueError(f"{budget_name} with {name}'s --kv-window {server.window} keeps every token of a "
                         f"{shortest - 1}-token document: it would compress nothing; {budget_fix} or a longer "
                         "--context")


def served_policy(kv_policy: dict | None):
    """The KvPolicyConfig a running server reports in /server_info (`lava_kv_policy`: its
    fields, beside counters); stock SGLang's (policy none) for a server without the plugin."""
    from lava_sglang.sglang_plugin.config import KvPolicyConfig

    return KvPolicyConfig.from_fields(kv_policy or {})


def run_benchmark(config: ServeConfig, progress: bool = True, log_dir: Path | None = None,
                  on_policy_done=None) -> dict:
    """Every policy's workload; `on_policy_done(result so far)` after each, so that a server
    that fails later does not lose the policies already measured."""
    import torch
    from transformers import AutoTokenizer

    from lava_sglang.bench.documents import prompt_parts

    config.validate()
    started = time.time()
    cuda = torch.cuda.is_available()
    if config.url:
        model_path = served_model_path(config.url)
    else:
        from lava_sglang.model import smollm2_path

        model_path = config.model or str(smollm2_path())
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    documents = make_documents(tokenizer, config)
    prefix_tokens = [len(tokenizer(prompt_parts(d.text, "")[0]).input_ids) for d in documents]
    visits = build_workload([len(d.questions) for d in documents], config.questions_per_visit, config.order)
    capacity = config.max_total_tokens
    if capacity is None and config.memory_bound and not config.url:
        resident_documents = config.resident_documents or MEMORY_BOUND["resident_documents"]
        capacity = memory_bound_capacity(prefix_tokens, resident_documents)
    if not config.url:
        check_server_flags(config, capacity, cuda, prefix_tokens)
        question_tokens = max(len(tokenizer(prompt_parts("", question.text)[1], add_special_tokens=False).input_ids)
                              for document in documents for question in document.questions)
        check_request_fits(model_path, policy_server_args(config.policies[0], config, capacity, cuda),
                           max(prefix_tokens) + question_tokens, config.max_tokens, cpu_engine=not cuda)
    records, servers = [], {}
    distinct_questions = min(len({question.text for question in document.questions}) for document in documents)
    code = code_revision()  # now: the run's own reports, written into the checkout, would make it read dirty

    def result_so_far() -> dict:
        meta = run_metadata(config, model_path, cuda, servers, prefix_tokens, capacity, len(visits),
                            time.time() - started, distinct_questions)
        meta["versions"] = {"lava-sglang": code, **meta["versions"]}
        return {"records": list(records), "meta": meta}

    if config.url:
        facts = server_facts(server_urls(config.url)[0])
        if facts["unreadable_answers"]:
            raise ValueError(f"the server at {config.url} runs with {', '.join(facts['unreadable_answers'])}: the "
                             "programs' streamed answers would be cut short; start it without")
        check_compresses(served_policy(facts["kv_policy"]), f"the server at {config.url}", prefix_tokens,
                         "start it with a smaller --kv-min-prefix", "its --kv-budget "
                         f"{(facts['kv_policy'] or {}).get('budget')}", "start it with a smaller budget")
        label = facts["kv_policy"].get("policy", "none") if facts["kv_policy"] else "none"
        # The server's policy and budget, for the report (the policies' default list did not run).
        config = replace(config, policies=[label], budget=(facts["kv_policy"] or {}).get("budget"))
        records.append(run_workload(config.url, documents, prefix_tokens, visits, config, label, progress))
        servers[label] = {"url": config.url, "args": None, "model_path": model_path}  # for serve-reference
    else:
        log_dir = Path(log_dir or tempfile.mkdtemp(prefix="lava-bench-serve-"))
        for policy in config.policies:
            args = policy_server_args(policy, config, capacity, cuda)
            log_path = log_dir / f"{policy}.log"
            if progress:
                print(f"[{policy}] starting the server: {' '.join(args)} (log: {log_path})", file=sys.stderr,
                      flush=True)
            with ServerProcess(model_path, args, log_path=log_path) as server:
                servers[policy] = {"args": server.command[server.command.index("--port") + 2:],
                                   "log": str(log_path)}
                records.append(run_workload(server.url, documents, prefix_tokens, visits, config, policy,
                                            progress))
            if on_policy_done is not None and policy != config.policies[-1]:
                on_policy_done(result_so_far())
    return result_so_far()


def served_model_path(url: str) -> str:
    """The checkpoint the server at `url` serves (its /get_model_info)."""
    response = requests.get(url + "/get_model_info", timeout=60)
    model_path = response.json().get("model_path") if response.status_code == 200 else None
    if not model_path:
        raise ValueError(f"{url} did not say which model it serves (GET /get_model_info: HTTP "
                         f"{response.status_code}); is it an SGLang server?")
    return model_path


def run_metadata(config: ServeConfig, model_path: str, cuda: bool, servers: dict, prefix_tokens: list[int],
                 capacity: int | None, num_visits: int, wall_seconds: float,
                 distinct_questions: int | None = None) -> dict:
    import os

    import sglang
    import torch
    import transformers

    device = torch.cuda.get_device_name(0) if cuda else "CPU (SGLang CPU engine)"
    return {
        "model": Path(model_path).name,
        "device": device,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}",
        "versions": {"sglang": sglang.__version__, "torch": torch.__version__,
                     "transformers": transformers.__version__, "python": platform.python_version()},
        "servers": servers,
        "workload": {
            "documents": config.documents, "questions_per_document": config.questions,
            "distinct_questions_per_document": distinct_questions,
            "questions_per_visit": config.questions_per_visit or config.questions, "visits": num_visits,
            "order": config.order, "clients": config.clients, "max_tokens": config.max_tokens,
            "context_tokens": config.context, "document_tokens": prefix_tokens, "seed": config.seed,
            "budget": config.budget, "max_total_tokens": capacity, "memory_bound": config.memory_bound,
            "resident_documents": config.resident_documents, "max_seconds": config.max_seconds,
            "miss_slack_tokens": MISS_SLACK,
        },
        "config": asdict(config),
        "wall_seconds": round(wall_seconds, 1),
    }


# ----------------------------------------------------------------------------- the CLI


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    add = parser.add_argument
    add("--url", help="benchmark this running server, or SGLang's router in front of servers (loopback only), "
        "instead of starting one server per policy")
    add("--model", help="checkpoint for the servers it starts (default: SmolLM2, `lava-sglang model`)")
    add("--policies", nargs="+", choices=POLICIES, metavar="POLICY",
        help=f"from {', '.join(POLICIES)} (default: all; --memory-bound: none lava)")
    add("--budget", type=keep_ratio, help="--kv-budget keep ratio of every policy (default 0.2)")
    add("--documents", type=positive_int, help="documents (default 4; --memory-bound: 10)")
    add("--questions", type=positive_int, help="questions per document (default 4; --memory-bound: 8)")
    add("--questions-per-visit", type=at_least(0), help="questions per fork program; 0: all of a document's in one "
        "(default 2)")
    add("--order", choices=ORDERS, help="visit order (default interleaved)")
    add("--context", type=at_least(MIN_CONTEXT), default=1024,
        help=f"document tokens, at least {MIN_CONTEXT} (default 1024)")
    add("--clients", type=positive_int, help="concurrent clients (default 2; --memory-bound: 1)")
    add("--max-tokens", type=at_least(CODE_DIGITS), default=RETRIEVAL_ANSWER_TOKENS,
        help=f"answer length cap, at least {CODE_DIGITS} (a planted code's digits; default {RETRIEVAL_ANSWER_TOKENS})")
    add("--max-total-tokens", type=positive_int,
        help=f"KV pool cap passed to every server (default: {CPU_DEFAULT_MAX_TOTAL_TOKENS} on the CPU engine, "
             "SGLang's own on a GPU; --memory-bound: "
             "resident-documents x the longest document's tokens + 256, rounded up to a multiple of 64)")
    add("--resident-documents", type=positive_int, help="--memory-bound: documents stock SGLang's pool holds "
        "(default 3)")
    add("--memory-bound", action="store_true",
        help="the memory-bound comparison: stock SGLang (none) against lava under a pool cap that holds "
             "--resident-documents full documents, each flag's --memory-bound default, and the issue's targets "
             "judged in the report")
    add("--max-seconds", type=positive_float, default=900.0, help="workload time per policy, server start excluded; "
        f"no visit starts after it; at most {MAX_WORKLOAD_SECONDS} (a week; default 900)")
    add("--sample-interval", type=positive_float, default=2.0,
        help=f"seconds between /server_info samples, {MIN_SAMPLE_INTERVAL} to --max-seconds (default 2)")
    add("--server-args", default="",
        help="extra server flags, one string, given with = (--server-args=\"--kv-window 64\")")
    add("--seed", type=at_least(0), default=0, help="document seed (default 0); one seed draws the keys and codes "
        "from one random stream at every --context: runs at two lengths can share many questions")
    add("--out", default=str(RESULTS_DIR), help="output folder (default docs/results)")
    add("--name", type=file_stem, help="file stem (default serving; --memory-bound: serving_memory_bound)")
    add("--notes", help="markdown file included as 'Reading the results'; none: no notes (default: "
        "with --report-only, <out>/<stem>_notes.md if it exists; a new run has none)")
    add("--log-dir", help="where the servers' logs go (default: a new temporary folder)")
    add("--report-only", action="store_true", help="rebuild the .md and .png from the .json without running")
    add("--no-progress", action="store_true", help="no progress bar")
    return parser


def config_from_args(args: argparse.Namespace) -> ServeConfig:
    if args.url:  # flags for the servers this command starts, which --url replaces
        starting = [flag for flag, value in (("--model", args.model), ("--policies", args.policies),
                                             ("--budget", args.budget), ("--max-total-tokens", args.max_total_tokens),
                                             ("--server-args", args.server_args), ("--log-dir", args.log_dir))
                    if value]
        if starting:
            raise ValueError(f"{', '.join(starting)} set the servers this command starts; with --url it starts "
                             "none (start the server with those flags yourself)")
    defaults = MEMORY_BOUND if args.memory_bound else STANDARD
    sizes_pool = args.memory_bound and args.max_total_tokens is None and args.url is None
    if args.resident_documents is not None and not sizes_pool:
        raise ValueError("--resident-documents sizes the pool of --memory-bound runs; it does nothing with --url, "
                         "--max-total-tokens or without --memory-bound")

    def pick(name):
        value = getattr(args, name)
        return defaults[name] if value is None else value

    if args.budget is not None and args.policies is not None and set(args.policies) <= {"none"}:
        raise ValueError("--budget: --policies none compresses nothing, so nothing reads it; leave it out")
    try:
        server_args = shlex.split(args.server_args)
    except ValueError as error:  # an unbalanced quote
        raise ValueError(f"--server-args {args.server_args!r}: {error}") from None
    return ServeConfig(
        policies=list(pick("policies")), budget=ServeConfig.budget if args.budget is None else args.budget,
        documents=pick("documents"),
        questions=pick("questions"), order=pick("order"),
        # A default wider than the questions asked is all of them in one visit (the flag itself is checked).
        questions_per_visit=(pick("questions_per_visit") if args.questions_per_visit is not None
                             else min(pick("questions_per_visit"), pick("questions"))),
        context=args.context, clients=pick("clients"), max_tokens=args.max_tokens,
        max_total_tokens=args.max_total_tokens,
        resident_documents=pick("resident_documents") if sizes_pool else None,  # recorded only where it sizes the pool
        memory_bound=args.memory_bound, max_seconds=args.max_seconds, sample_interval=args.sample_interval,
        server_args=server_args, seed=args.seed, model=args.model,
        url=args.url.rstrip("/") if args.url else None,
    )


def run(args: argparse.Namespace) -> int:
    from lava_sglang.bench.serve_report import SERVE_META_KEYS, write_serving_report

    stem = args.name or ("serving_memory_bound" if args.memory_bound else "serving")
    out_dir = Path(args.out)
    notes = read_notes(args.notes, out_dir / f"{stem}_notes.md" if args.report_only else None)

    def write(result, file_stem: str = stem) -> list[Path]:
        if notes:
            result["notes"] = notes
        elif args.notes is not None:  # an explicit --notes none (or an empty file) takes out a run's own
            result.pop("notes", None)
        return write_serving_report(result, out_dir, file_stem)

    if args.report_only:
        refuse_run_flags(args, add_arguments(argparse.ArgumentParser()), REPORT_FLAGS + ("name", "memory_bound"))
        results_path = out_dir / f"{stem}.json"
        if not results_path.is_file():
            raise ValueError(f"--report-only: no {results_path} to rebuild the report from")
        result = check_results(read_json(results_path), str(results_path), "bench serve", SERVE_META_KEYS)
    else:
        config = config_from_args(args)
        config.validate()
        output_folder(out_dir)
        argv = getattr(args, "argv", None) or sys.argv[1:]
        if argv[:2] == ["bench", "serve"]:  # as `lava-sglang bench serve` passes them
            argv = argv[2:]
        command = "lava-sglang bench serve " + " ".join(shlex.quote(a) for a in argv)
        partial_stem, written, partial_paths = f"{stem}_partial", [], []

        def write_so_far(result):
            # The policies measured so far, in files of their own: a run that fails part way leaves
            # the folder's last whole run (docs/results' published one, by default) as it was.
            result["meta"]["command"] = command
            partial_paths[:] = write(result, partial_stem)
            written[:] = [record["policy"] for record in result["records"]]

        try:
            result = run_benchmark(config, progress=not args.no_progress, log_dir=args.log_dir,
                                   on_policy_done=write_so_far)
        except (ServerExited, TimeoutError, requests.RequestException) as error:  # a server failed or died
            saved = (f"; {out_dir / partial_stem}.md holds what was measured before: {', '.join(written)}"
                     if written else "")
            print(f"lava-sglang bench serve: error: {error}{saved}", file=sys.stderr)
            return 1
        result["meta"]["command"] = command
    for path in write(result):
        print(f"wrote {path}")
    if not args.report_only:
        for path in partial_paths:  # the whole run replaces what was measured part way
            path.unlink(missing_ok=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = add_arguments(argparse.ArgumentParser(prog="lava-sglang bench serve", description=__doc__,
                                                   formatter_class=argparse.RawDescriptionHelpFormatter))
    args = parser.parse_args(argv)
    args.argv = list(argv) if argv is not None else sys.argv[1:]
    try:
        return run(args)
    except ValueError as error:
        print(f"lava-sglang bench serve: error: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # a checkpoint or file that is not there
        print(f"lava-sglang bench serve: error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
