"""The `lava-sglang` command's argument checks: bad input stops with a clear message before
any model loads or server starts."""

import argparse

import pytest

from lava_sglang import cli
from lava_sglang.argtypes import COMPRESSING_POLICIES, OBSERVE_SOURCES, at_least, positive_float
from lava_sglang.bench import serve


def test_the_command_line_choices_are_the_registries():
    from lava_sglang.policy import POLICIES
    from lava_sglang.policy.observe import OBSERVE_SOURCES as SOURCES

    assert set(COMPRESSING_POLICIES) == set(POLICIES) - {"full"}
    assert tuple(OBSERVE_SOURCES) == tuple(SOURCES)
    assert serve.POLICIES == ["none", *COMPRESSING_POLICIES]


def test_numeric_argument_types():
    assert at_least(3)("3") == 3
    for parse, bad in ((at_least(3), "2"), (at_least(1), "0"), (positive_float, "0"), (positive_float, "nan"),
                       (positive_float, "inf")):
        with pytest.raises(argparse.ArgumentTypeError):
            parse(bad)
    assert positive_float("0.5") == 0.5


def test_the_demo_refuses_a_document_too_short_to_be_compressed(capsys):
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["demo", "--context", str(cli.DEFAULT_MIN_PREFIX - 1)])
    assert f"must be an int >= {cli.DEFAULT_MIN_PREFIX}" in capsys.readouterr().err
    assert cli.build_parser().parse_args(["demo", "--context", str(cli.DEFAULT_MIN_PREFIX)]).context == 256


@pytest.mark.parametrize("policy, message", [("h2o", "policy must be one of"), ("lava:alpha=2", "alpha"),
                                             ("full", "keeps everything"),
                                             ("kvzip --observe tail", "kvzip scores by reconstruct, not tail")])
def test_the_demo_checks_its_policy_before_loading_anything(policy, message, capsys, monkeypatch):
    def no_model():
        raise AssertionError("the model was loaded before the policy was checked")

    monkeypatch.setattr("lava_sglang.model.smollm2_path", no_model)
    assert cli.main(["demo", "--policy", *policy.split()]) == 2
    assert message in capsys.readouterr().err


def test_a_quality_partial_file_in_no_folder_is_refused_before_anything_runs(capsys, monkeypatch):
    def no_model():
        raise AssertionError("the model was loaded before --partial was checked")

    monkeypatch.setattr(cli, "_load_runtime", no_model)
    assert cli.main(["bench", "quality", "--partial", "/nonexistent-folder/partial.json"]) == 2
    assert "--partial /nonexistent-folder/partial.json: no folder /nonexistent-folder" in capsys.readouterr().err


def test_a_quality_report_elsewhere_takes_its_own_folders_notes_only(tmp_path, capsys):
    # Rebuilt from its JSON: the notes are <out>/quality_notes.md when it exists, never the
    # repository's docs/results/quality_notes.md (which describes another run).
    run = cli.RESULTS_DIR / "reuse" / "view_until" / "local"  # a committed run without notes
    for name in ("quality.json", "quality_meta.json"):
        (tmp_path / name).write_text((run / name).read_text())
    assert cli.main(["bench", "quality", "--report-only", "--out", str(tmp_path)]) == 0
    assert "Reading the results" not in (tmp_path / "quality.md").read_text()
    (tmp_path / "quality_notes.md").write_text("These notes.")
    assert cli.main(["bench", "quality", "--report-only", "--out", str(tmp_path)]) == 0
    assert "## Reading the results\n\nThese notes." in (tmp_path / "quality.md").read_text()
