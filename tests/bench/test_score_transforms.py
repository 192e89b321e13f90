"""The harness of the score-transform scripts (lava_sglang.bench.score_transforms) on one
real document: every variant is asked for every keep ratio, the table is written, and
variants other than the announced ones are refused."""

import argparse
import json

import pytest
import torch

from lava_sglang.bench import score_transforms


def arguments(out):
    parser = argparse.ArgumentParser()
    score_transforms.add_arguments(parser, out)
    return parser.parse_args(["--context", "1024", "--questions", "1", "--facts", "1", "--keep", "0.2", "1.0",
                              "--name", "one"])


def test_every_variant_plans_at_every_keep_ratio_and_the_table_is_written(runtime, tmp_path):
    calls = []

    def variants(runtime, capture):
        def record(observation, keep):
            assert observation.token_ids == capture.token_ids  # the document's own prefill
            calls.append(keep)
            return observation
        return {"as observed": record}

    result = score_transforms.run(arguments(tmp_path), "test", "Harness", ["as observed"], variants, runtime)
    assert calls == [0.2, 1.0]
    assert list(result["right"]) == ["full cache", "as observed, keep 0.2", "as observed, keep 1"]
    # keep 1.0 keeps every row: it answers as the full cache does, right or wrong in the same way
    assert result["right"]["as observed, keep 1"] == result["right"]["full cache"]
    assert result["wrong"]["as observed, keep 1"] == result["wrong"]["full cache"]
    assert json.loads((tmp_path / "one.json").read_text())["right"] == result["right"]
    for cell, count in result["right"].items():  # every answer is right or wrong in one way
        assert count + sum(result["wrong"][cell].values()) == 1
    assert result["broad_heads"]["full cache"] == result["broad_rows"]["full cache"] == 1.0
    table = (tmp_path / "one.md").read_text()
    assert "| as observed, keep 0.2 |" in table and "Written by `test`" in table


def test_variants_other_than_the_announced_ones_are_refused(runtime, tmp_path):
    with pytest.raises(ValueError, match="not the announced"):
        score_transforms.run(arguments(tmp_path), "test", "Harness", ["a"],
                             lambda runtime, capture: {"b": lambda observation, keep: observation}, runtime)


def test_broad_rows_are_those_keeping_more_than_half_the_prefix():
    lengths = torch.tensor([[10, 60], [51, 50]])  # of a 100-token prefix: 60 and 51 are broad
    heads, rows = score_transforms.broad_share(lengths, 100)
    assert heads == pytest.approx(0.5) and rows == pytest.approx(111 / 171)


def test_arguments_that_would_lose_the_run_are_refused_before_the_model_loads(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    score_transforms.add_arguments(parser, tmp_path)
    (tmp_path / "a_file").write_text("")
    for argv, error in ((["--keep", "0.1", "0.1"], "--keep: a value repeats (0.1 0.1 as the cells name them)"),
                        (["--keep", "0.2", "0.1", "0.1000001"], "a value repeats (0.2 0.1 0.1 as the cells"),
                        (["--out", str(tmp_path / "a_file" / "sub")], "cannot make that folder"),
                        (["--name", "sub/x"], "must be a file name without a folder"),
                        (["--policy", "streamingllm"], "--policy streamingllm reads no scores")):
        with pytest.raises(SystemExit):
            score_transforms.parse_arguments(parser, ["--name", "x", *argv])
        assert error in capsys.readouterr().err
    args = score_transforms.parse_arguments(parser, ["--name", "x", "--out", str(tmp_path / "new")])
    assert (tmp_path / "new").is_dir() and args.keep == [0.1, 0.2]


def test_a_policy_the_registry_cannot_make_is_refused_at_parse_time(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    score_transforms.add_arguments(parser, tmp_path)
    with pytest.raises(SystemExit):
        parser.parse_args(["--name", "x", "--policy", "lava:layer_budget=bogus"])
    assert "layer_budget must be one of" in capsys.readouterr().err


@pytest.mark.parametrize("text, kind", [
    ("The special code for amber harbor is 4995829.", "right"),
    ("The code is 4995829 or 1234567", "right"),
    ("The special code for amber harbor is 7442110", "another planted code"),
    ("It is 17442110", "another code"),  # a longer number is not the planted code
    ("It is 14995829", "another code"),
    ("The special code for amber harbor is 9000000", "another code"),
    ("The special code for amber harbor is 943217.", "fewer digits"),
    ("1.  **Pinecarvillage**: the name", "fewer digits"),
    ("The special code for amber harbor is \"finally\".", "no digits"),
])
def test_an_answer_is_right_or_wrong_in_one_of_four_ways(text, kind):
    assert score_transforms.answer_kind(text, "4995829", {"4995829", "7442110"}) == kind
