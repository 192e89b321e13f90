"""scripts/head_selection.py's changes to repetition scores, on hand-made observations, and
the plans they give."""

import importlib.util
from pathlib import Path

import pytest
import torch

from lava_sglang.policy import Reconstruct
from lava_sglang.reference.runtime import Observation

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "head_selection.py"
spec = importlib.util.spec_from_file_location("head_selection", SCRIPT)
head_selection = importlib.util.module_from_spec(spec)
spec.loader.exec_module(head_selection)


def observation(*layers):
    return Observation(Reconstruct(), repeat_attention=[torch.tensor(layer) for layer in layers], token_ids=[1, 2, 3])


def test_shared_scores_are_the_largest_over_a_layers_heads_or_the_models():
    # Two layers, two query heads, three tokens.
    seen = observation([[0.1, 0.5, 0.2], [0.4, 0.0, 0.3]], [[0.0, 0.0, 0.9], [0.2, 0.1, 0.0]])
    by_layer = head_selection.shared(seen, by_model=False)
    assert torch.equal(by_layer.repeat_attention[0], torch.tensor([[0.4, 0.5, 0.3]] * 2))
    assert torch.equal(by_layer.repeat_attention[1], torch.tensor([[0.2, 0.1, 0.9]] * 2))
    by_model = head_selection.shared(seen, by_model=True)
    for layer in by_model.repeat_attention:
        assert torch.equal(layer, torch.tensor([[0.4, 0.5, 0.9]] * 2))
    assert by_model.token_ids == seen.token_ids and by_model.source == seen.source
    assert torch.equal(seen.repeat_attention[0][1], torch.tensor([0.4, 0.0, 0.3]))  # not changed


def test_floor_forces_and_cap_drops_each_kv_heads_tokens_ranked_by_its_groups_largest():
    # One layer, two KV heads of two query heads, five tokens of which the last is the window.
    layer = [[0.1, 0.2, 0.3, 0.0, 0.9],   # KV head 0: group max 0.1 0.6 0.3 0.05 -> ranks 1, 2, 0, 3
             [0.0, 0.6, 0.1, 0.05, 0.9],
             [0.5, 0.0, 0.0, 0.2, 0.9],   # KV head 1: group max 0.5 0.1 0.4 0.2 -> ranks 0, 2, 3, 1
             [0.1, 0.1, 0.4, 0.0, 0.9]]
    seen = observation(layer)
    floored = head_selection.bounded(seen, num_kv_heads=2, selectable=4, floor=1).repeat_attention[0]
    expected = torch.tensor(layer)
    expected[0:2, 1] = torch.inf
    expected[2:4, 0] = torch.inf
    assert torch.equal(floored, expected)
    capped = head_selection.bounded(seen, num_kv_heads=2, selectable=4, cap=2).repeat_attention[0]
    expected = torch.tensor(layer)
    expected[0:2, [0, 3]] = 0.0
    expected[2:4, [1, 3]] = 0.0
    assert torch.equal(capped, expected)  # the window's column is never touched


def test_the_model_wide_share_keeps_the_same_tokens_in_every_head(runtime):
    # The default plan on model-wide shared scores keeps whole columns: the same tokens per head.
    token_ids = list(range(1000, 1200))
    capture = runtime.prefill(token_ids)
    seen = head_selection.shared(runtime.observe(capture, "reconstruct"), by_model=True)
    plan = runtime.compress(capture, "lava", 0.3, seen).plan
    kept = {tuple(sorted(head.tolist())) for layer in plan.kept for head in layer}
    assert len(kept) <= 2  # one set, or two where the threshold splits the last token's column


def test_a_policy_that_pools_or_budgets_layers_by_entropy_is_refused(monkeypatch):
    for policy in ("lava:pool_kernel=7", "lava:layer_budget=entropy"):
        monkeypatch.setattr("sys.argv", ["head_selection.py", "--name", "x", "--policy", policy])
        with pytest.raises(SystemExit):
            head_selection.parse_args()
    monkeypatch.setattr("sys.argv", ["head_selection.py", "--name", "x", "--policy", "kvzip"])
    assert head_selection.parse_args().policy == "kvzip"
