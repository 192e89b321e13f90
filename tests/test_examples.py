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


@pytest.mark.parametrize("name", ["multi_question_qa", "openai_shared_document"])
def test_a_url_that_is_not_http_is_refused_and_a_trailing_slash_dropped(name, monkeypatch, capsys):
    module = load(name, monkeypatch)
    with pytest.raises(SystemExit) as exit_info:
        module.main(["--url", "localhost:30000"])
    assert exit_info.value.code == 2 and "give the server as http://HOST:PORT" in capsys.readouterr().err
    assert load("example_inputs", monkeypatch).server_url("http://127.0.0.1:30000/") == "http://127.0.0.1:30000"


class Answer:
    def __init__(self, status_code: int, body=None):
        self.status_code, self.body = status_code, body

    def json(self):
        return self.body


@pytest.mark.parametrize("name", ["multi_question_qa", "openai_shared_document"])
def test_a_url_whose_health_check_fails_is_one_line(name, monkeypatch, capsys):
    module = load(name, monkeypatch)
    monkeypatch.setattr("requests.get", lambda url, timeout: Answer(404))
    with pytest.raises(SystemExit) as exit_info:
        module.main(["--url", "http://127.0.0.1:9"])
    assert exit_info.value.code == 1
    assert "--url http://127.0.0.1:9/health answered HTTP 404" in capsys.readouterr().err


def test_a_failed_branch_is_one_line(monkeypatch, capsys):
    module = load("multi_question_qa", monkeypatch)
    monkeypatch.setattr("requests.get", lambda url, timeout: Answer(200))

    def failing(**kwargs):
        raise RuntimeError("a branch of the program failed: the input (9000 tokens) is longer than the context")

    monkeypatch.setattr(module.multi_question_qa, "run", failing)
    monkeypatch.setattr(module.sgl, "RuntimeEndpoint", lambda url: None)
    with pytest.raises(SystemExit) as exit_info:
        module.main([])
    assert exit_info.value.code == 1
    error = capsys.readouterr().err
    assert "longer than the context" in error and "Traceback" not in error


def test_the_store_summary_counts_every_data_parallel_rank(monkeypatch):
    inputs = load("example_inputs", monkeypatch)
    rank = {"lava_kv_policy": {"policy": "lava", "budget": 0.2, "store": {
        "entries": 1, "prefix_tokens": 1000, "bytes_stored": 2**20, "bytes_saved": 4 * 2**20,
        "compress_seconds": 0.05}}}
    monkeypatch.setattr("requests.get", lambda url, timeout: Answer(200, {"internal_states": [rank, rank]}))
    assert inputs.store_summary("http://x") == ("Server: --kv-policy lava --kv-budget 0.2: 2 compressed prefix(es), "
                                                "2000 tokens, 2.0 MiB stored instead of 10.0 MiB, compressed in 100 ms")
    monkeypatch.setattr("requests.get", lambda url, timeout: Answer(200, {"internal_states": [{}]}))
    assert inputs.store_summary("http://x") == "Server: no compressed store (stock SGLang or --kv-policy none)"


def test_launch_server_stops_when_its_cpu_engine_setup_fails(tmp_path):
    import os
    import subprocess

    # A `python` that finds no GPU, fails to write the CPU engine's exports, and says so if it is
    # asked to launch the server anyway.
    fake = tmp_path / "python"
    fake.write_text('#!/usr/bin/env bash\ncase "$1" in\n  -c) exit 1 ;;\n  -) echo "no cpu_engine" >&2; exit 3 ;;\n'
                    '  *) echo LAUNCHED ;;\nesac\n')
    fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}", "MODEL": str(tmp_path)}
    run = subprocess.run(["bash", str(EXAMPLES / "launch_server.sh")], env=env, capture_output=True, text=True,
                         timeout=60)
    assert run.returncode == 3 and "no cpu_engine" in run.stderr
    assert "LAUNCHED" not in run.stdout
