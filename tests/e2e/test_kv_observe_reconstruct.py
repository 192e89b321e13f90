"""`--kv-observe reconstruct` on the real server (CPU engine, SmolLM2, fp32).

A fork program's document waits after its commit while the server runs its repetition, one
internal request per 256-token chunk of the document (the document, a repeat instruction and
the chunk), each chunk's tokens freed before the next, each attending to the whole document or
(--kv-observe-view chunk) to its first tokens and the chunk alone; the repetition's attention scores the
document, which is then compressed once, and later programs read the compressed copy,
answering as the reference runtime does with the same chunked scores. Prefill runs in
200-token pieces, so each chunk request is itself scored in pieces. Both policies that plan
from the repetition run it: the default `lava` and the `kvzip` baseline.
"""

from __future__ import annotations

import time

import pytest
import requests
from e2e_support import ask, kv_state, run_record

from lava_sglang.bench.documents import prompt_parts, retrieval_documents
from lava_sglang.policy import Reconstruct, assistant_turn_text
from lava_sglang.sglang_plugin.server_process import ServerProcess

pytestmark = pytest.mark.model

ANSWER_TOKENS = 12
REPEAT_CHUNK = 256
CONTEXT_LENGTH = 1024  # a ~700-token document and a repetition chunk fit; a ~1,100-token document does not
SERVER_ARGS = ["--dtype", "float32", "--enable-cache-report", "--kv-budget", "0.25", "--kv-observe", "reconstruct",
               "--kv-observe-wait", "120", "--kv-observe-chunk", str(REPEAT_CHUNK),
               "--chunked-prefill-size", "200", "--context-length", str(CONTEXT_LENGTH)]


@pytest.fixture(scope="module")
def document(tokenizer):
    count = lambda text: len(tokenizer(text).input_ids)  # noqa: E731
    return retrieval_documents(count, 600, [4], seed=2)[0]


@pytest.fixture(scope="module", params=[("lava", "prefix"), ("kvzip", "prefix"), ("lava", "chunk")],
                ids=lambda param: "-".join(param))
def policy_and_view(request) -> tuple[str, str]:
    """The policy, and what each repetition chunk attends to (--kv-observe-view)."""
    return request.param


@pytest.fixture(scope="module")
def policy(policy_and_view) -> str:
    return policy_and_view[0]


@pytest.fixture(scope="module")
def server(policy_and_view, smollm2_path, tmp_path_factory):
    policy, view = policy_and_view
    log_path = tmp_path_factory.mktemp("sglang") / f"reconstruct-{policy}-{view}.log"
    with ServerProcess(smollm2_path, ["--kv-policy", policy, "--kv-observe-view", view, *SERVER_ARGS],
                       log_path=log_path) as process:
        yield process


def wait_for_compressions(url: str, count: int, timeout: float = 300) -> dict:
    """The repetition may outlive the program's branches: the compression follows its release."""
    deadline = time.monotonic() + timeout
    while (stats := kv_state(url)["store"])["compressions"] < count and time.monotonic() < deadline:
        time.sleep(1)
    return stats


def test_a_document_is_compressed_once_by_its_repetition(server, policy, document, tokenizer, smollm2_path):
    assert requests.post(server.url + "/flush_cache", timeout=60).status_code == 200
    capacity = kv_state(server.url)["store"]["pool_available"]
    prefix_text = prompt_parts(document.text, "")[0]
    prefix_tokens = len(tokenizer(prefix_text).input_ids)
    answers, meta_info = ask(server.url, document, range(2), ANSWER_TOKENS)
    assert len(answers) == 2 and all(answer.strip() for answer in answers)
    assert all(meta["cached_tokens"] >= prefix_tokens for meta in meta_info)  # the branches read the full prefix

    stats = wait_for_compressions(server.url, 1)
    assert (stats["compressions"], stats["entries"], stats["pending"], stats["repetitions"]) == (1, 1, 0, 0)
    log = server.log_path.read_text()
    assert "waits for its repetition" in log
    # Three chunks (a fourth would copy window tokens only), each its instruction and its copy.
    # The default prompt: each chunk is the assistant's reply (the chat template's opening).
    source = Reconstruct(chunk_tokens=REPEAT_CHUNK)
    window = kv_state(server.url)["window"]
    prefix_ids = tokenizer(prefix_text).input_ids
    turn = assistant_turn_text(tokenizer.apply_chat_template)
    chunk_requests = [len(source.chunk_prompt(prefix_ids, start, lambda text: tokenizer(
        text, add_special_tokens=False).input_ids, turn)) + min(REPEAT_CHUNK, prefix_tokens - start)
        for start in range(0, prefix_tokens - window, REPEAT_CHUNK)]
    assert len(chunk_requests) == 3
    assert f"observed by its repetition: {sum(chunk_requests)} tokens prefilled in 3 chunk(s)" in log
    # Memory while scoring: the prefix, one chunk request at a time, and the branches' own
    # tokens (their questions and answers), never the document twice.
    branch_tokens = sum(meta["prompt_tokens"] - prefix_tokens + meta["completion_tokens"] for meta in meta_info)
    last = stats["last_repetition"]
    assert (last["chunks"], last["tokens_prefilled"]) == (3, sum(chunk_requests))
    assert 0 < last["extra_slots_peak"] <= max(chunk_requests) + branch_tokens < prefix_tokens
    # Its cost against the document's prefill (the commit's first forward to its release).
    assert last["prefill_seconds"] > 0 and last["seconds"] > 0
    assert stats["repetition_cost"]["documents"] == 1
    assert stats["repetition_cost"]["ratio"] == pytest.approx(last["seconds"] / last["prefill_seconds"], rel=1e-2)
    # Its chunks' own forwards, timed as the prefill is: what is left once the gaps between chunks are taken out.
    assert 0 < last["forward_seconds"] < last["seconds"] + 0.5
    assert stats["repetition_cost"]["forward_ratio"] == pytest.approx(last["forward_seconds"] / last["prefill_seconds"],
                                                                      rel=1e-2)
    # The full prefix, the branches' tokens and the repetition's own tokens are all given
    # back: the tree holds only the compressed copy's slots (a quarter of the rows).
    assert stats["protected"] == 0 and stats["evictable"] == stats["borrowed_slots"] < prefix_tokens / 2

    # A later program reads the compressed copy, compresses nothing, and answers as the
    # reference runtime does with the repetition's scores (the same plan within the numerics).
    later, later_meta = ask(server.url, document, range(1, 4), ANSWER_TOKENS)
    assert all(meta["cached_tokens"] >= prefix_tokens - 1 for meta in later_meta)
    assert kv_state(server.url)["store"]["compressions"] == 1
    assert "Traceback" not in server.log_path.read_text()

    from lava_sglang.bench.serve_reference import reference_answers
    from lava_sglang.reference import ReferenceRuntime

    options = kv_state(server.url)
    # The first visit's branches ran on the full prefix, the second visit's on the copy.
    record = run_record(policy, options, prefix_tokens, [(range(2), answers, meta_info),
                                                         (range(1, 4), later, later_meta)])
    rows = reference_answers(ReferenceRuntime.load(smollm2_path, window=options["window"]), [document], record,
                             ANSWER_TOKENS, progress=False)
    assert [row["compressed"] for row in rows] == [False] * 2 + [True] * 3
    assert all(row["prompt_tokens_match"] for row in rows)
    assert all(row["identical"] for row in rows), [(row["server_answer"], row["reference_answer"]) for row in rows]

    assert requests.post(server.url + "/flush_cache", timeout=60).status_code == 200
    assert kv_state(server.url)["store"]["pool_available"] == capacity


def test_a_prefix_whose_repetition_exceeds_the_context_is_compressed_by_its_tail_at_once(server, tokenizer):
    assert requests.post(server.url + "/flush_cache", timeout=60).status_code == 200
    count = lambda text: len(tokenizer(text).input_ids)  # noqa: E731
    prefix = prompt_parts(retrieval_documents(count, 900, [1], seed=3)[0].text, "")[0]
    prefix_tokens = count(prefix)
    assert CONTEXT_LENGTH - REPEAT_CHUNK < prefix_tokens < CONTEXT_LENGTH
    # What fork() sends to commit a prefix.
    commit = requests.post(server.url + "/generate", timeout=300,
                           json={"text": prefix, "sampling_params": {"max_new_tokens": 0}})
    assert commit.status_code == 200, commit.text
    stats = kv_state(server.url)["store"]
    assert (stats["entries"], stats["pending"], stats["repetitions"]) == (1, 0, 0)  # no wait
    assert (f"no repetition of a {prefix_tokens}-token prefix: the prefix and its repetition chunk "
            f"(--kv-observe-chunk {REPEAT_CHUNK}) exceed the longest prompt the server admits, "
            f"{CONTEXT_LENGTH - 7} tokens (the context length or the KV pool, less SGLang's margin); compressed by its "
            "tail") in server.log_path.read_text()
    assert requests.post(server.url + "/flush_cache", timeout=60).status_code == 200
