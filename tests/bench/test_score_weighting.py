"""scripts/score_weighting.py's changes to repetition scores, on hand-made observations."""

import importlib.util
from pathlib import Path

import pytest
import torch

from lava_sglang.policy import Reconstruct
from lava_sglang.reference.runtime import Observation

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "score_weighting.py"
spec = importlib.util.spec_from_file_location("score_weighting", SCRIPT)
score_weighting = importlib.util.module_from_spec(spec)
spec.loader.exec_module(score_weighting)

# One layer, two KV heads of two query heads each, three tokens.
LAYER = [[0.1, 0.5, 0.2],
         [0.3, 0.1, 0.0],
         [0.4, 0.0, 0.6],
         [0.0, 0.2, 0.2]]


def observation():
    return Observation(Reconstruct(), repeat_attention=[torch.tensor(LAYER)], token_ids=[1, 2, 3])


def test_group_mean_gives_every_query_head_of_a_group_the_groups_mean():
    seen = observation()
    changed = score_weighting.group_mean(seen, num_kv_heads=2)
    expected = torch.tensor([[0.2, 0.3, 0.1]] * 2 + [[0.2, 0.1, 0.4]] * 2)
    assert torch.allclose(changed.repeat_attention[0], expected)
    assert changed.token_ids == seen.token_ids and changed.source == seen.source
    assert torch.equal(seen.repeat_attention[0], torch.tensor(LAYER))  # not changed


def test_value_weighting_scales_each_token_by_its_values_l1_norm_in_its_kv_head():
    values = torch.tensor([[[1.0, -1.0], [0.5, 0.0], [3.0, 1.0]],    # KV head 0: norms 2, 0.5, 4 (mean 13/6)
                           [[0.0, 1.0], [2.0, 2.0], [-1.0, 0.0]]])  # KV head 1: norms 1, 4, 1 (mean 2)
    norms = torch.tensor([[2.0, 0.5, 4.0], [1.0, 4.0, 1.0]])
    raw = score_weighting.value_weighted(observation(), [values], per_head_mean=False).repeat_attention[0]
    assert torch.allclose(raw, torch.tensor(LAYER) * norms.repeat_interleave(2, dim=0))
    relative = score_weighting.value_weighted(observation(), [values], per_head_mean=True).repeat_attention[0]
    head_means = torch.tensor([13 / 6, 2.0]).repeat_interleave(2)[:, None]
    assert torch.allclose(relative, raw / head_means)


def test_digit_runs_are_the_spans_of_single_digit_tokens():
    tokens = ["The", " code", " is", " ", "4", "9", "9", ".", " In", " ", "2", "0", ",", "x", "7", "12"]
    assert score_weighting.digit_runs(tokens) == [(4, 7), (10, 12), (14, 15)]  # "12" is not one digit
    assert score_weighting.digit_runs(["1", "2"]) == [(0, 2)]  # a run that ends the prefix
    assert score_weighting.digit_runs(["³", "4", "²"]) == [(1, 2)]  # str.isdigit takes "³" and "²"


def test_a_policy_that_scales_by_value_norm_is_refused(monkeypatch, capsys):
    monkeypatch.setattr("sys.argv", ["score_weighting.py", "--name", "x", "--policy", "lava:value_norm=true"])
    with pytest.raises(SystemExit):
        score_weighting.parse_args()
    assert "use value_norm=false" in capsys.readouterr().err


def test_whole_spans_score_every_token_of_a_span_by_its_largest_score_per_query_head():
    seen = observation()
    changed = score_weighting.whole_spans(seen, [(0, 2)]).repeat_attention[0]
    expected = torch.tensor([[0.5, 0.5, 0.2],
                             [0.3, 0.3, 0.0],
                             [0.4, 0.4, 0.6],
                             [0.2, 0.2, 0.2]])
    assert torch.equal(changed, expected)
    assert torch.equal(seen.repeat_attention[0], torch.tensor(LAYER))  # not changed
