"""The examples' inputs are checked before any request: one line, not a traceback or a wrong run."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def load(name: str, monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLES))  # as `python examples/NAME.py` runs it
    return importlib.import_module(name)


@pytest.mark.parametrize("name", ["multi_question_qa", "openai_shared_document"])
@pytest.mark.parametrize("args, message", [
    (["--max-tokens", "0"], "--max-tokens: must be an int >= 1"),  # 0 would make every branch a fork commit
    (["--document", "/nonexistent/document.txt"], "--document /nonexistent/document.txt: No such file"),
    (["--questions", "EMPTY"], "no question in it (one per line)"),
    (["--document", "EMPTY"], "the file is empty"),
])
def test_bad_inputs_are_one_line_before_any_request(name, args, message, tmp_path, monkeypatch, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    with pytest.raises(SystemExit) as exit_info:
        load(name, monkeypatch).main([str(empty) if arg == "EMPTY" else arg for arg in args])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert message in error and "Traceback" not in error


@pytest.mark.parametrize("name", ["multi_question_qa", "openai_shared_document"])
def test_no_server_at_the_url_is_one_line_saying_how_to_start_one(name, monkeypatch, capsys):
    import socket

    with socket.socket() as unused:  # a port nothing listens on
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    with pytest.raises(SystemExit) as exit_info:
        load(name, monkeypatch).main(["--url", f"http://127.0.0.1:{port}"])
    assert exit_info.value.code == 1
    error = capsys.readouterr().err
    assert f"no SGLang server answers at --url http://127.0.0.1:{port} (ConnectionError)" in error
    assert "examples/launch_server.sh" in error and "Traceback" not in error


def test_the_openai_example_refuses_no_concurrency(monkeypatch, capsys):
    with pytest.raises(SystemExit):
        load("openai_shared_document", monkeypatch).main(["--concurrency", "0"])
    assert "--concurrency: must be an int >= 1" in capsys.readouterr().err
