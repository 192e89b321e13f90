"""A `--kv-policy lava --tp-size 3` server (CPU engine, SmolLM2, fp32): SmolLM2's 3 KV heads,
one per rank. Each rank scores only its head; the plan is made from every rank's gathered
scores, so each rank keeps exactly the rows the single-process plan keeps for its head, all
ranks take the same number of slots, and the document is compressed on every rank in the
same scheduler step; a second document that does not fit beside the first evicts it on
every rank. Three ranks on two cores are slow; two documents and three programs do.
"""

from __future__ import annotations

import re
import time

import pytest
from e2e_support import ask, kv_state, metric, metrics_text, planted_documents, prefix_tokens, run_record

from lava_sglang.bench.documents import prompt_parts
from lava_sglang.sglang_plugin.server_process import ServerProcess

pytestmark = pytest.mark.model

TP_SIZE = 3
ANSWER_TOKENS = 12
REPEAT_CHUNK = 256
# One ~700-token document's first visit (its prefix, branches and a repetition chunk, ~1,060
# slots) fits; a second one's does not beside the first's compressed copy (~190 slots).
POOL_TOKENS = 1100
SERVER_ARGS = ["--kv-policy", "lava", "--dtype", "float32", "--enable-cache-report", "--kv-budget", "0.25",
               "--kv-observe-wait", "300", "--kv-observe-chunk", str(REPEAT_CHUNK), "--context-length", "1024",
               "--tp-size", str(TP_SIZE), "--max-total-tokens", str(POOL_TOKENS), "--enable-metrics"]
COMPRESSED = re.compile(r"TP(\d)\] lava: compressed prefix (\d+): (\d+) tokens, .* \((\d+) rows in (\d+) slots\)")
EVICTED = re.compile(r"TP(\d)\] lava: evicted compressed prefix (\d+) ")


def wait_for_compressions(url: str, count: int, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while kv_state(url)["store"]["compressions"] < count and time.monotonic() < deadline:
        time.sleep(1)


@pytest.fixture(scope="module")
def server(smollm2_path, tmp_path_factory):
    with ServerProcess(smollm2_path, SERVER_ARGS, log_path=tmp_path_factory.mktemp("tp") / "server.log") as server:
        yield server


def test_every_rank_keeps_its_heads_rows_of_the_single_process_plan_and_evicts_it_with_the_others(
        server, tokenizer, smollm2_path):
    document = planted_documents(tokenizer, 600, [2])[0]
    prefix_len = prefix_tokens(tokenizer, document)
    first, first_meta = ask(server.url, document, range(2), ANSWER_TOKENS)
    wait_for_compressions(server.url, 1)
    later, later_meta = ask(server.url, document, range(1, 3), ANSWER_TOKENS)
    assert all(meta["cached_tokens"] >= prefix_len - 1 for meta in later_meta)  # the compressed copy
    stats = kv_state(server.url)["store"]
    assert (stats["compressions"], stats["repetitions_cut_short"]) == (1, 0)

    # Compressed once on every rank, each rank taking as many slots (the log gives their count,
    # not their ids; equal pools after equal allocations give the same ids).
    log = server.log_path.read_text()
    assert "Traceback" not in log
    compressed = {int(rank): (int(entry), int(tokens), int(rows), int(slots))
                  for rank, entry, tokens, rows, slots in COMPRESSED.findall(log)}
    assert sorted(compressed) == list(range(TP_SIZE)) and len(COMPRESSED.findall(log)) == TP_SIZE
    assert len({(entry, tokens, slots) for entry, tokens, _, slots in compressed.values()}) == 1

    # The single-process plan (the reference runtime's, on the same chunked repetition):
    # rank r holds KV head r, and keeps that head's rows, layer by layer.
    from lava_sglang.reference import ReferenceRuntime

    options = kv_state(server.url)
    runtime = ReferenceRuntime.load(smollm2_path, window=options["window"])
    capture = runtime.prefill(tokenizer(prompt_parts(document.text, "")[0]).input_ids)
    observation = runtime.observe(capture, "reconstruct", chunk_tokens=REPEAT_CHUNK,
                                  normalize=options["observe_normalize"], view=options["observe_view"],
                                  chat_turn=options["observe_prompt"] == "chat")
    plan = runtime.compress(capture, "lava", options["budget"], observation=observation, window=options["window"],
                            pool_kernel=options["pool_kernel"], alpha=options["alpha"]).plan
    keep_len = prefix_len - 1  # a fork prefix keeps all but its last token
    head_rows = [sum(int((layer[head] < keep_len).sum()) for layer in plan.kept) for head in range(TP_SIZE)]
    rank_rows = [compressed[rank][2] for rank in range(TP_SIZE)]
    # One threshold over all heads keeps the same total; a score within float noise of it
    # (the TP forward sums its all-reduces in another order) may sit on either side, so a
    # head's count may move by a row or two. Ranks planning alone would each keep a third.
    assert sum(rank_rows) == sum(head_rows)
    assert all(abs(rows - expected) <= 2 for rows, expected in zip(rank_rows, head_rows)), (rank_rows, head_rows)
    assert max(head_rows) - min(head_rows) > 100  # dynamic head budgets: the ranks' shares differ, the slots do not

    # The answers through the compressed copy are the reference runtime's, token for token.
    from lava_sglang.bench.serve_reference import reference_answers

    record = run_record("lava", options, prefix_len, [(range(2), first, first_meta), (range(1, 3), later, later_meta)])
    rows = reference_answers(runtime, [document], record, ANSWER_TOKENS, progress=False)
    assert [row["compressed"] for row in rows] == [False, False, True, True]
    assert all(row["identical"] for row in rows), [(row["server_answer"], row["reference_answer"]) for row in rows]

    # A second document does not fit beside the first's copy: the first is evicted on every
    # rank, and the second compressed on every rank, taking as many slots.
    other = planted_documents(tokenizer, 600, [3])[0]
    ask(server.url, other, range(2), ANSWER_TOKENS)
    wait_for_compressions(server.url, 2)
    stats = kv_state(server.url)["store"]
    assert (stats["compressions"], stats["evictions"], stats["entries"]) == (2, 1, 1)
    log = server.log_path.read_text()
    assert sorted(EVICTED.findall(log)) == [(str(rank), "0") for rank in range(TP_SIZE)]
    second = {rank: slots for rank, entry, _, _, slots in COMPRESSED.findall(log) if entry == "1"}
    assert sorted(second) == [str(rank) for rank in range(TP_SIZE)] and len(set(second.values())) == 1

    # /metrics counts each prefix once (TP rank 0 records the events) and the bytes of every rank.
    text = metrics_text(server.url)
    assert metric(text, "lava:compress_seconds_count") == 2 and metric(text, "lava:evicted_prefixes_total") == 1
    assert metric(text, "lava:store_entries") == 1
    second_rows = sum(int(rows) for _, entry, _, rows, _ in COMPRESSED.findall(log) if entry == "1")
    bytes_per_row = 2 * runtime.model.config.head_dim * 4  # K and V, fp32
    assert metric(text, "lava:store_bytes") == second_rows * bytes_per_row
