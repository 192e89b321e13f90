"""Helpers shared by the policy and reference tests (importable from any test: tests/ is on sys.path)."""

import torch


def same_plan(a, b) -> bool:
    """Whether two plans keep the same budgets and the same token indices in every layer and head."""
    return a.head_budgets == b.head_budgets and len(a.kept) == len(b.kept) and all(
        len(la) == len(lb) and all(torch.equal(x, y) for x, y in zip(la, lb)) for la, lb in zip(a.kept, b.kept))
