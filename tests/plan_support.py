"""Helpers shared by the policy and reference tests (importable from any test: tests/ is on sys.path)."""

import torch


def same_plan(a, b) -> bool:
    """Whether two plans keep the same budgets and the same token indices in every layer and head."""
    return a.head_budgets == b.head_budgets and all(
        torch.equal(x, y) for la, lb in zip(a.kept, b.kept) for x, y in zip(la, lb))
