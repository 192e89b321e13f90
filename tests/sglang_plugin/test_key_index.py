"""`KeyIndex`: the compressed prefixes by key, on SGLang's own RadixKey."""

import random
from array import array

import pytest

from lava_sglang.sglang_plugin.key_index import KeyIndex
from lava_sglang.sglang_plugin.touchpoints import radix_cache_api

RadixKey = radix_cache_api()[1]


def key(tokens, extra_key=None, cache_salt=None):
    return RadixKey(array("q", tokens), extra_key, cache_salt=cache_salt)


def test_the_longest_stored_key_that_starts_the_query_is_found():
    index = KeyIndex()
    for name, tokens in {"header": [1, 2, 3], "doc": [1, 2, 3, 4, 5], "longer doc": [1, 2, 3, 4, 5, 6, 7],
                         "other": [1, 2, 9]}.items():
        index.add(key(tokens), name)
    assert index.longest_prefix_of(key([1, 2, 3, 4, 5, 6, 7, 8])) == "longer doc"
    assert index.longest_prefix_of(key([1, 2, 3, 4, 5, 6])) == "doc"  # ends inside "longer doc"
    assert index.longest_prefix_of(key([1, 2, 3, 4, 0])) == "header"  # leaves "doc" mid-way
    assert index.longest_prefix_of(key([1, 2, 9])) == "other"
    assert index.longest_prefix_of(key([1, 2])) is None  # shorter than every stored key
    assert index.longest_prefix_of(key([])) is None
    assert sorted(index) == ["doc", "header", "longer doc", "other"] and len(index) == 4


def test_removal_keeps_the_other_keys_and_prunes_its_branch():
    index = KeyIndex()
    index.add(key([1, 2, 3, 4]), "doc")
    index.add(key([1, 2, 3, 4, 5, 6]), "longer doc")
    index.add(key([1, 2, 7]), "other")
    assert index.remove(key([1, 2, 3, 4])) == "doc"
    assert index.longest_prefix_of(key([1, 2, 3, 4, 5])) is None
    assert index.longest_prefix_of(key([1, 2, 3, 4, 5, 6, 0])) == "longer doc"
    assert index.remove(key([1, 2, 3, 4, 5, 6])) == "longer doc"
    assert list(index) == ["other"] and len(index) == 1
    assert list(index.root.children.values())[0].children.keys() == {7}  # no bare branch left behind
    with pytest.raises(KeyError):
        index.remove(key([1, 2, 3, 4]))
    with pytest.raises(KeyError):
        index.remove(key([1, 2]))  # a node of the tree, but nothing stored there


def test_a_key_holds_one_item_and_the_empty_key_none():
    index = KeyIndex()
    index.add(key([5, 6]), "first")
    with pytest.raises(ValueError, match="already holds"):
        index.add(key([5, 6]), "second")
    with pytest.raises(ValueError, match="empty key"):
        index.add(key([]), "all")


def test_keys_of_other_namespaces_never_match():
    # A LoRA adapter's or a cache salt's prefix is not another namespace's: SGLang's match raises on such a pair.
    index = KeyIndex()
    index.add(key([1, 2, 3]), "plain")
    index.add(key([1, 2, 3], extra_key="lora-a"), "lora")
    index.add(key([1, 2, 3], cache_salt="salt"), "salted")
    assert index.longest_prefix_of(key([1, 2, 3, 4])) == "plain"
    assert index.longest_prefix_of(key([1, 2, 3, 4], extra_key="lora-a")) == "lora"
    assert index.longest_prefix_of(key([1, 2, 3, 4], cache_salt="salt")) == "salted"
    assert index.longest_prefix_of(key([1, 2, 3, 4], extra_key="lora-b")) is None


def test_random_adds_and_removals_answer_as_a_scan_of_every_key():
    generator = random.Random(0)
    index, stored = KeyIndex(), {}
    for step in range(600):
        tokens = tuple(generator.choice([1, 2]) for _ in range(generator.randint(1, 8)))
        if tokens in stored and generator.random() < 0.5:
            assert index.remove(key(tokens)) == stored.pop(tokens)
        elif tokens not in stored:
            index.add(key(tokens), step)
            stored[tokens] = step
        query = tuple(generator.choice([1, 2]) for _ in range(generator.randint(0, 10)))
        starts = [tokens for tokens in stored if query[:len(tokens)] == tokens]
        assert index.longest_prefix_of(key(query)) == (stored[max(starts, key=len)] if starts else None)
        assert sorted(index) == sorted(stored.values()) and len(index) == len(stored)


def test_a_match_reads_the_query_once_however_many_documents_share_a_header(monkeypatch):
    # A list per first token compared the query with every stored document: 20 ms of scheduler time a match at 4096.
    index = KeyIndex()
    header = list(range(1000, 1300))
    for document in range(500):
        index.add(key(header + [document] * 40), document)
    comparisons = []
    original = RadixKey.match_at
    monkeypatch.setattr(RadixKey, "match_at", lambda self, *args, **kwargs: comparisons.append(1) or original(
        self, *args, **kwargs))
    assert index.longest_prefix_of(key(header + [321] * 50)) == 321
    assert len(comparisons) <= 2  # the header's run, then the document's
