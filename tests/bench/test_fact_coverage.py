"""scripts/fact_coverage.py's measures on hand-made plans: which tokens a fact spans, and what
share of (layer, KV head) rows keep them."""

import importlib.util
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "fact_coverage.py"
spec = importlib.util.spec_from_file_location("fact_coverage", SCRIPT)
fact_coverage = importlib.util.module_from_spec(spec)
spec.loader.exec_module(fact_coverage)


def test_token_span_takes_every_token_overlapping_the_characters():
    offsets = [(0, 3), (3, 4), (4, 9), (9, 10), (10, 12)]
    assert fact_coverage.token_span(offsets, 4, 10) == [2, 3]
    assert fact_coverage.token_span(offsets, 2, 5) == [0, 1, 2]
    assert fact_coverage.token_span(offsets, 12, 14) == []


def test_kept_shares_count_whole_spans_and_token_shares_over_rows():
    # Two layers of two KV heads: one row keeps the whole span, one half of it, two none.
    kept = [[torch.tensor([1, 5, 6]), torch.tensor([5])], [torch.tensor([0, 2]), torch.tensor([7])]]
    plan = SimpleNamespace(kept=kept)
    whole, tokens = fact_coverage.kept_shares(plan, [5, 6])
    assert whole == pytest.approx(1 / 4)
    assert tokens == pytest.approx((1 + 0.5 + 0 + 0) / 4)
