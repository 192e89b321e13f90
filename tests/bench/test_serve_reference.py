"""Which compressed copy each visit of a `--kv-observe branches` serving run read."""

from __future__ import annotations

from lava_sglang.bench.serve_reference import compressing_visits


def visit(index: int, document: int, commit_cached: int, prefix_tokens: int = 1000) -> dict:
    return {"visit": index, "document": document, "commit_cached_tokens": commit_cached,
            "prefix_tokens": prefix_tokens}


def test_a_visit_reads_the_copy_its_documents_last_prefill_compressed():
    record = {"visit_records": [
        visit(0, 0, 0),      # document 0 prefilled: its branches ran on the full prefix
        visit(1, 1, 0),      # document 1 prefilled
        visit(2, 0, 999),    # document 0 hit: the copy visit 0's branches observed
        visit(4, 0, 0),      # document 0 evicted meanwhile and prefilled again
        visit(3, 1, 999),    # (visits are taken in index order whatever the list order)
        visit(5, 0, 999),    # the copy visit 4's branches observed
        visit(6, 2, 999),    # a hit on a document never prefilled in this run (an earlier run's copy)
    ]}
    assert compressing_visits(record) == {0: None, 1: None, 2: 0, 3: 1, 4: None, 5: 4, 6: None}
