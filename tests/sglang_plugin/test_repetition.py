"""`RepetitionScores`: the server's chunked repetition of a prefix and its scoring (observe "reconstruct")."""

import dataclasses
import logging
import math
from types import SimpleNamespace

import pytest
import torch

from lava_sglang.policy import Reconstruct, repeat_attention_chunk
from lava_sglang.sglang_plugin import repetition, touchpoints
from lava_sglang.sglang_plugin.repetition import REPETITION_RID_TAG, RepetitionClient, RepetitionScores

NUM_Q_HEADS, NUM_KV_HEADS, HEAD_DIM = 4, 2, 8
PREFIX_LEN, WINDOW = 10, 3  # n, w: m = 7 selectable tokens
SCALING = HEAD_DIM ** -0.5
# A stand-in tokenizer: instruction, continue instruction, the chat template's assistant opening.
PROMPTS = {"I": [100, 101], "C": [200], "<turn>": [300]}


def chat_template(messages, add_generation_prompt, tokenize):
    """A stand-in template: the user's message, then "<turn>" opens the reply."""
    return "".join(message["content"] for message in messages) + "<turn>"
PREFIX_IDS = list(range(1, PREFIX_LEN + 1))


def new_scores(chunk_tokens=PREFIX_LEN, num_layers=1, normalize="global", view="prefix") -> RepetitionScores:
    source = Reconstruct(instruction="I", continue_instruction="C", overlap_tokens=2, chunk_tokens=chunk_tokens,
                         normalize=normalize, sink_tokens=1, view=view)
    return RepetitionScores.plan(PREFIX_IDS, source, PROMPTS.__getitem__, WINDOW, num_layers, chat_template)


def sequence(chunk, seed=0):
    """Queries [n + q, Hq, d] and keys [n + q, Hkv, d] of the prefix and one chunk's request, as the pool holds them."""
    generator = torch.Generator().manual_seed(seed)
    total = PREFIX_LEN + chunk.num_queries
    return (torch.randn(total, NUM_Q_HEADS, HEAD_DIM, generator=generator),
            torch.randn(total, NUM_KV_HEADS, HEAD_DIM, generator=generator))


def feed(scores, chunk, queries, keys, pieces, layer=0):
    """Extend pieces given as (first position, end): the request's queries and its keys up to `end`."""
    for first, end in pieces:
        scores.add_chunk(chunk.rid, layer, queries[first:end], keys[:end], first, SCALING)


def expected_scores(chunk, queries, keys, normalize="global"):
    start, end = chunk.copied
    return repeat_attention_chunk(queries[PREFIX_LEN:].transpose(0, 1), keys.transpose(0, 1), PREFIX_LEN, PREFIX_LEN,
                                  chunk.copied, SCALING, normalize, 1)[:, :min(end, PREFIX_LEN - WINDOW) - start]


def test_chunks_skip_the_window_and_each_request_is_prefix_prompt_and_chunk():
    scores = new_scores(chunk_tokens=4)  # chunks 0-4, 4-8, 8-10; the last copies window tokens only
    assert [chunk.copied for chunk in scores.chunks] == [(0, 4), (4, 8)]
    assert [scores.input_ids(chunk) for chunk in scores.chunks] == [PREFIX_IDS + [100, 101, 300] + PREFIX_IDS[0:4],
                                                                  PREFIX_IDS + [200, 3, 4, 300] + PREFIX_IDS[4:8]]
    assert scores.num_queries == (3 + 4) + (4 + 4)
    assert scores.longest_request == PREFIX_LEN + 4 + 4
    # One random base, then the tag: SGLang aborts every rid that starts with an aborted one's, so no
    # client's own request ("lava-repeat-") may be a prefix of the chunks'.
    bases = {rid.partition(f"-{REPETITION_RID_TAG}-")[0] for rid in scores.rids}
    assert len(set(scores.rids)) == 2 and len(bases) == 1 and len(bases.pop()) == 32
    assert not any(rid.startswith(REPETITION_RID_TAG) for rid in scores.rids)
    assert new_scores().rids[0] != scores.rids[0]


def test_under_view_chunk_a_piece_attends_to_the_sinks_what_it_copies_and_the_repetition_so_far():
    scores = new_scores(chunk_tokens=4)
    view = RepetitionScores.plan(PREFIX_IDS, dataclasses.replace(scores.source, view="chunk"), PROMPTS.__getitem__,
                                 WINDOW, 1, chat_template)
    second = view.chunks[1]  # copies 4-8 after a 4-token prompt; one sink
    assert view.attended_positions(second.rid, PREFIX_LEN + 3).tolist() == [0, 4, 5, 6, 7, 10, 11, 12]
    assert view.attended_positions(second.rid, PREFIX_LEN) is None  # prefix tokens only: they see the whole row
    assert view.attended_positions(scores.rids[1], PREFIX_LEN + 3) is None  # another repetition's chunk
    assert scores.attended_positions(scores.chunks[1].rid, PREFIX_LEN + 3) is None  # view "prefix": the whole row


def test_a_tokenizer_without_a_chat_template_gets_the_plain_prompt(caplog):
    def no_template(*args, **kwargs):
        raise ValueError("tokenizer.chat_template is not set")

    def raising_template(*args, **kwargs):  # a template's raise_exception("...")
        import jinja2
        raise jinja2.TemplateError("Conversation roles must alternate")

    def no_reply_opening(messages, **kwargs):  # renders the message, and nothing after it
        return "".join(message["content"] for message in messages)

    source = Reconstruct(instruction="I", continue_instruction="C", overlap_tokens=2, chunk_tokens=4)
    for template in (no_template, raising_template, no_reply_opening, None):
        scores = RepetitionScores.plan(PREFIX_IDS, source, PROMPTS.__getitem__, WINDOW, 1, template)
        assert not scores.source.chat_turn
        assert scores.input_ids(scores.chunks[0]) == PREFIX_IDS + [100, 101] + PREFIX_IDS[0:4]
    assert "the repetition runs with --kv-observe-prompt plain" in caplog.text


@pytest.mark.parametrize("normalize", ["global", "local"])
def test_pieces_of_any_split_score_like_the_whole_chunk_and_fill_only_what_it_copies(normalize):
    scores = new_scores(chunk_tokens=4, normalize=normalize)
    expected = torch.zeros(NUM_Q_HEADS, PREFIX_LEN - WINDOW)
    for index, (chunk, pieces) in enumerate(zip(scores.chunks, ([(10, 17)], [(10, 13), (13, 14), (14, 18)]))):
        queries, keys = sequence(chunk, seed=index)
        feed(scores, chunk, queries, keys, pieces)
        start, end = chunk.copied
        expected[:, start:min(end, PREFIX_LEN - WINDOW)] = expected_scores(chunk, queries, keys, normalize)
        assert scores.end_chunk(chunk.rid, checkpointed=True).done
    assert scores.done and scores.failed is None and scores.num_scored == scores.num_queries
    torch.testing.assert_close(scores.repeat[0], expected)


def test_the_attentions_own_lse_gives_the_global_scores_and_is_ignored_under_local():
    for normalize in ("global", "local"):
        with_lse, without = new_scores(normalize=normalize), new_scores(normalize=normalize)
        chunk = with_lse.chunks[0]
        queries, keys = sequence(chunk, seed=4)
        end = PREFIX_LEN + chunk.num_queries
        # The server hands each query's LSE over every key it sees (the global normaliser); the
        # match fell 3 tokens short, so the piece starts inside the prefix.
        grouped = queries[7:end].view(-1, NUM_KV_HEADS, NUM_Q_HEADS // NUM_KV_HEADS, HEAD_DIM)
        logits = torch.einsum("thgd,shd->thgs", grouped, keys[:end]) * SCALING
        causal = torch.arange(end)[None, :] > torch.arange(7, end)[:, None]
        lse = torch.logsumexp(logits.masked_fill(causal[:, None, None], float("-inf")), dim=-1).flatten(1)
        with_lse.add_chunk(chunk.rid, 0, queries[7:end], keys[:end], 7, SCALING, lse=lse)
        feed(without, without.chunks[0], queries, keys, [(7, end)])
        torch.testing.assert_close(with_lse.repeat[0], without.repeat[0])
        # It is what normalises the global scores (a doubled partition function halves them).
        doubled = new_scores(normalize=normalize)
        doubled.add_chunk(doubled.chunks[0].rid, 0, queries[7:end], keys[:end], 7, SCALING, lse=lse + math.log(2))
        torch.testing.assert_close(doubled.repeat[0], without.repeat[0] / (2 if normalize == "global" else 1))


def test_under_view_chunk_global_scores_need_the_attentions_lse():
    # The pool's keys are the whole row; the view's queries saw fewer: only their own LSE normalises them.
    scores = new_scores(chunk_tokens=4, view="chunk")
    chunk = scores.chunks[0]
    queries, keys = sequence(chunk)
    with pytest.raises(ValueError, match="needs its attention's lse"):
        feed(scores, chunk, queries, keys, [(PREFIX_LEN, PREFIX_LEN + chunk.num_queries)])
    local = new_scores(chunk_tokens=4, view="chunk", normalize="local")  # its normaliser is the view's own keys
    feed(local, local.chunks[0], queries, keys, [(PREFIX_LEN, PREFIX_LEN + chunk.num_queries)])
    assert local.repeat[0] is not None


def test_recomputed_prefix_tokens_are_not_repetition_queries_and_a_piece_seen_twice_changes_nothing():
    whole, scores = new_scores(), new_scores()
    queries, keys = sequence(whole.chunks[0], seed=1)
    feed(whole, whole.chunks[0], queries, keys, [(10, 23)])
    # The match fell 3 tokens short (they are recomputed, not repetition queries), and a
    # piece is fed twice (scores are a max over positions, not a count).
    feed(scores, scores.chunks[0], queries, keys, [(7, 13), (7, 13), (13, 23)])
    assert scores.end_chunk(scores.chunks[0].rid, checkpointed=True).done
    torch.testing.assert_close(scores.repeat[0], whole.repeat[0])


def test_a_chunk_released_before_every_layer_scored_every_query_fails_the_repetition():
    scores = new_scores(chunk_tokens=4, num_layers=2)
    chunk = scores.chunks[0]
    queries, keys = sequence(chunk, seed=2)
    feed(scores, chunk, queries, keys, [(10, 17)], layer=0)
    feed(scores, chunk, queries, keys, [(10, 12), (14, 17)], layer=1)  # a gap is not bridged
    assert scores.num_scored == 2
    assert not scores.end_chunk(chunk.rid, checkpointed=True).done
    assert not scores.done and "released with 2 of 7 repetition tokens scored" in scores.failed


def test_a_pending_prefix_waits_for_a_repetition_that_progresses_but_not_for_a_stalled_one():
    from lava_sglang.sglang_plugin.pending import PendingPrefix

    scores = new_scores(chunk_tokens=4)
    pending = PendingPrefix(full_key=None, tail_queries=[], wait=10.0, deadline=100.0, repetition=scores)
    assert not pending.ready(now=50.0)  # before the deadline
    assert pending.ready(now=100.0)  # never began: the deadline holds
    scores.last_progress_at = 95.0
    assert not pending.ready(now=100.0) and not pending.ready(now=104.0)  # scoring: waited for past the deadline
    assert pending.ready(now=105.0)  # no progress for `wait` seconds
    scores.last_progress_at = 104.0
    scores.failed = "chunk released unscored"
    assert pending.ready(now=104.5)  # failed: compressed by its tail at once


def test_repetition_cost_sums_only_documents_whose_prefill_was_timed():
    from lava_sglang.sglang_plugin.pending import RepetitionCost

    cost = RepetitionCost()
    assert cost.stats() == {"documents": 0, "repetition_seconds": 0.0, "prefill_seconds": 0.0, "ratio": None,
                            "forward_seconds": 0.0, "forward_ratio": None, "not_compared": 0}
    cost.add(6.0, 4.0, 5.0)
    cost.add(3.0, None, 3.0)  # a commit not stamped, or mostly cached: no side summed, counted apart
    cost.add(3.0, 2.0, 1.0)
    assert cost.stats() == {"documents": 2, "repetition_seconds": 9.0, "prefill_seconds": 6.0, "ratio": 1.5,
                            "forward_seconds": 6.0, "forward_ratio": 1.0, "not_compared": 1}
    cost.add(3.0, 2.0, None)  # a repetition with an unstamped chunk: its forwards' sum is unknown from then on
    assert cost.stats()["ratio"] == 1.5 and cost.stats()["forward_seconds"] is None
    assert cost.stats()["forward_ratio"] is None


def test_a_repetitions_forward_seconds_sum_its_chunks_and_are_unknown_once_one_was_not_stamped():
    scores = new_scores(chunk_tokens=4)
    first, second = scores.chunks[:2]
    scores.end_chunk(first.rid, checkpointed=True, forward_seconds=1.5)
    scores.end_chunk(second.rid, checkpointed=True, forward_seconds=0.25)
    assert scores.forward_seconds == 1.75
    scores.end_chunk("another-request", checkpointed=True, forward_seconds=9.0)  # not one of its chunks
    assert scores.forward_seconds == 1.75
    unstamped = new_scores(chunk_tokens=4)
    unstamped.end_chunk(unstamped.chunks[0].rid, checkpointed=True)
    unstamped.end_chunk(unstamped.chunks[1].rid, checkpointed=True, forward_seconds=0.5)
    assert unstamped.forward_seconds is None


def test_seconds_since_first_forward_reads_the_scheduler_stamp():
    import time
    from types import SimpleNamespace

    from lava_sglang.sglang_plugin.touchpoints import seconds_since_first_forward

    stamped = SimpleNamespace(time_stats=SimpleNamespace(forward_entry_time=time.perf_counter() - 2.0))
    assert 2.0 <= seconds_since_first_forward(stamped) < 3.0
    assert seconds_since_first_forward(SimpleNamespace(time_stats=SimpleNamespace(forward_entry_time=0.0))) is None
    assert seconds_since_first_forward(SimpleNamespace()) is None


class _Finished:
    status_code = 200

    def json(self):
        return {"meta_info": {"finish_reason": {"type": "length"}}}


@pytest.mark.parametrize("dp_rank", [None, 1])
def test_chunks_are_sent_to_the_data_parallel_rank_holding_the_prefix(monkeypatch, dp_rank):
    sent, timeouts = [], []
    monkeypatch.setattr(repetition.requests, "post", lambda url, json, headers, timeout, verify: sent.append(json)
                        or timeouts.append(timeout) or _Finished())
    scores = new_scores(chunk_tokens=4)
    RepetitionClient("http://server:1/", 2048, dp_rank=dp_rank, timeout=30)._post_chunks(scores)
    assert [payload["rid"] for payload in sent] == scores.rids and scores.failed is None
    # No read timeout: a chunk queued long under load is waited for (the waiting prefix bounds its progress).
    assert timeouts == [(30, None)] * len(sent)
    assert [payload.get("routed_dp_rank") for payload in sent] == [dp_rank] * len(sent)


@pytest.mark.parametrize("keys, expected", [({}, None), ({"api_key": "user"}, "Bearer user"),
                                            ({"api_key": "user", "admin_api_key": "admin"}, "Bearer admin")])
def test_a_repetition_is_aborted_with_the_key_the_abort_endpoint_takes(monkeypatch, caplog, keys, expected):
    sent = []

    class Refused:
        status_code = 401

    monkeypatch.setattr(repetition.requests, "post",
                        lambda url, json, headers, timeout, verify: sent.append((url, headers)) or Refused())
    scores = new_scores(chunk_tokens=4)
    with caplog.at_level(logging.WARNING, logger="lava_sglang.sglang_plugin.repetition"):
        RepetitionClient("http://server:1/", 2048, **keys)._abort(scores.rids[:1])
    assert sent == [("http://server:1/abort_request", {"Authorization": expected} if expected else {})]
    assert f"could not abort repetition {scores.rids[0]} (HTTP 401)" in caplog.text  # a refusal is not silent


@pytest.mark.parametrize("ssl, verify", [({}, True), ({"ssl_certfile": "cert.pem"}, False),
                                         ({"ssl_certfile": "cert.pem", "ssl_ca_certs": "ca.pem"}, "ca.pem")])
def test_chunks_and_aborts_over_https_verify_the_certificate_as_sglang_does(monkeypatch, ssl, verify):
    # A self-signed certificate (no --ssl-ca-certs) would fail every chunk under the system CA
    # bundle, and every document would be compressed by its tail.
    server_args = SimpleNamespace(**{"ssl_certfile": None, "ssl_ca_certs": None, **ssl})
    assert touchpoints.ssl_verify(server_args) == verify
    sent = []
    monkeypatch.setattr(repetition.requests, "post",
                        lambda url, json, headers, timeout, verify: sent.append((url, verify)) or _Finished())
    client = RepetitionClient("https://127.0.0.1:1/", 2048, verify=touchpoints.ssl_verify(server_args))
    scores = new_scores(chunk_tokens=4)
    client._post_chunks(scores)
    client._abort(scores.rids[:1])
    assert scores.failed is None
    assert sent == [("https://127.0.0.1:1/generate", verify)] * len(scores.rids) + [
        ("https://127.0.0.1:1/abort_request", verify)]


@pytest.mark.parametrize("context_len, pool_tokens", [(1024, 100_000), (8192, 600)])
def test_the_longest_repetition_prompt_is_the_longest_sglangs_scheduler_admits(context_len, pool_tokens):
    from sglang.srt.managers.utils import validate_input_length

    admitted = min(context_len - 1, pool_tokens - 1) - 5  # tp_worker.get_worker_info's max_req_input_len
    longest = touchpoints.max_prompt_tokens(context_len, pool_tokens)
    assert validate_input_length(SimpleNamespace(origin_input_ids=[0] * longest), admitted, False) is None
    assert validate_input_length(SimpleNamespace(origin_input_ids=[0] * (longest + 1)), admitted, False) is not None


def test_a_chunk_the_plugin_stopped_is_not_reported_again_and_any_send_error_stops_the_repetition(monkeypatch,
                                                                                                  caplog):
    class Aborted:
        status_code = 200

        def json(self):
            return {"meta_info": {"finish_reason": {"type": "abort"}}}

    scores = new_scores(chunk_tokens=4)

    def stopped_while_running(url, json, headers, timeout, verify):
        scores.failed = "aborted"  # the plugin stopped the repetition (its prefix compressed or gone) and said why
        return Aborted()

    monkeypatch.setattr(repetition.requests, "post", stopped_while_running)
    with caplog.at_level(logging.WARNING, logger="lava_sglang.sglang_plugin.repetition"):
        RepetitionClient("http://server:1/", 2048)._post_chunks(scores)
    assert scores.failed == "aborted" and caplog.text == ""

    def broken(url, json, headers, timeout, verify):
        raise TypeError("not JSON serializable")  # not a request error: the thread would end silently

    scores = new_scores(chunk_tokens=4)
    monkeypatch.setattr(repetition.requests, "post", broken)
    with caplog.at_level(logging.WARNING, logger="lava_sglang.sglang_plugin.repetition"):
        RepetitionClient("http://server:1/", 2048)._post_chunks(scores)
    assert scores.failed == f"sending chunk {scores.rids[0]} failed (not JSON serializable)"
    assert "Traceback" in caplog.text and "did not run" in caplog.text

    def broken_chunk(chunk):
        raise IndexError("a chunk past the prefix")

    scores = new_scores(chunk_tokens=4)
    scores.input_ids = broken_chunk  # the request's own making fails
    RepetitionClient("http://server:1/", 2048)._post_chunks(scores)
    assert scores.failed == f"sending chunk {scores.rids[0]} failed (a chunk past the prefix)"
