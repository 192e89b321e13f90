"""scripts/surprisal_prior.py's weighting of repetition attention by token surprisal, on
hand-made observations."""

import importlib.util
from pathlib import Path

import pytest
import torch

from lava_sglang.policy import Reconstruct
from lava_sglang.reference.runtime import Observation

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "surprisal_prior.py"
spec = importlib.util.spec_from_file_location("surprisal_prior", SCRIPT)
surprisal_prior = importlib.util.module_from_spec(spec)
spec.loader.exec_module(surprisal_prior)


def test_each_token_is_weighted_by_its_surprisal_over_the_mean_to_the_gamma():
    # Two layers, 3 query heads, 4 tokens; the first token has no surprisal (no context).
    attention = [torch.ones(3, 4), torch.arange(12.0).view(3, 4)]
    observation = Observation(Reconstruct(), repeat_attention=attention, token_ids=[5, 6, 7, 8])
    nll = torch.tensor([0.0, 1.0, 2.0, 3.0])  # mean over tokens 1..3: 2
    seen = surprisal_prior.weighted(observation, nll, gamma=2.0)
    expected_weight = torch.tensor([(1e-3 / 2) ** 2, 0.25, 1.0, 2.25])
    for original, weighted in zip(attention, seen.repeat_attention):
        torch.testing.assert_close(weighted, original * expected_weight)
    assert seen.token_ids == observation.token_ids and seen.source == observation.source
    assert torch.equal(attention[1], torch.arange(12.0).view(3, 4))  # the observation is not changed


def test_gamma_zero_is_refused_on_the_command_line(monkeypatch):
    monkeypatch.setattr("sys.argv", ["surprisal_prior.py", "--name", "x", "--gammas", "0"])
    with pytest.raises(SystemExit):
        surprisal_prior.parse_args()
