"""`RepetitionScores`: the server's per-chunk scoring of a prefix's repetition (observe "reconstruct")."""

import torch

from lava_sglang.policy import repeat_attention_chunk
from lava_sglang.sglang_plugin.repetition import REPETITION_RID_PREFIX, RepetitionClient, RepetitionScores

NUM_Q_HEADS, NUM_KV_HEADS, HEAD_DIM = 4, 2, 8
PREFIX_LEN, NUM_QUERIES, SELECTABLE = 10, 7, 6  # n, u + n (a short stand-in), m
SCALING = HEAD_DIM ** -0.5


def sequence(seed: int = 0):
    """Queries [n + u + n, Hq, d] and keys [n + u + n, Hkv, d] of prefix + repetition, as the pool holds them."""
    generator = torch.Generator().manual_seed(seed)
    total = PREFIX_LEN + NUM_QUERIES
    return (torch.randn(total, NUM_Q_HEADS, HEAD_DIM, generator=generator),
            torch.randn(total, NUM_KV_HEADS, HEAD_DIM, generator=generator))


def new_scores(num_layers: int = 1) -> RepetitionScores:
    return RepetitionScores(rid=RepetitionClient.new_rid(), prefix_len=PREFIX_LEN, selectable=SELECTABLE,
                            num_queries=NUM_QUERIES, num_layers=num_layers)


def feed(scores: RepetitionScores, queries, keys, chunks, layer: int = 0) -> None:
    """Extend chunks given as (first position, end): the row's queries and its keys up to `end`."""
    for first, end in chunks:
        scores.add_chunk(layer, queries[first:end], keys[:end], first, SCALING)


def test_chunks_of_any_split_score_like_the_whole_repetition():
    queries, keys = sequence()
    expected = repeat_attention_chunk(queries[PREFIX_LEN:].transpose(0, 1), keys.transpose(0, 1), PREFIX_LEN,
                                      PREFIX_LEN, (0, PREFIX_LEN), SCALING)[:, :SELECTABLE]
    for chunks in ([(10, 17)], [(10, 13), (13, 14), (14, 17)]):
        scores = new_scores()
        feed(scores, queries, keys, chunks)
        assert scores.complete and scores.num_scored == NUM_QUERIES
        torch.testing.assert_close(scores.repeat[0], expected)


def test_recomputed_prefix_tokens_are_not_repetition_queries_and_a_chunk_seen_twice_changes_nothing():
    queries, keys = sequence(1)
    whole = new_scores()
    feed(whole, queries, keys, [(10, 17)])
    # The match fell 3 tokens short (they are recomputed, not repetition queries), and a
    # chunk is fed twice (scores are a max over positions, not a count).
    scores = new_scores()
    feed(scores, queries, keys, [(7, 13), (7, 13), (13, 17)])
    assert scores.complete
    torch.testing.assert_close(scores.repeat[0], whole.repeat[0])


def test_incomplete_until_every_layer_has_every_query():
    queries, keys = sequence(2)
    scores = new_scores(num_layers=2)
    feed(scores, queries, keys, [(10, 17)], layer=0)
    feed(scores, queries, keys, [(10, 15)], layer=1)
    assert not scores.complete and scores.num_scored == 5
    feed(scores, queries, keys, [(15, 17)], layer=1)
    assert scores.complete


def test_a_gap_is_not_bridged():
    queries, keys = sequence(3)
    scores = new_scores()
    feed(scores, queries, keys, [(10, 12), (14, 17)])  # positions 12 and 13 never scored
    assert not scores.complete and scores.num_scored == 2


def test_rids_are_unique_and_marked():
    rids = {RepetitionClient.new_rid() for _ in range(100)}
    assert len(rids) == 100 and all(rid.startswith(REPETITION_RID_PREFIX) for rid in rids)
