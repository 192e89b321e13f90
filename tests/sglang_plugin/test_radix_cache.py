"""LavaRadixCache without a server: SGLang's pools, requests and cache calls (`scheduler_stub`),
hand-made documents. Every step checks SGLang's accounting invariant (with the store's slots
counted as the tree's) and that each running request's KV row reads its own sequence."""

from __future__ import annotations

import logging
import time

import pytest
import torch
from sglang.srt.mem_cache.base_prefix_cache import EvictParams
from sglang.test.test_utils import published_topology

from lava_sglang.sglang_plugin.config import FORK, SHARED, KvPolicyConfig
from lava_sglang.policy import Reconstruct
from lava_sglang.sglang_plugin import compressed_tree
from lava_sglang.sglang_plugin.compressed_tree import CompressedNode, prompt_key
from lava_sglang.sglang_plugin.repetition import RepetitionScores
from lava_sglang.sglang_plugin.tensor_parallel import TensorParallel
from lava_sglang.store import slots_needed

from scheduler_stub import HEAD_DIM, KV_HEADS, LAYERS, Q_HEADS, SchedulerStub

WINDOW, MIN_PREFIX = 8, 64


def document(index: int, length: int = 200) -> list[int]:
    return list(range(1000 * (index + 1), 1000 * (index + 1) + length))


def question(index: int) -> list[int]:
    return [10 + index, 11, 12]


@pytest.fixture(scope="module", autouse=True)
def sglang_context():
    """SGLang's requests read the process's published server config (as in SGLang's own tests)."""
    with published_topology(device="cpu"):
        yield


def make_stub(compress_on=(FORK,), policy="lava", observe="tail") -> SchedulerStub:
    return SchedulerStub(KvPolicyConfig(policy=policy, window=WINDOW, min_prefix=MIN_PREFIX, compress_on=compress_on,
                                        observe=observe))


def make_waiting_stub(observe: str, compress_on=(FORK,)) -> SchedulerStub:
    """A stub whose fork prefixes wait: for their branches, or for a repetition that is
    planned and never sent (no server runs its chunks here)."""
    stub = make_stub(compress_on=compress_on, observe=observe)
    if observe == "reconstruct":
        stub.cache._start_repetition = lambda req: RepetitionScores.plan(
            req.origin_input_ids, Reconstruct(chunk_tokens=100, chat_turn=False), lambda text: [5, 6], WINDOW,
            LAYERS, rid_base="never-sent")
    return stub


def check(stub: SchedulerStub) -> None:
    assert stub.accounting_problem() is None, stub.accounting_problem()
    for req in stub.running:
        assert stub.row_problems(req) == [], (req.rid, stub.row_problems(req)[:3])


def run(stub: SchedulerStub, token_ids, max_new_tokens: int = 2, **kwargs):
    """A request from admission to release, checked after each step."""
    req = stub.prefill(stub.request(token_ids, max_new_tokens=max_new_tokens, **kwargs))
    check(stub)
    for token in range(max_new_tokens):
        stub.decode(req, 7 + token)
        check(stub)
    stub.finish(req)
    check(stub)
    return req


def commit(stub: SchedulerStub, token_ids, **kwargs):
    """What `fork()` sends: the prefix with max_new_tokens=0."""
    return run(stub, token_ids, max_new_tokens=0, **kwargs)


def uses_compressed_prefix(stub: SchedulerStub, req) -> bool:
    first_slot = stub.req_to_token_pool.req_to_token[req.kv.req_pool_idx, :1]
    return stub.cache.store.entries_for_slots(first_slot)[0] is not None


def assert_all_released(stub: SchedulerStub) -> None:
    """Nothing running: every slot is free or the tree's, and nothing is locked."""
    assert not stub.running
    assert stub.cache.protected_size() == 0
    assert stub.allocator.available_size() + stub.cache.evictable_size() == stub.pool_size


# ----------------------------------------------------------------- the tree


def test_a_client_request_whose_id_looks_like_a_repetition_chunks_is_served_as_any_other():
    # The plugin knows its chunks by id; a client's "lava-repeat-..." commit is still compressed.
    stub = make_stub()
    commit(stub, document(0), rid="lava-repeat-client")
    assert [len(node.key) for node in stub.compressed_nodes()] == [199]
    assert_all_released(stub)


def test_a_chunk_of_a_forgotten_repetition_is_not_taken_for_a_fork_commit():
    # Its repetition stopped and was forgotten (say, more stopped chunks than are remembered):
    # the chunk has a commit's shape, and would have started a repetition of its own.
    stub = make_waiting_stub("reconstruct")
    commit(stub, document(0), rid=f"{stub.cache._repetition_rid_prefix}7-chunk-0")
    assert not stub.cache.pending and not stub.compressed_nodes()
    commit(stub, document(0), rid="lava-repeat-7-chunk-0")  # a client's, however named, is a commit
    assert len(stub.cache.pending) == 1


def test_a_commit_given_embeddings_is_not_a_fork_prefix():
    # SGLang gives such a request the ids [1] * length: no document to score or share.
    stub = make_stub()
    commit(stub, [1] * 200, input_embeds=[[0.5]] * 200)
    assert not stub.compressed_nodes()
    commit(stub, [1] * 200)  # the same ids as text are compressed
    assert [len(node.key) for node in stub.compressed_nodes()] == [199]
    assert_all_released(stub)


def test_a_flush_starts_the_counters_again():
    # `bench serve --url` flushes a server it did not start, then reads what it compressed.
    stub = make_stub()
    commit(stub, document(0))
    commit(stub, document(1))
    stub.cache.evict(EvictParams(num_tokens=stub.cache.evictable_size()))
    assert (stub.cache.store.compressions, stub.cache.store.evictions) == (2, 2)
    stub.cache.repetitions_cut_short = 1
    stub.cache.reset()
    assert stub.cache.stats()["repetitions_cut_short"] == 0
    store = stub.cache.store.stats()
    assert (store["entries"], store["compressions"], store["compress_seconds"], store["evictions"]) == (0, 0, 0.0, 0)
    commit(stub, document(2))
    assert stub.cache.store.compressions == 1 and len(stub.compressed_nodes()) == 1


def test_match_insert_and_locks_along_the_path():
    stub = make_stub()
    run(stub, document(0) + question(0))
    assert stub.cache.evictable_size() == 200 + 3 + 2
    req = stub.prefill(stub.request(document(0) + question(1)))
    assert req.prefix_len == 200  # the document, not the other question
    # The matched path is locked while the request runs, and its own tokens are its own.
    assert stub.cache.protected_size() == 200
    check(stub)
    stub.finish(req)
    check(stub)
    assert_all_released(stub)


def last_token_apart(index: int) -> list[int]:
    """A prompt sharing all of document(0) but its last token, then a question: a branch whose
    tokenizer merged the document's last token with the question's first."""
    return document(0)[:-1] + [7777] + question(index)


def test_a_continuation_of_all_but_the_commits_last_token_goes_with_the_full_copy():
    # The tree splits after n - 1 tokens, the compressed copy's end. Left in the tree, that full
    # copy would take a later request that continues it (a longer match than the compressed
    # node's) while its insert goes through the compressed node: two nodes owning its slots.
    stub = make_stub()
    run(stub, last_token_apart(0))
    commit(stub, document(0))
    (node,) = stub.compressed_nodes()
    assert stub.cache.evictable_size() == node_slots(node)  # the continuation went with the full copy
    again = stub.prefill(stub.request(last_token_apart(0) + [5, 6], max_new_tokens=2))
    assert again.prefix_len == 199 and uses_compressed_prefix(stub, again)
    check(stub)
    stub.decode(again, 7)
    stub.finish(again)
    check(stub)
    assert_all_released(stub)


def test_a_commit_waits_while_a_request_runs_on_all_but_its_last_token():
    stub = make_stub()
    run(stub, last_token_apart(0))
    running = stub.prefill(stub.request(last_token_apart(0) + [5], max_new_tokens=2))
    assert running.prefix_len == 203  # it reads the cached continuation
    commit(stub, document(0))
    assert not stub.compressed_nodes()  # it would free what the running request reads
    stub.decode(running, 7)
    stub.finish(running)
    commit(stub, document(0))  # a later commit compresses it
    (node,) = stub.compressed_nodes()
    check(stub)
    assert_all_released(stub)


def test_a_waiting_prefix_is_not_compressed_under_a_request_that_shares_all_but_its_last_token():
    stub = make_stub(observe="branches")
    commit(stub, document(0))
    apart = stub.prefill(stub.request(last_token_apart(0), max_new_tokens=2))
    run(stub, document(0) + question(1))  # a branch: its release would compress the waiting prefix
    assert not stub.compressed_nodes() and len(stub.cache.pending) == 1
    stub.decode(apart, 7)
    stub.finish(apart)
    run(stub, document(1, length=20))  # any release looks at the waiting prefixes again
    (node,) = stub.compressed_nodes()
    check(stub)
    assert_all_released(stub)


@pytest.mark.parametrize("observe", ["branches", "reconstruct"])
def test_a_waiting_prefix_whose_last_token_alone_was_evicted_is_compressed_without_it(observe):
    # Branches that merged the document's last token with their questions' first split the
    # tree after n - 1 tokens: the commit's last token is a 1-token leaf, the least recently
    # used, which eviction takes first. The compressed copy never holds that token.
    stub = make_waiting_stub(observe)
    commit(stub, document(0))
    run(stub, last_token_apart(0))
    assert stub.cache.evict(EvictParams(num_tokens=1)).num_tokens_evicted == 1
    assert stub.cache.ordinary_slots(prompt_key(stub.request(document(0))))[0].numel() == 199
    pending = stub.cache.pending[0]
    if observe == "reconstruct":  # its repetition scored every chunk
        scores = pending.repetition
        scores.repeat = [torch.rand(Q_HEADS, scores.selectable) for _ in range(LAYERS)]
        for chunk in scores.chunks:
            chunk.done = True
        scores.first_chunk_at = scores.ended_at = time.monotonic()
    else:  # no branch left a window; the wait is over
        pending.deadline = 0.0
    stub.cache.compress_ready_when_idle()
    (node,) = stub.compressed_nodes()
    assert len(node.key) == 199 and not stub.cache.pending and stub.cache.repetitions_cut_short == 0
    branch = run(stub, last_token_apart(1))
    assert branch.prefix_len == 199
    assert_all_released(stub)


def holds_question_window(stub: SchedulerStub, branch) -> bool:
    """Whether a branch of document(0) + question(i) (3 own tokens) has its window queries captured."""
    return stub.cache.capture.window_queries(branch.kv.req_pool_idx, 203, LAYERS, rows=3) is not None


def finish_branches_in_turn(stub: SchedulerStub, branches, windows_before) -> None:
    """Finish `branches` one after the other, the waiting prefix holding `windows_before[i]`
    windows before the i-th; the last one's release compresses it."""
    for branch, windows in zip(branches, windows_before, strict=True):
        assert not stub.compressed_nodes() and len(stub.cache.pending[0].branches) == windows
        stub.finish(branch)
        check(stub)
    (node,) = stub.compressed_nodes()
    assert not stub.cache.pending
    assert_all_released(stub)


def test_under_observe_branches_a_wide_fork_captures_only_the_first_branches_matched():
    # Only MAX_BRANCH_WINDOWS branches add windows: every other one's queries would be held at
    # every layer, unread, until its release.
    from lava_sglang.sglang_plugin.config import MAX_BRANCH_WINDOWS

    stub = make_stub(observe="branches")
    commit(stub, document(0))
    branches = [stub.prefill(stub.request(document(0) + question(index), max_new_tokens=4))
                for index in range(MAX_BRANCH_WINDOWS + 2)]
    expected = [True] * MAX_BRANCH_WINDOWS + [False, False]
    assert [holds_question_window(stub, branch) for branch in branches] == expected
    # A request matched again (queued, or retracted and admitted again) keeps its place.
    assert [stub.cache._reads_window_of(branch) for branch in reversed(branches)] == expected[::-1]
    check(stub)
    finish_branches_in_turn(stub, branches[::-1], [max(0, index - 2) for index in range(len(branches))])


def test_under_observe_branches_a_branch_released_without_a_window_gives_its_place_back():
    # An aborted branch leaves no window: it must not keep a later branch from leaving one. A
    # retracted one starts over and keeps its place.
    from sglang.srt.managers.schedule_batch import FINISH_ABORT

    from lava_sglang.sglang_plugin.config import MAX_BRANCH_WINDOWS

    stub = make_stub(observe="branches")
    commit(stub, document(0))
    branches = [stub.prefill(stub.request(document(0) + question(index), max_new_tokens=4))
                for index in range(MAX_BRANCH_WINDOWS)]
    retracted, aborted = branches[0], branches[1]
    stub.retract(retracted)
    late = stub.request(document(0) + question(MAX_BRANCH_WINDOWS), max_new_tokens=4)
    assert not stub.cache._reads_window_of(late)  # every place is taken
    aborted.finished_reason = FINISH_ABORT()
    stub.abort(aborted)
    check(stub)
    late, retracted = stub.prefill(late), stub.prefill(retracted)
    observers = [retracted, *branches[2:], late]
    assert all(holds_question_window(stub, branch) for branch in observers)
    finish_branches_in_turn(stub, observers, range(len(observers)))


def test_under_observe_branches_a_branch_aborted_while_queued_gives_its_place_back():
    # SGLang drops a queued request (its abort, its timeout, the queue's limit) without
    # releasing it: it only tells the cache the request was aborted.
    from sglang.srt.mem_cache.base_prefix_cache import CacheRequestOutcome

    from lava_sglang.sglang_plugin.config import MAX_BRANCH_WINDOWS

    stub = make_stub(observe="branches")
    commit(stub, document(0))
    queued = [stub.request(document(0) + question(index), max_new_tokens=4) for index in range(MAX_BRANCH_WINDOWS)]
    for req in queued:
        req.init_next_round_input(stub.cache)  # matched, then left in the queue
    late = stub.request(document(0) + question(MAX_BRANCH_WINDOWS), max_new_tokens=4)
    assert not stub.cache._reads_window_of(late)  # every place is taken
    stub.cache.finish(queued[0].cache_request_handle, CacheRequestOutcome.ABORT)
    assert stub.cache._reads_window_of(late)
    stub.finish(stub.prefill(late))
    (node,) = stub.compressed_nodes()  # the late branch's window observed it
    assert_all_released(stub)


@pytest.mark.parametrize("observe", ["tail", "branches", "reconstruct"])
def test_only_the_requests_whose_windows_are_read_hold_captured_queries(observe):
    # Every other long request's window queries would be held, unread, until its release.
    stub = make_waiting_stub(observe) if observe != "tail" else make_stub()
    plain = stub.prefill(stub.request(document(1), max_new_tokens=8))
    fork_commit = stub.prefill(stub.request(document(0), max_new_tokens=0))
    assert stub.cache.capture.window_queries(plain.kv.req_pool_idx, 200, LAYERS) is None
    assert stub.cache.capture.window_queries(fork_commit.kv.req_pool_idx, 200, LAYERS) is not None
    for req in (fork_commit, plain):
        stub.finish(req)
    check(stub)
    # Under branches a branch of the waiting prefix observes it, one of a single own token too
    # (SGLang matches it by a key one token short, which ends where the prefix does); under
    # reconstruct the prefix waits for its repetition alone, and under tail it is compressed.
    assert len(stub.cache.pending) == (observe != "tail")
    branches = [stub.prefill(stub.request(document(0) + own, max_new_tokens=4)) for own in (question(0), [42])]
    for branch in branches:
        own_len = len(branch.origin_input_ids) - 200
        captured = stub.cache.capture.window_queries(branch.kv.req_pool_idx, 200 + own_len, LAYERS, rows=own_len)
        assert (captured is not None) == (observe == "branches")
    for branch in branches:
        stub.finish(branch)
        check(stub)


@pytest.mark.parametrize("budget", [200, 512, 1.0])
@pytest.mark.parametrize("observe, compress_on", [("tail", (FORK,)), ("reconstruct", (FORK,)), ("tail", (SHARED,))])
def test_a_budget_that_keeps_the_whole_prefix_leaves_it_as_stock_sglang_does(budget, observe, compress_on):
    # Compressing would hold a second full copy (and under reconstruct run a repetition) for nothing.
    stub = SchedulerStub(KvPolicyConfig(policy="lava", budget=budget, window=WINDOW, min_prefix=MIN_PREFIX,
                                        compress_on=compress_on, observe=observe))
    asked = []  # the repetitions asked for (this stub has no server to send them to)
    stub.cache._start_repetition = asked.append
    commit(stub, document(0))
    run(stub, document(0) + question(0))
    run(stub, document(0) + question(1))
    assert stub.compressed_nodes() == [] and stub.cache.pending == [] and asked == []
    assert stub.cache.evictable_size() == 200 + 2 * (3 + 2)
    assert_all_released(stub)
    stub = SchedulerStub(KvPolicyConfig(policy="lava", budget=198, window=WINDOW, min_prefix=MIN_PREFIX,
                                        compress_on=(FORK,), observe="tail"))
    commit(stub, document(0))  # one token fewer than the 199 a fork commit compresses: compressed
    assert len(stub.compressed_nodes()) == 1


@pytest.mark.parametrize("observe", ["tail", "reconstruct"])
def test_a_commit_whose_compressed_prefix_lies_within_the_window_is_left_as_stock_sglang_does(observe):
    # A commit of window + 1 tokens compresses its first `window`: the plan keeps them all (the
    # window is always kept), so compressing would only store a second full copy.
    stub = SchedulerStub(KvPolicyConfig(policy="lava", budget=0.2, window=WINDOW, min_prefix=WINDOW + 1,
                                        compress_on=(FORK,), observe=observe))
    asked = []  # the repetitions asked for (this stub has no server to send them to: None, compressed by the tail)
    stub.cache._start_repetition = asked.append
    commit(stub, document(0, length=WINDOW + 1))
    assert stub.compressed_nodes() == [] and stub.cache.pending == [] and asked == []
    commit(stub, document(1, length=WINDOW + 2))  # one token beyond the window: compressed (here by its tail)
    assert len(asked) == (observe == "reconstruct")
    assert len(stub.compressed_nodes()) == 1
    assert_all_released(stub)


def test_a_fork_commit_is_compressed_and_its_branches_read_the_compressed_copy():
    stub = make_stub()
    commit(stub, document(0))
    (node,) = stub.compressed_nodes()
    assert len(node.key) == 199 and node.entry.layout.slots.numel() < 199 * 0.3
    # The full copy was given back: the tree holds only the compressed node's slots.
    assert stub.cache.evictable_size() == node.entry.layout.slots.numel()
    branch = stub.prefill(stub.request(document(0) + question(0)))
    assert branch.prefix_len == 199 and uses_compressed_prefix(stub, branch)
    check(stub)
    stub.decode(branch, 9, checkpoint=True)
    check(stub)
    stub.finish(branch)
    assert path_to_root(branch.last_node)[-1] is node  # its own tokens hang below the compressed node
    assert_all_released(stub)


def path_to_root(node) -> list:
    path = []
    while node.parent is not None:
        path.append(node)
        node = node.parent
    return path


def test_each_branch_that_reads_a_compressed_prefix_counts_a_hit():
    # SGLang counts a hit on each node a request's insert walks; LFU and SLRU eviction order by it.
    stub = make_stub()
    commit(stub, document(0))
    for index in range(3):
        run(stub, document(0) + question(index))
    (node,) = stub.compressed_nodes()
    assert node.hit_count == 3


def test_a_request_that_diverges_inside_a_compressed_prefix_does_not_use_it():
    stub = make_stub()
    commit(stub, document(0))
    diverging = document(0)[:150] + question(0)
    req = stub.prefill(stub.request(diverging))
    assert req.prefix_len == 0 and not uses_compressed_prefix(stub, req)
    check(stub)
    stub.finish(req)
    # Both live side by side; the next request with the whole prefix still reads the compressed copy.
    branch = run(stub, document(0) + question(1))
    assert branch.prefix_len == 199
    assert_all_released(stub)


def test_eviction_takes_ordinary_leaves_before_compressed_prefixes():
    stub = make_stub()
    for index in range(2):
        commit(stub, document(index))
        run(stub, document(index) + question(index), max_new_tokens=4)
    ordinary = stub.cache.evictable_size() - sum(node_slots(node) for node in stub.compressed_nodes())
    assert ordinary > 0
    evicted = stub.cache.evict(EvictParams(num_tokens=ordinary)).num_tokens_evicted
    assert evicted == ordinary and len(stub.compressed_nodes()) == 2
    check(stub)
    stub.cache.evict(EvictParams(num_tokens=1))
    assert len(stub.compressed_nodes()) == 1
    check(stub)
    assert_all_released(stub)


def test_a_compression_without_room_evicts_nothing(caplog):
    # A 400-token commit needs more slots than are free and evictable together (a running
    # request holds most of the pool): it stays uncompressed, and the compressed copy of an
    # earlier document, which evicting could not have made room enough, stays too.
    stub = SchedulerStub(KvPolicyConfig(policy="lava", window=WINDOW, min_prefix=MIN_PREFIX, compress_on=(FORK,)),
                         pool_size=600)
    commit(stub, document(0, 100))
    assert len(stub.compressed_nodes()) == 1
    running = stub.prefill(stub.request(document(1, 170), max_new_tokens=4))
    with caplog.at_level(logging.WARNING):
        commit(stub, document(2, 400))
    assert "no room for" in caplog.text and "kept uncompressed" in caplog.text
    assert len(stub.compressed_nodes()) == 1 and stub.cache.store.stats()["evictions"] == 0
    stub.finish(running)
    check(stub)
    assert_all_released(stub)


def store_of_two_entries(monkeypatch) -> SchedulerStub:
    monkeypatch.setattr(compressed_tree, "MAX_STORE_ENTRIES", 2)
    stub = make_stub()
    for index in range(2):
        commit(stub, document(index))
    assert not stub.cache.store.has_room
    return stub


def test_a_full_store_drops_its_least_recently_used_compressed_prefix_for_a_new_one(monkeypatch):
    # Without it, a pool larger than the store's tables keeps every later document
    # uncompressed, with no memory pressure ever to evict the compressed ones.
    stub = store_of_two_entries(monkeypatch)
    run(stub, document(0) + question(0), max_new_tokens=3)  # document 1 is now the least recently used
    commit(stub, document(2))
    assert sorted(len(node.key) for node in stub.compressed_nodes()) == [199] * 2
    assert {node.key.token_ids[0] for node in stub.compressed_nodes()} == {document(0)[0], document(2)[0]}
    assert stub.cache.store.stats()["evictions"] == 1
    # Document 0's branch tokens, cached below it, stay; a branch of document 2 reads its copy.
    assert run(stub, document(0) + question(0), max_new_tokens=1).prefix_len > 199
    assert uses_compressed_prefix(stub, stub.prefill(stub.request(document(2) + question(1))))
    stub.finish(stub.running[0])
    check(stub)
    assert_all_released(stub)


def test_a_full_store_whose_prefixes_are_all_in_use_keeps_a_new_prefix_uncompressed(monkeypatch, caplog):
    stub = store_of_two_entries(monkeypatch)
    readers = [stub.prefill(stub.request(document(index) + question(index), max_new_tokens=2)) for index in range(2)]
    with caplog.at_level(logging.WARNING):
        commit(stub, document(2))
    assert "its most, each in use" in caplog.text
    assert len(stub.compressed_nodes()) == 2 and stub.cache.store.stats()["evictions"] == 0
    for reader in readers:
        stub.finish(reader)
    check(stub)
    assert_all_released(stub)


def test_a_full_store_drops_nothing_for_a_compression_that_gets_no_slots(monkeypatch, caplog):
    stub = store_of_two_entries(monkeypatch)
    monkeypatch.setattr(stub.cache, "alloc_slots", lambda num_slots: None)
    with caplog.at_level(logging.WARNING):
        commit(stub, document(2))
    assert "no room for" in caplog.text
    assert len(stub.compressed_nodes()) == 2 and stub.cache.store.stats()["evictions"] == 0
    check(stub)
    assert_all_released(stub)


def test_a_full_store_drops_a_compressed_prefix_with_branch_tokens_below_it(monkeypatch):
    stub = store_of_two_entries(monkeypatch)
    for index in (1, 0):  # document 1's branches first: its copy, with tokens below it, is the oldest
        run(stub, document(index) + question(index), max_new_tokens=3)
    commit(stub, document(2))
    assert {node.key.token_ids[0] for node in stub.compressed_nodes()} == {document(0)[0], document(2)[0]}
    check(stub)
    assert_all_released(stub)


def test_a_prefix_with_a_long_conversation_cached_below_it_is_compressed():
    # Each checkpointed turn of a conversation is a node below the last: deeper than Python's recursion
    # limit, a recursive walk failed in the commit's release, leaving the full copy beside the compressed one.
    stub = make_stub()
    turns = 1200
    conversation = stub.prefill(stub.request(document(0) + question(0), max_new_tokens=turns))
    for _ in range(turns):
        stub.decode(conversation, 7, checkpoint=True)
    stub.finish(conversation)
    check(stub)
    commit(stub, document(0))
    (node,) = stub.compressed_nodes()
    assert len(node.key) == 199 and not node.children
    assert stub.cache.evictable_size() == node.entry.layout.slots.numel()  # the document and its turns freed
    assert_all_released(stub)


def test_slots_freed_in_the_batchs_open_free_group_count_as_room():
    # SGLang frees a batch's finished requests in a free group, committed after the batch:
    # those slots are pending, not in available_size(), when a compression in the same batch
    # asks for its slots. They count: nothing is evicted and the slots are given.
    stub = SchedulerStub(KvPolicyConfig(policy="lava", window=WINDOW, min_prefix=MIN_PREFIX, compress_on=(FORK,)),
                         pool_size=600)
    running = stub.prefill(stub.request(document(1, 500), max_new_tokens=0))
    stub.allocator.free_group_begin()
    stub.allocator.free(stub.req_to_token_pool.req_to_token[running.kv.req_pool_idx, :500].to(torch.int64))
    available = stub.allocator.available_size()
    assert available < 400 and stub.cache.evictable_size() == 0
    slots = stub.cache.alloc_slots(400)
    assert slots is not None and slots.numel() == 400
    stub.allocator.free(slots)
    stub.allocator.free_group_end()


class FailingSample:
    """A Prometheus metric whose samples cannot be written (a full multiprocess directory)."""

    def labels(self, **labels):
        raise OSError("No space left on device")


def test_metrics_that_cannot_be_written_leave_compression_and_eviction_as_they_are(caplog):
    # A compression whose metrics failed after its node was added read as failed: the full
    # copy stayed beside the compressed node, and a continuation's slots were owned twice.
    stub = make_stub()
    metrics = stub.cache.metrics
    metrics.enabled, metrics.records_events, metrics.labels = True, True, {}
    for name in ("prefix_tokens", "kept_ratio", "compress_seconds", "bytes_saved", "evictions", "store_entries",
                 "store_bytes"):
        setattr(metrics, name, FailingSample())
    with caplog.at_level(logging.ERROR, logger="lava_sglang.sglang_plugin.metrics"):
        commit(stub, document(0))
        (node,) = stub.compressed_nodes()
        assert stub.cache.evictable_size() == node_slots(node)  # the full copy went back
        branch = stub.prefill(stub.request(document(0) + question(0)))
        assert uses_compressed_prefix(stub, branch)
        stub.finish(branch)
        stub.cache.evict(EvictParams(num_tokens=stub.cache.evictable_size()))
    assert not stub.compressed_nodes() and stub.cache.evictable_size() == 0
    check(stub)
    assert_all_released(stub)
    assert caplog.text.count("recording the store's metrics failed") >= 2


def node_slots(node: CompressedNode) -> int:
    return node.entry.layout.slots.numel()


# ---------------------------------------------- what triggers a compression


def test_a_prefix_in_use_is_not_compressed_until_a_later_commit_finds_it_free(caplog):
    stub = make_stub()
    run(stub, document(0) + question(0))
    branch = stub.prefill(stub.request(document(0) + question(1)))  # runs on the full document
    with caplog.at_level(logging.INFO, logger="lava_sglang"):
        commit(stub, document(0))
    assert not stub.compressed_nodes() and "still run on the 200-token prefix" in caplog.text
    stub.finish(branch)
    commit(stub, document(0))
    assert len(stub.compressed_nodes()) == 1
    assert_all_released(stub)


@pytest.mark.parametrize("policy", ["lava", "streamingllm"])
def test_a_fork_commit_of_a_document_plain_requests_cached_is_compressed(policy):
    """The commit matches all but its last token; without its window recomputed, it would
    have no observation window and never be compressed (a policy that reads no attention
    still plans from the captured window's layers)."""
    stub = make_stub(policy=policy)
    run(stub, document(0) + question(0))
    committed = commit(stub, document(0))
    assert committed.prefix_len == 200 - WINDOW
    (node,) = stub.compressed_nodes()
    assert len(node.key) == 199
    # The full copy and the plain request's own tokens below it are given back.
    assert stub.cache.evictable_size() == node_slots(node)
    for index in range(2):  # the second also reuses the document's last token, cached by the first
        branch = stub.prefill(stub.request(document(0) + question(index)))
        assert branch.prefix_len == 199 + index and uses_compressed_prefix(stub, branch)
        check(stub)
        stub.finish(branch)
    assert_all_released(stub)


@pytest.mark.parametrize("compress_on", [(FORK,), (SHARED,)])
def test_two_requests_cut_to_observe_one_prefix_leave_no_ordinary_copy_beside_the_compressed_one(compress_on):
    """Two fork commits (or two sharers) of a document plain requests cached, prefilled
    together: each matched all but the last `window` tokens and holds that node. The first
    released compresses the prefix and frees the full copy down to the node the second holds;
    that rest goes once the second is released."""
    stub = make_stub(compress_on=compress_on)
    run(stub, document(0) + question(0))
    tails = [[], []] if compress_on == (FORK,) else [question(1), question(2)]
    first, second = (stub.prefill(stub.request(document(0) + tail, max_new_tokens=0 if not tail else 2))
                     for tail in tails)
    assert first.prefix_len == second.prefix_len == 200 - WINDOW
    check(stub)
    for req in (first, second):
        for token in range(req.sampling_params.max_new_tokens):
            stub.decode(req, 7 + token)
        stub.finish(req)
        check(stub)
    (node,) = stub.compressed_nodes()
    ordinary = stub.cache.ordinary_slots(prompt_key(stub.request(document(0))), touch=False)[0]
    assert ordinary.numel() == 0
    if compress_on == (FORK,):  # the store's rows, and the document's last token the second inserted below them
        assert stub.cache.evictable_size() == node_slots(node) + 1
    assert_all_released(stub)


def test_a_commit_that_was_not_cut_leaves_a_waiting_prefix_near_a_compressed_one_alone():
    # Only a request cut to recompute a prefix's window frees what is left of that prefix's
    # copy: a waiting prefix that ends within `window` tokens of a compressed one is not that.
    stub = make_stub(observe="reconstruct")  # no repetition client: document(0) is compressed by its tail
    commit(stub, document(0))
    (node,) = stub.compressed_nodes()
    stub.cache._start_repetition = make_waiting_stub("reconstruct").cache._start_repetition
    waiting = document(0)[:195]
    commit(stub, waiting)
    assert len(stub.cache.pending) == 1
    commit(stub, document(0))  # matches the compressed copy: not cut
    assert len(stub.cache.pending) == 1
    assert stub.cache.ordinary_slots(prompt_key(stub.request(waiting)), touch=False)[0].numel() == 195


def test_a_logprob_scoring_request_is_not_a_fork_commit():
    """`select()` scores each choice with max_new_tokens=0 and return_logprob: not a commit."""
    stub = make_stub()
    scoring = stub.request(document(0) + question(0), max_new_tokens=0, return_logprob=True)
    scoring.logprob_start_len = 200
    stub.prefill(scoring)
    check(stub)
    stub.finish(scoring)
    assert not stub.compressed_nodes()
    commit(stub, document(0))
    assert len(stub.compressed_nodes()) == 1
    assert_all_released(stub)


def test_a_request_holding_only_an_ancestor_of_a_prefix_compressed_meanwhile_moves_to_the_compressed_copy():
    """A chunked prefill on the document holds its first chunk's node when the document's
    commit (which matched that chunk) is compressed; at its next checkpoint its insert goes
    through the compressed node, and its whole row must follow, not only the part past what
    it had checkpointed."""
    stub = make_stub()
    reader = stub.prefill(stub.request(document(0) + question(0), max_new_tokens=3), chunk=100)
    committed = commit(stub, document(0))
    assert committed.prefix_len == 100 and len(stub.compressed_nodes()) == 1
    stub.prefill(reader)  # the rest of its prompt, on its own copy of the document
    check(stub)
    stub.decode(reader, 9, checkpoint=True)
    check(stub)
    assert uses_compressed_prefix(stub, reader)
    stub.decode(reader, 10)
    check(stub)
    stub.finish(reader)
    check(stub)
    assert_all_released(stub)


def test_shared_prefixes_of_documents_behind_one_header_are_each_compressed_once():
    """OpenAI traffic: one system prompt and chat header before every document."""
    stub = make_stub(compress_on=(SHARED,))
    header = list(range(1, 17))
    for index in range(3):
        first = run(stub, header + document(index) + question(0))
        assert first.prefix_len == (len(header) if index else 0)  # a new document reuses the header
    for index in range(3):
        run(stub, header + document(index) + question(1))  # the second sharer: its window observes
    assert sorted(len(node.key) for node in stub.compressed_nodes()) == [216, 216, 216]
    for index in range(3):
        later = stub.prefill(stub.request(header + document(index) + question(2)))
        assert uses_compressed_prefix(stub, later) and later.prefix_len >= 216
        check(stub)
        stub.finish(later)
    assert len(stub.compressed_nodes()) == 3 and stub.cache.store.stats()["compressions"] == 3
    assert_all_released(stub)


@pytest.mark.parametrize("first_chunk", [WINDOW - 3, 1, None])
def test_a_sharer_whose_first_chunk_is_shorter_than_the_window_still_observes_the_shared_prefix(first_chunk):
    # SGLang gives a request a first chunk of whatever room the batch has left; the recomputed
    # window then spans two chunks (it was read from the first alone, and the prefix stayed whole).
    stub = make_stub(compress_on=(SHARED,))
    run(stub, document(0) + question(0))
    sharer = stub.request(document(0) + question(1), max_new_tokens=2)
    if first_chunk is not None:
        stub.prefill(sharer, chunk=first_chunk)
        check(stub)
    stub.prefill(sharer)
    check(stub)
    for token in range(2):
        stub.decode(sharer, 7 + token)
    stub.finish(sharer)
    check(stub)
    assert [len(node.key) for node in stub.compressed_nodes()] == [200]
    assert_all_released(stub)


def test_under_observe_branches_a_commit_waits_for_its_branches_then_is_compressed_and_they_are_freed():
    stub = make_stub(observe="branches")
    commit(stub, document(0))
    assert not stub.compressed_nodes() and len(stub.cache.pending) == 1
    branches = [stub.prefill(stub.request(document(0) + question(index))) for index in range(2)]
    assert all(branch.prefix_len == 200 and not uses_compressed_prefix(stub, branch) for branch in branches)
    check(stub)
    stub.finish(branches[0])  # the other still runs on the full copy: not yet
    assert not stub.compressed_nodes() and len(stub.cache.pending[0].branches) == 1
    check(stub)
    stub.finish(branches[1])
    (node,) = stub.compressed_nodes()
    assert not stub.cache.pending and stub.cache.evictable_size() == node_slots(node)
    later = run(stub, document(0) + question(2))
    assert later.prefix_len == 199
    assert_all_released(stub)


@pytest.mark.parametrize("observe", ["branches", "reconstruct"])
def test_a_commit_that_extends_a_waiting_prefix_is_its_branch_not_a_second_prefix(observe):
    # A nested fork() in a branch commits the document and more: a second waiting prefix would
    # repeat (or wait for) the whole document again, and whichever was compressed first would
    # free or discard the other.
    stub = make_waiting_stub(observe)
    commit(stub, document(0))
    assert [len(pending.full_key) for pending in stub.cache.pending] == [200]
    commit(stub, document(0) + list(range(1, MIN_PREFIX + 2)))  # a commit of the document and more
    check(stub)
    if observe == "branches":  # its window observed the document, which is compressed, once
        assert not stub.cache.pending and [len(node.key) for node in stub.compressed_nodes()] == [199]
        assert_all_released(stub)
    else:  # the document still waits for its one repetition
        assert [len(pending.full_key) for pending in stub.cache.pending] == [200] and not stub.compressed_nodes()


@pytest.mark.parametrize("longer", [0, 70], ids=["as-long", "longer"])
@pytest.mark.parametrize("observe", ["branches", "reconstruct"])
def test_a_commit_that_differs_from_a_waiting_prefix_in_its_last_token_is_not_a_second_waiting_prefix(observe,
                                                                                                     longer):
    # The waiting prefix's compression (its first n - 1 tokens) freed the other's copy, whose
    # observation (a second repetition) was run for nothing; as long, both compressed the same.
    stub = make_waiting_stub(observe)
    commit(stub, document(0))
    other_end = document(0)[:-1] + [7] + list(range(3000, 3000 + longer))
    commit(stub, other_end)
    assert len(stub.cache.pending) == 1 and stub.cache.pending[0].full_key.token_ids[-1] == document(0)[-1]
    if observe == "branches":
        run(stub, document(0) + question(0))
    else:
        stub.cache.pending[0].deadline = 0.0  # no repetition runs here: its wait ends, compressed by the tail
        stub.cache.compress_ready_when_idle()
    (node,) = stub.compressed_nodes()
    assert len(node.key) == 199 and not stub.cache.pending
    branch = stub.prefill(stub.request(other_end + question(1)))
    assert branch.prefix_len >= 199 and uses_compressed_prefix(stub, branch)
    stub.finish(branch)
    check(stub)
    assert_all_released(stub)


def test_a_commit_that_extends_a_waiting_prefix_by_a_whole_document_is_not_a_second_waiting_prefix():
    # Two waiting prefixes on one path would undo each other: the shorter one's compression
    # frees what is cached below it, the longer one's the shorter's full copy.
    from lava_sglang.sglang_plugin.config import MAX_BRANCH_OWN_TOKENS

    stub = make_stub(observe="branches")
    commit(stub, document(0))
    commit(stub, document(0) + document(1, length=MAX_BRANCH_OWN_TOKENS + 1))
    assert [len(pending.full_key) for pending in stub.cache.pending] == [200]
    run(stub, document(0) + question(0))  # a branch: the document is compressed, once
    assert [len(node.key) for node in stub.compressed_nodes()] == [199] and not stub.cache.pending
    assert_all_released(stub)


@pytest.mark.parametrize("compress_on", [(FORK,), (FORK, SHARED)])
@pytest.mark.parametrize("observe", ["branches", "reconstruct"])
def test_a_commit_that_a_waiting_prefix_extends_is_not_a_second_waiting_prefix(observe, compress_on, caplog):
    # The reverse order of a nested fork: the longer prefix was committed first. The shorter
    # one waiting beside it would free the longer one's full copy when compressed, or lose its
    # own when the longer one is.
    stub = make_waiting_stub(observe, compress_on)
    longer = document(0) + list(range(1, MIN_PREFIX + 2))
    commit(stub, longer)
    with caplog.at_level(logging.INFO, logger="lava_sglang.sglang_plugin.radix_cache"):
        shorter = commit(stub, document(0))
    check(stub)
    assert "a longer fork prefix that starts with it waits" in caplog.text
    assert shorter.prefix_len == 199  # matched as stock SGLang matches it (no window cut to observe it)
    assert [len(pending.full_key) for pending in stub.cache.pending] == [len(longer)]
    assert not stub.compressed_nodes()
    if observe == "branches":  # the longer prefix's branch: it is compressed, once, and nothing is left behind
        run(stub, longer + question(0))
        assert [len(node.key) for node in stub.compressed_nodes()] == [len(longer) - 1] and not stub.cache.pending
        assert_all_released(stub)


def test_a_release_step_that_fails_is_skipped_and_the_scheduler_serves_on(monkeypatch, caplog):
    # Copying a branch's keys at every layer can run out of memory: one request must not stop the server.
    stub = make_stub(observe="branches")
    commit(stub, document(0))

    def out_of_memory(*args, **kwargs):
        raise RuntimeError("out of memory")

    with monkeypatch.context() as patch, caplog.at_level(logging.ERROR, logger="lava_sglang.sglang_plugin.radix_cache"):
        patch.setattr(stub.cache.capture, "window_queries", out_of_memory)
        run(stub, document(0) + question(0))
        run(stub, document(1))
    assert "recording a branch's window failed" in caplog.text
    assert len(stub.cache.pending) == 1 and stub.cache.pending[0].branches == []
    run(stub, document(0) + question(1))  # the next branch observes it
    assert [len(node.key) for node in stub.compressed_nodes()] == [199] and not stub.cache.pending
    assert_all_released(stub)
    tensor_parallel = SchedulerStub(KvPolicyConfig(policy="lava", window=WINDOW, min_prefix=MIN_PREFIX,
                                                   observe="branches"),
                                    tensor_parallel=TensorParallel(rank=0, world_size=2, group=OtherRank()))
    commit(tensor_parallel, document(0))
    monkeypatch.setattr(tensor_parallel.cache.capture, "window_queries", out_of_memory)
    with pytest.raises(RuntimeError, match="out of memory"):  # the ranks must keep the same windows
        run(tensor_parallel, document(0) + question(0))


def test_a_prefix_that_becomes_ready_with_no_release_is_compressed_when_the_scheduler_is_idle():
    # Its wait passes and no branch comes, or its repetition fails in the sending thread (a
    # chunk aborted while queued, which SGLang drops without a release): the idle loop compresses it.
    stub = make_stub(observe="branches")
    commit(stub, document(0))
    stub.cache.compress_ready_when_idle()  # still within its wait (30 s)
    assert not stub.compressed_nodes() and len(stub.cache.pending) == 1
    stub.cache.pending[0].deadline = time.monotonic()  # the wait has passed
    stub.cache.compress_ready_when_idle()
    (node,) = stub.compressed_nodes()
    assert not stub.cache.pending and stub.cache.evictable_size() == node_slots(node)
    assert_all_released(stub)


def test_under_tensor_parallel_the_idle_loop_leaves_waiting_prefixes_to_the_releases():
    # The ranks agree on readiness by a collective; their idle loops do not run in step.
    group = OtherRank()
    group.ready = True
    stub = SchedulerStub(KvPolicyConfig(policy="lava", window=WINDOW, min_prefix=MIN_PREFIX, observe="branches",
                                        observe_wait=0.01), tensor_parallel=TensorParallel(rank=0, world_size=2,
                                                                                            group=group))
    commit(stub, document(0))
    time.sleep(0.05)
    stub.cache.compress_ready_when_idle()
    assert not stub.compressed_nodes() and len(stub.cache.pending) == 1
    run(stub, document(1, length=20))  # a release: every rank looks at the waiting prefixes
    assert len(stub.compressed_nodes()) == 1 and not stub.cache.pending
    assert_all_released(stub)


def test_under_observe_branches_a_branch_longer_than_a_question_adds_no_window():
    from lava_sglang.sglang_plugin.config import MAX_BRANCH_OWN_TOKENS

    stub = make_stub(observe="branches")
    commit(stub, document(0))
    long_branch = stub.prefill(stub.request(document(0) + list(range(1, MAX_BRANCH_OWN_TOKENS + 2)),
                                            max_new_tokens=1))  # one own token too many
    # Its window queries are not even captured (they would be held, unread, until its release).
    assert stub.cache.capture.window_queries(long_branch.kv.req_pool_idx, 200 + MAX_BRANCH_OWN_TOKENS + 1,
                                             LAYERS) is None
    stub.decode(long_branch, 7)
    stub.finish(long_branch)
    check(stub)
    assert not stub.compressed_nodes() and stub.cache.pending[0].branches == []
    run(stub, document(0) + list(range(5000, 5000 + MAX_BRANCH_OWN_TOKENS)), max_new_tokens=1)
    assert len(stub.compressed_nodes()) == 1  # a branch at the bound (tokens not cached yet) observed it
    assert_all_released(stub)


def test_under_observe_branches_the_windows_of_all_waiting_prefixes_are_bounded_in_bytes(monkeypatch, caplog):
    # A window holds a branch's queries and own keys at every layer (fp32), beside the KV pool.
    from lava_sglang.sglang_plugin import radix_cache

    stub = make_stub(observe="branches")
    for index in range(2):
        commit(stub, document(index))
    first, second = (stub.prefill(stub.request(document(0) + question(index))) for index in range(2))
    stub.finish(first)  # a window; document 0 waits while its second branch runs
    one_window = stub.cache._branch_window_bytes()
    assert one_window > 0 and len(stub.cache.pending[0].branches) == 1
    monkeypatch.setattr(radix_cache, "MAX_BRANCH_WINDOW_BYTES", one_window)  # room for that one alone
    with caplog.at_level(logging.WARNING, logger="lava_sglang.sglang_plugin.radix_cache"):
        stub.finish(stub.prefill(stub.request(document(1) + question(0))))  # another prefix's branch
    assert "a branch of a 200-token prefix adds none" in caplog.text
    # Document 1 had a branch and no room for its window: compressed by its tail at once rather
    # than holding its full copy for its whole wait; document 0 waits for its second branch.
    assert [len(node.key) for node in stub.compressed_nodes()] == [199]
    assert [pending.full_key.token_ids[0] for pending in stub.cache.pending] == [document(0)[0]]
    assert len(stub.cache.pending[0].branches) == 1
    stub.finish(second)  # no room for its window either: document 0 is compressed with the first's
    assert len(stub.compressed_nodes()) == 2 and not stub.cache.pending and stub.cache._branch_window_bytes() == 0
    assert_all_released(stub)


def test_a_shared_header_is_not_compressed_under_a_fork_prefix_that_waits_to_be_observed():
    stub = make_stub(compress_on=(FORK, SHARED), observe="branches")
    header = document(9, 100)
    commit(stub, header + document(0))
    assert len(stub.cache.pending) == 1
    plain = run(stub, header + question(0))  # a plain request sharing only the header
    assert plain.prefix_len == len(header)  # matched whole: no window recomputed for a compression that cannot be
    assert not stub.compressed_nodes() and len(stub.cache.pending) == 1
    run(stub, header + document(0) + question(1))  # a branch: the waiting prefix is compressed
    assert [len(node.key) for node in stub.compressed_nodes()] == [299]
    assert_all_released(stub)


def test_a_sharer_cut_before_a_fork_prefix_on_its_path_began_to_wait_is_not_compressed(caplog):
    # Its match was cut to observe the shared header; by its release a fork prefix that starts
    # with the header waits: compressing the header would move it under a compressed node.
    stub = make_stub(compress_on=(FORK, SHARED), observe="branches")
    header = document(9, 100)
    run(stub, header + question(0))
    sharer = stub.prefill(stub.request(header + question(1)))
    assert sharer.prefix_len == len(header) - WINDOW
    commit(stub, header + document(0))
    with caplog.at_level(logging.INFO, logger="lava_sglang.sglang_plugin.radix_cache"):
        stub.finish(sharer)
    assert "a fork prefix below it waits to be observed" in caplog.text
    assert not stub.compressed_nodes() and len(stub.cache.pending) == 1
    run(stub, header + document(0) + question(1))  # a branch: the waiting prefix is compressed
    assert [len(node.key) for node in stub.compressed_nodes()] == [299]
    assert_all_released(stub)


@pytest.mark.parametrize("observe", ["branches", "reconstruct"])
def test_a_shared_prefix_that_extends_a_waiting_fork_prefix_is_not_compressed(observe, caplog):
    # The sharer's match was cut to observe document + common; the document's fork commit began
    # to wait before its release: compressing the longer shared key would free the waiting
    # document's full copy, and its branches (which leave the shared key) would match none of it.
    stub = make_waiting_stub(observe, compress_on=(FORK, SHARED))
    common = [50, 51, 52]
    run(stub, document(0) + common + [60, 61])
    sharer = stub.prefill(stub.request(document(0) + common + [70, 71]))
    commit(stub, document(0))
    with caplog.at_level(logging.INFO, logger="lava_sglang.sglang_plugin.radix_cache"):
        stub.finish(sharer)
    assert "shared prefix of 203 tokens not compressed: a fork prefix it extends waits" in caplog.text
    assert not stub.compressed_nodes() and len(stub.cache.pending) == 1
    branch = run(stub, document(0) + question(1))
    assert branch.prefix_len == len(document(0))  # the whole document reused
    if observe == "branches":  # its branch observed it: compressed, as a fork prefix
        assert [len(node.key) for node in stub.compressed_nodes()] == [199] and not stub.cache.pending
    assert_all_released(stub)


@pytest.mark.parametrize("namespace", [{"cache_salt": "tenant-2"}, {"extra_key": "adapter-2"}])
@pytest.mark.parametrize("compress_on", [(FORK,), (FORK, SHARED)])
def test_requests_in_another_cache_namespace_are_served_beside_a_waiting_prefix(namespace, compress_on):
    # SGLang refuses to compare radix keys of different namespaces (cache_salt, extra_key,
    # a LoRA adapter): a waiting fork prefix is only ever compared with keys of its own, and
    # the same document committed in another namespace is another prefix.
    stub = make_stub(compress_on=compress_on, observe="branches")

    def compressed():
        return sorted((len(node.key), node.key.extra_key or "", node.key.cache_salt or "")
                      for node in stub.compressed_nodes())

    tenant = (namespace.get("extra_key", ""), namespace.get("cache_salt", ""))
    commit(stub, document(0))
    commit(stub, document(0), **namespace)
    assert len(stub.cache.pending) == 2
    run(stub, document(0) + question(0), **namespace)  # a branch of the second: observes it alone
    assert len(stub.cache.pending) == 1 and compressed() == [(199, *tenant)]
    for index in (1, 2):  # under "shared" the second compresses the header they share
        run(stub, document(9, 100) + question(index), **namespace)
    run(stub, document(0) + question(3))  # a branch of the first
    shared = [(100, *tenant)] if SHARED in compress_on else []
    assert not stub.cache.pending and compressed() == sorted([(199, "", ""), (199, *tenant)] + shared)
    assert_all_released(stub)


def test_a_request_matched_again_after_its_prefix_began_to_wait_leaves_its_branch_window():
    """A queued request is matched at every scheduling round: what its first match recorded
    (a shared prefix to compress) must not outlive a later match that found a waiting fork
    prefix, or its release takes it for a sharer and its branch window is lost."""
    stub = make_stub(compress_on=(FORK, SHARED), observe="branches")
    run(stub, document(0) + question(0))  # a plain request caches the document
    queued = stub.request(document(0) + question(1))
    queued.init_next_round_input(stub.cache)  # first match: the document is a shared prefix
    commit(stub, document(0))  # then the document's fork prefix waits for its branches
    assert len(stub.cache.pending) == 1
    stub.finish(stub.prefill(queued))  # matched again, run, released: a branch
    assert [len(node.key) for node in stub.compressed_nodes()] == [199]
    assert_all_released(stub)


def test_a_prefix_waiting_to_be_observed_keeps_its_place_in_the_eviction_order():
    """Every release looks the waiting prefixes up: a look that is not a use must not make
    them the most recently used, or the hot prefixes would be evicted first."""
    stub = make_stub(observe="branches")
    commit(stub, document(0))
    _, node = stub.cache.ordinary_slots(stub.cache.pending[0].full_key, touch=False)
    path = path_to_root(node)
    before = [path_node.last_access_time for path_node in path]
    run(stub, document(1) + question(0))  # other traffic, released
    assert len(stub.cache.pending) == 1
    assert [path_node.last_access_time for path_node in path] == before


class OtherRank:
    """The TP group of rank 0 of 2 (SGLang's GroupCoordinator's calls), the other rank played
    by hand: its scores are rank 0's, and it says what `ready` and `rows` say."""

    def __init__(self):
        self.ready = False  # what it says about each waiting prefix
        self.rows = 0  # the rows its share of a plan keeps

    def all_gather(self, scores, dim):
        return torch.cat([scores, scores], dim=dim)

    def all_gather_object(self, value):
        if isinstance(value, list):  # TensorParallel.all_agree's flags
            return [value, [self.ready] * len(value)]
        return [value, self.rows]  # TensorParallel.largest

    def broadcast_object(self, value, src):
        return value


def test_ranks_agree_position_by_position_and_a_rank_with_other_prefixes_is_an_error():
    group = OtherRank()
    tensor_parallel = TensorParallel(rank=0, world_size=2, group=group)
    group.ready = True
    assert tensor_parallel.all_agree([True, False]) == [True, False]
    group.all_gather_object = lambda flags: [flags, flags[:1]]  # a rank waiting on fewer prefixes
    with pytest.raises(RuntimeError, match=r"the ranks' flags differ in number: \[2, 1\]"):
        tensor_parallel.all_agree([True, True])


def test_under_tensor_parallel_a_prefix_waits_for_every_rank_and_takes_the_largest_ranks_slots():
    group = OtherRank()
    tensor_parallel = TensorParallel(rank=0, world_size=2, group=group)
    stub = SchedulerStub(KvPolicyConfig(policy="lava", window=WINDOW, min_prefix=MIN_PREFIX, observe="branches"),
                         tensor_parallel=tensor_parallel)
    commit(stub, document(0))
    run(stub, document(0) + question(0))  # its branch: ready here, not on the other rank
    assert not stub.compressed_nodes() and len(stub.cache.pending) == 1
    group.ready, group.rows = True, 600  # the other rank's heads keep many more rows than this rank's
    run(stub, document(1, length=20))  # any release looks at the waiting prefixes again
    (node,) = stub.compressed_nodes()
    assert node.entry.layout.kept_rows < 300
    assert node_slots(node) == slots_needed(600, LAYERS, KV_HEADS)
    assert_all_released(stub)


def test_under_tensor_parallel_a_plan_every_rank_refuses_leaves_the_prefix_uncompressed_and_serving(caplog):
    # Finite keys whose scores overflow to nan: refused once the scores are gathered, on every rank
    # alike, so the server goes on with the prefix uncompressed (a failure on one rank is raised).
    stub = SchedulerStub(KvPolicyConfig(policy="lava", window=WINDOW, min_prefix=MIN_PREFIX),
                         tensor_parallel=TensorParallel(rank=0, world_size=2, group=OtherRank()))
    fork_commit = stub.prefill(stub.request(document(0), max_new_tokens=0))
    row = stub.req_to_token_pool.req_to_token[fork_commit.kv.req_pool_idx, :5].long()
    for k_buffer in stub.kv_pool.k_buffer:
        k_buffer[row] = 3e38
    with caplog.at_level(logging.WARNING):
        stub.finish(fork_commit)
    assert not stub.compressed_nodes() and "kept uncompressed: the scores computed from the observation contain nan" \
        in caplog.text
    run(stub, document(1))  # still serving
    assert_all_released(stub)


def test_under_tensor_parallel_a_repetition_stopped_on_another_rank_is_not_reported_as_stalled(caplog):
    # Every chunk scored here; the other rank's repetition failed: the ranks agree the prefix is
    # ready and not scored, and this rank, whose repetition has no failure of its own, must not
    # blame the wait.
    class FailedOnOtherRank(OtherRank):
        def all_gather_object(self, value):
            if isinstance(value, list):  # ready + scored: ready there, its repetition not scored
                half = len(value) // 2
                return [value, [True] * half + [False] * half]
            return super().all_gather_object(value)

    stub = SchedulerStub(KvPolicyConfig(policy="lava", window=WINDOW, min_prefix=MIN_PREFIX, observe="reconstruct"),
                         tensor_parallel=TensorParallel(rank=0, world_size=2, group=FailedOnOtherRank()))
    stub.cache._start_repetition = make_waiting_stub("reconstruct").cache._start_repetition
    commit(stub, document(0))
    repetition = stub.cache.pending[0].repetition
    for chunk in repetition.chunks:  # as each chunk's release with all its queries scored marks it
        chunk.done = True
    assert repetition.done and repetition.failed is None
    with caplog.at_level(logging.WARNING, logger="lava_sglang.sglang_plugin.radix_cache"):
        run(stub, document(1, length=20))  # any release looks at the waiting prefixes again
    assert "(stopped on another rank, or no progress within --kv-observe-wait 30 s)" in caplog.text
    assert len(stub.compressed_nodes()) == 1 and not stub.cache.pending


def test_a_repetition_is_not_asked_for_where_a_plain_request_cannot_repeat_the_prefix(caplog):
    from types import SimpleNamespace

    from lava_sglang.sglang_plugin.repetition import RepetitionClient

    stub = make_stub(observe="reconstruct")
    submitted = []
    client = RepetitionClient("http://server:1/", 4096)
    client.submit = submitted.append
    stub.cache.repetition_client = client
    tokenizer = SimpleNamespace(encode=lambda text, add_special_tokens: [5, 6])  # no chat template: plain prompt
    for attribute, value, reason in (("cache_salt", "tenant-2", "cache salt"),
                                     ("multimodal_inputs", object(), "multimodal inputs")):
        req = stub.request(document(0))
        req.tokenizer = tokenizer
        setattr(req, attribute, value)
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            assert stub.cache._start_repetition(req) is None
        assert "no repetition of a 200-token prefix" in caplog.text and reason in caplog.text
    req = stub.request(document(0))
    req.tokenizer = tokenizer
    scores = stub.cache._start_repetition(req)
    assert submitted == [scores] and set(stub.cache.repetitions) == set(scores.rids)

    def cannot_start(scores):
        raise RuntimeError("can't start new thread")

    stub.cache.repetitions.clear()
    client.submit = cannot_start  # nothing will send or release its chunks: none is remembered
    with caplog.at_level(logging.WARNING):
        assert stub.cache._start_repetition(req) is None
    assert "its chunks could not be sent (can't start new thread); compressed by its tail" in caplog.text
    assert not stub.cache.repetitions


def started(stub, scores: RepetitionScores) -> RepetitionScores:
    """`scores`' chunks registered as `_start_repetition` registers them (this stub sends no request)."""
    stub.cache.repetitions.update(dict.fromkeys(scores.rids, scores))
    return scores


def repetition_of_document_0(stub: SchedulerStub, name: str) -> RepetitionScores:
    """A repetition of document(0) in 64-token chunks, its chunks' ids of this server's base."""
    return RepetitionScores.plan(document(0), Reconstruct(chunk_tokens=64, chat_turn=False), lambda text: [7, 9, 9],
                                 WINDOW, LAYERS, rid_base=f"{stub.cache.repetition_rid_base}-{name}")


def run_chunk(stub: SchedulerStub, scores: RepetitionScores, index: int, scored_queries: int | None = None) -> None:
    """Chunk `index`'s request, scored as the attention path scores it (`_score_repetitions`:
    its queries against the keys of its row, from the pool), at every layer; scored_queries:
    only that many of its repetition queries, as a chunk cut short."""
    rid, chunk = scores.rids[index], scores.chunks[index]
    req = stub.prefill(stub.request(scores.input_ids(chunk), max_new_tokens=0, rid=rid))
    assert req.prefix_len == scores.prefix_len  # it reuses the prefix only
    seq_len = len(req.origin_input_ids)
    slots = stub.req_to_token_pool.req_to_token[req.kv.req_pool_idx, :seq_len].to(torch.int64)
    own_len = seq_len - scores.prefix_len if scored_queries is None else scored_queries
    for layer in range(LAYERS):
        queries = torch.randn(own_len, Q_HEADS, HEAD_DIM)
        scores.add_chunk(rid, layer, queries, stub.kv_pool.k_buffer[layer][slots[:scores.prefix_len + own_len]],
                         scores.prefix_len, HEAD_DIM ** -0.5)
    stub.finish(req)
    check(stub)


def live_repetition_stub() -> tuple[SchedulerStub, list[RepetitionScores]]:
    """A stub whose fork commits start a repetition of document(0) that the test runs."""
    stub = make_stub(observe="reconstruct")
    asked = []

    def start(req):
        asked.append(started(stub, repetition_of_document_0(stub, f"live{len(asked)}")))
        return asked[-1]

    stub.cache._start_repetition = start
    return stub, asked


def test_a_repetition_scores_its_prefix_chunk_by_chunk_frees_each_chunk_and_compresses_by_its_scores():
    # The cache's side of a live repetition (the e2e tests run it on a server): each chunk's own
    # tokens go when it is released, and the last chunk's release compresses the prefix.
    stub, asked = live_repetition_stub()
    commit(stub, document(0))
    (scores,) = asked
    assert len(stub.cache.pending) == 1 and not stub.compressed_nodes() and len(scores.chunks) > 1
    evictable = stub.cache.evictable_size()
    for index in range(len(scores.chunks)):
        assert len(stub.cache.pending) == 1
        run_chunk(stub, scores, index)
        assert stub.cache.evictable_size() == evictable or index == len(scores.chunks) - 1
    (node,) = stub.compressed_nodes()
    assert len(node.key) == 199 and not stub.cache.pending and not stub.cache.repetitions
    assert stub.cache.repetitions_cut_short == 0 and stub.cache.last_repetition is not None
    assert stub.cache.evictable_size() == node_slots(node)
    assert_all_released(stub)


def test_an_error_after_a_compression_leaves_the_prefix_held_once():
    # The full copy is freed before the repetition's figures are counted and logged: an error
    # there must not leave the prefix in the tree twice, compressed and whole.
    stub, asked = live_repetition_stub()
    commit(stub, document(0))
    (scores,) = asked

    def broken(*args):
        raise RuntimeError("a figure could not be counted")

    stub.cache.repetition_cost.add = broken
    for index in range(len(scores.chunks) - 1):
        run_chunk(stub, scores, index)
    with pytest.raises(RuntimeError, match="a figure could not be counted"):
        run_chunk(stub, scores, len(scores.chunks) - 1)
    (node,) = stub.compressed_nodes()
    assert stub.cache.evictable_size() == node_slots(node)


@pytest.mark.parametrize("chunk", [None, 50], ids=["one-prefill", "chunked"])
@pytest.mark.parametrize("cached_first", [False, True], ids=["prefilled", "cached-by-plain-requests"])
def test_a_commits_prefill_is_the_repetitions_yardstick_only_where_it_computed_the_prefix(cached_first, chunk):
    # A commit of a document plain requests cached recomputes only its window: its prefill,
    # milliseconds, would make the repetition read as hundreds of prefills in /server_info.
    stub, asked = live_repetition_stub()
    if cached_first:
        run(stub, document(0))
    req = stub.prefill(stub.request(document(0), max_new_tokens=0), chunk=chunk)
    while req.extend_end < 200:
        stub.prefill(req, chunk=chunk)
    assert req.cached_tokens == (200 - WINDOW if cached_first else 0)
    req.time_stats.forward_entry_time = time.perf_counter() - 1.5
    stub.finish(req)
    (scores,) = asked
    for index in range(len(scores.chunks)):
        run_chunk(stub, scores, index)
    assert len(stub.compressed_nodes()) == 1  # compressed by its repetition either way
    cost = stub.cache.repetition_cost.stats()
    if cached_first:  # no prefill to compare with: out of the sums, counted apart
        assert (cost["documents"], cost["not_compared"], cost["ratio"]) == (0, 1, None)
        assert stub.cache.last_repetition["prefill_seconds"] is None
    else:  # the commit's own prefill, stamped 1.5 s before its release, is the yardstick
        assert (cost["documents"], cost["not_compared"]) == (1, 0)
        assert cost["prefill_seconds"] >= 1.5 and cost["ratio"] is not None


def test_no_repetition_is_started_for_a_prefix_whose_compressed_copy_cannot_fit_beside_it(caplog):
    # A 200-token document in a 230-slot pool: its copy at keep 0.2 needs ~40 slots beside the
    # full copy. Each commit ran a repetition (two prefills' work) that ended in "no room".
    stub = SchedulerStub(KvPolicyConfig(policy="lava", window=WINDOW, min_prefix=MIN_PREFIX, observe="reconstruct"),
                         pool_size=230)
    asked = []
    stub.cache._start_repetition = asked.append
    with caplog.at_level(logging.WARNING, logger="lava_sglang.sglang_plugin.radix_cache"):
        commit(stub, document(0))
        commit(stub, document(0))
    assert asked == [] and not stub.cache.pending and not stub.compressed_nodes()
    assert caplog.text.count("a 200-token prefix and its compressed copy (about 41 slots) do not fit in the "
                             "230-slot pool together") == 2
    commit(stub, document(1, length=150))  # 150 + 31 slots fit
    assert len(asked) == 1
    assert_all_released(stub)


def test_a_repetition_is_started_while_running_requests_hold_most_of_the_pool():
    # They finish long before the repetition does: the room a compression needs is looked for then.
    stub = SchedulerStub(KvPolicyConfig(policy="lava", window=WINDOW, min_prefix=MIN_PREFIX, observe="reconstruct"),
                         pool_size=440)
    asked = []
    stub.cache._start_repetition = asked.append
    running = stub.prefill(stub.request(document(1) + question(0), max_new_tokens=2))
    commit(stub, document(0))  # 37 slots free, and the document's own copy evictable
    assert len(asked) == 1
    stub.decode(running, 7)
    stub.finish(running)
    check(stub)


def test_a_chunk_released_with_part_of_its_queries_scored_compresses_the_prefix_by_its_tail():
    stub, asked = live_repetition_stub()
    commit(stub, document(0))
    (scores,) = asked
    run_chunk(stub, scores, 0, scored_queries=3)
    assert scores.failed is not None and "released with 3 of" in scores.failed
    (node,) = stub.compressed_nodes()
    assert len(node.key) == 199 and not stub.cache.pending and not stub.cache.repetitions
    assert stub.cache.repetitions_cut_short == 1
    assert_all_released(stub)


def test_a_stopped_repetition_remembers_only_the_chunk_that_can_still_run():
    # Its chunks are sent one after another: the first not yet released is the only one that can be queued or
    # running; the others' rids, never to be released, would fill the bounded list and push out live ones.
    stub = make_stub(observe="reconstruct")
    scores = started(stub, repetition_of_document_0(stub, "three"))
    assert len(scores.rids) == 3
    stub.cache.repetitions.pop(scores.rids[0])  # the first chunk was released
    stub.cache.retire_repetition(scores)
    assert stub.cache.retired_repetitions == {scores.rids[1]: 200} and not stub.cache.repetitions
    stub.cache.retire_repetition(scores)  # stopped twice (a failed chunk, then its prefix forgotten): no change
    assert stub.cache.retired_repetitions == {scores.rids[1]: 200}


def test_a_rank_that_does_not_send_the_chunks_remembers_every_one_not_yet_released():
    # Its own scoring failed; the sending rank's did not, and goes on sending the later chunks: this
    # rank must free their tokens as the sending rank does, or the ranks' trees and batches part.
    stub = SchedulerStub(KvPolicyConfig(policy="lava", window=WINDOW, min_prefix=MIN_PREFIX, observe="reconstruct"),
                         tensor_parallel=TensorParallel(rank=1, world_size=2, group=OtherRank()))
    assert not stub.cache._sends_requests
    scores = started(stub, repetition_of_document_0(stub, "rank-1"))
    stub.cache.repetitions.pop(scores.rids[0])  # the first chunk was released
    stub.cache.retire_repetition(scores)
    assert stub.cache.retired_repetitions == dict.fromkeys(scores.rids[1:], 200)


def test_a_rank_that_does_not_send_the_chunks_forgets_stopped_repetitions_whole(monkeypatch):
    # The remembered rids are bounded by repetitions, not chunks: a repetition with more chunks
    # than a rid bound lost its own next chunks, which the sending rank still sent; this rank then
    # matched past the prefix and kept their tokens, and the ranks' batches parted.
    from lava_sglang.sglang_plugin import radix_cache

    monkeypatch.setattr(radix_cache, "MAX_RETIRED_REPETITIONS", 1)
    stub = SchedulerStub(KvPolicyConfig(policy="lava", window=WINDOW, min_prefix=MIN_PREFIX, observe="reconstruct"),
                         tensor_parallel=TensorParallel(rank=1, world_size=2, group=OtherRank()))
    run(stub, document(0))
    evictable = stub.cache.evictable_size()
    older, scores = (started(stub, repetition_of_document_0(stub, name)) for name in ("older", "stopped"))
    stub.cache.retire_repetition(older)
    stub.cache.repetitions.pop(scores.rids[0])  # the first chunk was released
    stub.cache.retire_repetition(scores)
    assert stub.cache.retired_repetitions == dict.fromkeys(scores.rids[1:], 200)  # the older one forgotten whole
    for rid, chunk_plan in zip(scores.rids[1:], scores.chunks[1:]):  # the sending rank sends them still
        chunk = stub.prefill(stub.request(scores.input_ids(chunk_plan), max_new_tokens=0, rid=rid))
        assert chunk.prefix_len == 200
        stub.finish(chunk)
        check(stub)
        assert stub.cache.evictable_size() == evictable  # the chunk's own tokens are freed
    assert not stub.cache.retired_repetitions


def test_a_stopped_repetitions_chunk_that_still_runs_reuses_the_prefix_only_and_leaves_nothing():
    # A repetition stopped while a chunk was queued (a scoring failure on one TP rank, an abort
    # that missed): the chunk is matched and freed as a live one is, on every rank alike.
    stub = make_stub(observe="reconstruct")
    plain = run(stub, document(0))  # the document and two answer tokens (7, 8) in the tree
    scores = started(stub, repetition_of_document_0(stub, "stopped"))
    first_request = scores.input_ids(scores.chunks[0])
    assert first_request[200:201] == [7] == list(plain.output_ids[:1])  # a longer match is there to take
    stub.cache.retire_repetition(scores)
    chunk = stub.prefill(stub.request(first_request, max_new_tokens=0, rid=scores.rids[0]))
    assert chunk.prefix_len == 200
    check(stub)
    stub.finish(chunk)
    check(stub)
    assert stub.cache.evictable_size() == 202  # the chunk's own tokens are freed
    assert_all_released(stub)


def test_a_stopped_repetitions_chunk_that_runs_after_its_prefix_was_compressed_leaves_nothing():
    # The prefix was compressed by its tail (its repetition cut short) before the chunk ran:
    # the chunk matches the compressed copy, and its own tokens, below it, are freed as well.
    stub = make_stub()
    commit(stub, document(0))
    (node,) = stub.compressed_nodes()
    scores = started(stub, repetition_of_document_0(stub, "late"))
    stub.cache.retire_repetition(scores)
    chunk = stub.prefill(stub.request(scores.input_ids(scores.chunks[0]), max_new_tokens=0, rid=scores.rids[0]))
    assert uses_compressed_prefix(stub, chunk)
    stub.finish(chunk)
    check(stub)
    assert stub.cache.evictable_size() == node_slots(node) + 1  # the prefix's last token stays, cached
    assert_all_released(stub)


# ------------------------------------------------- retraction and aborts


def test_retracting_a_request_on_a_compressed_prefix_leaks_nothing_and_it_resumes_on_the_prefix():
    stub = make_stub()
    commit(stub, document(0))
    branch = stub.prefill(stub.request(document(0) + question(0), max_new_tokens=4))
    stub.decode(branch, 9)
    stub.retract(branch)
    check(stub)
    assert stub.cache.protected_size() == 0
    stub.prefill(branch)  # re-admitted with its output so far as prompt
    assert branch.prefix_len == 199 and uses_compressed_prefix(stub, branch)
    check(stub)
    stub.decode(branch, 10)
    stub.finish(branch)
    check(stub)
    assert_all_released(stub)


def test_an_aborted_commit_is_not_compressed_and_leaks_nothing():
    stub = make_stub()
    aborted = stub.prefill(stub.request(document(0), max_new_tokens=0))
    stub.abort(aborted)
    check(stub)
    assert not stub.compressed_nodes() and not stub.cache.capture._slots
    assert_all_released(stub)
    commit(stub, document(0))
    assert len(stub.compressed_nodes()) == 1


@pytest.mark.parametrize("failing_step", ["plan_prefix", "write_kept", "add_compressed"])
def test_a_compression_that_fails_leaves_the_prefix_uncompressed_and_leaks_nothing(monkeypatch, caplog,
                                                                                   failing_step):
    """plan_prefix fails before any slot is taken, write_kept after the compressed copy's slots
    were allocated, add_compressed after its store entry was made: either way the scheduler
    keeps serving, every slot goes back, and nothing counts as compressed or evicted."""
    from lava_sglang.sglang_plugin import radix_cache

    def fail(*args, **kwargs):
        raise RuntimeError("out of memory (simulated)")

    stub = make_stub()
    monkeypatch.setattr(stub.cache if failing_step == "add_compressed" else radix_cache, failing_step, fail)
    with caplog.at_level(logging.ERROR, logger="lava_sglang.sglang_plugin.radix_cache"):
        commit(stub, document(0))
    assert "compressing a 199-token prefix failed; it is kept uncompressed" in caplog.text
    assert not stub.compressed_nodes() and not stub.cache.store.entries
    assert (stub.cache.store.compressions, stub.cache.store.evictions) == (0, 0)
    assert stub.cache.evictable_size() == 200  # the full copy stays cached
    run(stub, document(0) + question(0))  # and serves the next request
    assert_all_released(stub)
    monkeypatch.undo()
    commit(stub, document(0))  # a later commit compresses it
    assert len(stub.compressed_nodes()) == 1
    assert_all_released(stub)


def test_a_waiting_prefix_left_uncompressed_keeps_what_its_branches_cached(monkeypatch, caplog):
    # Its compression fails once its branch has run: the prefix stays an ordinary one, and the
    # branch's own tokens stay cached below it, as stock SGLang would keep them.
    from lava_sglang.sglang_plugin import radix_cache

    def fail(*args, **kwargs):
        raise RuntimeError("out of memory (simulated)")

    stub = make_stub(observe="branches")
    commit(stub, document(0))
    monkeypatch.setattr(radix_cache, "plan_prefix", fail)
    branch = document(0) + question(0)
    with caplog.at_level(logging.ERROR, logger="lava_sglang.sglang_plugin.radix_cache"):
        run(stub, branch)
    assert "compressing a 199-token prefix failed; it is kept uncompressed" in caplog.text
    assert not stub.compressed_nodes() and not stub.cache.pending
    assert run(stub, branch).prefix_len == len(branch) - 1  # the branch's question is still cached
    assert_all_released(stub)


def test_a_repetition_chunk_dropped_from_the_queue_stops_its_repetition_on_this_rank(caplog):
    # SGLang releases a request aborted while queued through release_aborted_request on every
    # rank; only the first rank's sending thread hears of it over HTTP.
    from types import SimpleNamespace

    stub = make_waiting_stub("reconstruct")
    commit(stub, document(0))
    repetition = stub.cache.pending[0].repetition
    stub.cache.repetitions.update(dict.fromkeys(repetition.rids, repetition))  # as a sent repetition is registered
    first = repetition.chunks[0].rid
    with caplog.at_level(logging.WARNING, logger="lava_sglang.sglang_plugin.radix_cache"):
        stub.cache.release_aborted_request(SimpleNamespace(rid=first))
    assert repetition.failed == f"chunk {first} was aborted"
    assert f"repetition chunk {first} of a 200-token prefix was aborted before it ran" in caplog.text
    stub.cache.compress_ready_when_idle()  # ready at once: compressed by its tail window
    assert not stub.cache.pending and len(stub.compressed_nodes()) == 1
    assert_all_released(stub)


def test_the_radix_cache_internals_the_tree_relies_on_exist_in_this_sglang():
    from lava_sglang.sglang_plugin import touchpoints

    radix_cache = touchpoints.radix_cache_api()[0]
    assert [name for name in touchpoints.RADIX_CACHE_METHODS if not callable(getattr(radix_cache, name, None))] == []
    assert [name for name in touchpoints.RADIX_CACHE_STATE if name not in vars(make_stub().cache)] == []


def test_a_plan_that_keeps_no_row_leaves_the_prefix_uncompressed(monkeypatch, caplog):
    """A compressed copy needs one row at least: a row of padding alone would read as the
    requests' own tokens."""
    from lava_sglang.sglang_plugin import radix_cache

    def keeps_nothing(policy, budget, *args, **kwargs):
        planned = plan_prefix(policy, budget, *args, **kwargs)
        return [[rows[:0] for rows in heads] for heads in planned]

    plan_prefix = radix_cache.plan_prefix
    stub = make_stub()
    monkeypatch.setattr(radix_cache, "plan_prefix", keeps_nothing)
    with caplog.at_level(logging.WARNING, logger="lava_sglang.sglang_plugin.radix_cache"):
        commit(stub, document(0))
    assert "the plan keeps no row of a 199-token prefix" in caplog.text
    assert not stub.compressed_nodes() and not stub.cache.store.entries
    assert stub.cache.evictable_size() == 200
    run(stub, document(0) + question(0))
    assert_all_released(stub)


@pytest.mark.parametrize("room", [True, False])
def test_a_repetition_that_failed_counts_as_cut_short_only_once_its_prefix_is_compressed_by_its_tail(
        monkeypatch, caplog, room):
    stub = make_waiting_stub("reconstruct")
    commit(stub, document(0))
    stub.cache.pending[0].repetition.failed = "a chunk failed (simulated)"
    if not room:  # every row of the store's tables taken: the prefix stays uncompressed
        monkeypatch.setattr(stub.cache.store.tables, "_free_rows", [])
    with caplog.at_level(logging.WARNING, logger="lava_sglang.sglang_plugin.radix_cache"):
        stub.cache.compress_ready_when_idle()
    assert not stub.cache.pending and len(stub.compressed_nodes()) == int(room)
    assert stub.cache.stats()["repetitions_cut_short"] == int(room)
    assert ("the prefix was compressed by its tail window instead" in caplog.text) is room
    run(stub, document(0) + question(0))
    assert_all_released(stub)


def test_a_retracted_second_sharer_compresses_the_shared_prefix_when_it_finishes_after_all():
    stub = make_stub(compress_on=(SHARED,))
    run(stub, document(0) + question(0))
    sharer = stub.prefill(stub.request(document(0) + question(1), max_new_tokens=3))
    stub.decode(sharer, 9)
    stub.retract(sharer)
    check(stub)
    assert not stub.compressed_nodes()
    stub.prefill(sharer)
    check(stub)
    stub.finish(sharer)
    check(stub)
    assert len(stub.compressed_nodes()) == 1
    assert_all_released(stub)


def stub_with_a_sent_repetition(monkeypatch, thread_starts: bool = True):
    """A stub whose commit of document(0) starts a repetition registered as the server registers
    it (no chunk ever runs here) and whose client records what it aborts, in place (or cannot
    start the abort's thread, as when no thread is left): (the stub, the repetition, the aborted rids)."""
    from types import SimpleNamespace

    from lava_sglang.sglang_plugin import repetition
    from lava_sglang.sglang_plugin.repetition import RepetitionClient

    class AbortThread:
        def __init__(self, target, args, name, daemon):
            self.target, self.args = target, args

        def start(self):
            if not thread_starts:
                raise RuntimeError("can't start new thread")
            self.target(*self.args)

    monkeypatch.setattr(repetition, "threading", SimpleNamespace(Thread=AbortThread))
    client = RepetitionClient("http://server:1/", 4096)
    aborted = []
    monkeypatch.setattr(client, "_abort", aborted.append)
    stub = make_stub(observe="reconstruct")
    stub.cache.repetition_client = client
    planned = []

    def start_repetition(req):
        planned.append(started(stub, repetition_of_document_0(stub, "sent")))
        return planned[0]

    stub.cache._start_repetition = start_repetition
    commit(stub, document(0))
    return stub, planned[0], aborted


@pytest.mark.parametrize("thread_starts", [True, False], ids=["aborted", "no-thread"])
def test_a_repetition_cut_short_by_the_wait_is_reported_as_such_and_only_its_running_chunk_aborted(
        monkeypatch, caplog, thread_starts):
    # Compressing the prefix by its tail aborts the stalled repetition: the abort must not be
    # reported as its cause, only the chunk that can be queued or running is aborted (not one
    # request per chunk), and an abort that cannot start its thread must not stop the scheduler.
    stub, scores, aborted = stub_with_a_sent_repetition(monkeypatch, thread_starts)
    stub.cache.pending[0].deadline = time.monotonic()  # the wait has passed, and no chunk has run
    with caplog.at_level(logging.WARNING):
        stub.cache.compress_ready_when_idle()
    assert f"scored 0 of its {scores.num_queries} tokens (no progress within --kv-observe-wait 30 s)" in caplog.text
    assert aborted == ([scores.rids[:1]] if thread_starts else [])
    assert (f"could not abort repetition {scores.rids[0]} (can't start new thread)" in caplog.text) is (
        not thread_starts)
    assert len(stub.compressed_nodes()) == 1 and not stub.cache.pending
    run(stub, document(0) + question(0))
    assert_all_released(stub)


def test_a_prefix_evicted_while_its_repetition_runs_stops_it_and_says_so(monkeypatch, caplog):
    stub, scores, aborted = stub_with_a_sent_repetition(monkeypatch)
    stub.cache.evict(EvictParams(num_tokens=stub.cache.evictable_size()))
    with caplog.at_level(logging.INFO, logger="lava_sglang.sglang_plugin.radix_cache"):
        run(stub, document(1, length=20))  # any release looks at the waiting prefixes again
    assert "a 200-token prefix was evicted while it waited to be observed; its repetition stops" in caplog.text
    assert aborted == [scores.rids[:1]] and scores.failed == "aborted"
    assert not stub.cache.pending and not stub.compressed_nodes() and not stub.cache.repetitions
    assert_all_released(stub)
