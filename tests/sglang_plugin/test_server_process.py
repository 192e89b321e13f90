"""What a server started by `ServerProcess` would refuse, found before it starts; the flags it
adds for the CPU engine; how it stops a process group."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest

from lava_sglang.sglang_plugin.server_process import (_cpu_engine_args, _LoggedProcess, _scheduler_ranks,
                                                      check_request_fits)


@pytest.fixture
def checkpoint(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"max_position_embeddings": 8192}))
    return tmp_path


def test_a_request_beyond_the_context_length_is_refused_before_the_server_starts(checkpoint):
    check_request_fits(checkpoint, [], 8000, 192, cpu_engine=True)  # 8,192 in all: SGLang serves it
    with pytest.raises(ValueError, match="exceed the server's context length, 8192 tokens"):
        check_request_fits(checkpoint, [], 8000, 193, cpu_engine=True)
    with pytest.raises(ValueError, match="context length, 1024 tokens"):  # the server's flag wins
        check_request_fits(checkpoint, ["--context-length", "1024"], 1000, 25, cpu_engine=False)
    check_request_fits(checkpoint, ["--context-length=16384"], 9000, 24, cpu_engine=False)


def test_a_prompt_beyond_what_the_scheduler_admits_is_refused_before_the_server_starts(checkpoint):
    # min(context - 1, pool - 1) - 6 tokens at most (touchpoints.max_prompt_tokens).
    check_request_fits(checkpoint, ["--max-total-tokens", "512"], 505, 16, cpu_engine=True)
    with pytest.raises(ValueError, match="longer than the server admits, 505 tokens"):
        check_request_fits(checkpoint, ["--max-total-tokens", "512"], 506, 16, cpu_engine=True)
    check_request_fits(checkpoint, [], 8185, 2, cpu_engine=False)  # on a GPU, the context bounds it
    with pytest.raises(ValueError, match="longer than the server admits, 8185 tokens"):
        check_request_fits(checkpoint, [], 8186, 2, cpu_engine=False)


def test_a_server_that_truncates_or_has_bad_flags_is_left_to_itself(checkpoint):
    check_request_fits(checkpoint, ["--allow-auto-truncate"], 9000, 24, cpu_engine=True)  # it cuts the prompt
    check_request_fits(checkpoint, ["--context-length", "abc"], 9000, 24, cpu_engine=True)  # SGLang names the flag


def test_a_model_that_is_not_a_checkpoint_folder_is_left_to_the_server(tmp_path):
    check_request_fits(tmp_path / "model.gguf", [], 100_000, 24, cpu_engine=True)  # a file, or a hub id
    (tmp_path / "config.json").write_text(json.dumps({"max_position_embeddings": None}))
    check_request_fits(tmp_path, [], 100_000, 24, cpu_engine=True)


def _running(pid: int) -> bool:
    """Whether process `pid` exists and is not a zombie (one whose parent has not reaped it)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc; the process-group stop is the same elsewhere")
def test_stopping_a_process_ends_its_whole_group_even_a_child_that_ignores_sigterm(tmp_path):
    # As an SGLang launcher's scheduler could: the leader ends on SIGTERM, its child does not;
    # stop() kills what is left of the group after the grace period.
    child_code = ("import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                  "print('child ready', flush=True); time.sleep(120)")
    leader_code = (f"import subprocess, sys, time; child = subprocess.Popen([sys.executable, '-c', {child_code!r}]); "
                   "print('child', child.pid, flush=True); time.sleep(120)")
    process = _LoggedProcess([sys.executable, "-c", leader_code], port=0, log_path=tmp_path / "process.log",
                             env=dict(os.environ))
    process.start()
    deadline = time.monotonic() + 60
    while "child ready" not in process.log_tail() and time.monotonic() < deadline:
        time.sleep(0.1)
    child_pid = int(next(line.split()[1] for line in process.log_tail().splitlines() if line.startswith("child ")))
    leader = process.process
    assert _running(child_pid) and leader.poll() is None
    process.stop(grace=1.0)
    deadline = time.monotonic() + 10  # SIGKILL is asynchronous
    while _running(child_pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _running(child_pid) and leader.poll() is not None and process.process is None


@pytest.mark.parametrize("args, expected", [
    ([], ["--device", "cpu", "--attention-backend", "torch_native", "--sleep-on-idle", "--max-total-tokens", "16384"]),
    (["--max-total-tokens=2048", "--attention-backend", "triton"], ["--device", "cpu", "--sleep-on-idle"]),
])
def test_the_cpu_engine_flags_are_added_where_the_caller_gave_none(args, expected):
    assert _cpu_engine_args(args) == expected


def test_the_scheduler_ranks_are_data_parallel_times_tensor_parallel():
    assert _scheduler_ranks(["--tp-size", "3", "--dp=2"]) == 6 and _scheduler_ranks([]) == 1
    assert _scheduler_ranks(["--tp-size"]) == 1  # a missing value: SGLang's parser refuses it


def test_a_free_port_is_below_the_ephemeral_range_and_skips_a_taken_one(monkeypatch):
    # Ports from the ephemeral range are handed to any program's connections while a server loads its model.
    import socket

    from lava_sglang.sglang_plugin import server_process

    low = server_process._ephemeral_port_low()
    ports = {server_process.free_port() for _ in range(20)}
    assert all(server_process.PORT_FLOOR <= port < low for port in ports) and len(ports) > 1
    with socket.socket() as taken:
        taken.bind((server_process.HOST, 0))
        held = taken.getsockname()[1]
        picks = iter([held, *range(server_process.PORT_FLOOR, server_process.PORT_FLOOR + 100)])
        monkeypatch.setattr(server_process.random.SystemRandom, "randrange", lambda self, start, stop: next(picks))
        assert server_process.free_port() != held


def test_the_router_is_asked_again_after_a_half_made_answer(tmp_path, monkeypatch):
    # While it starts, /workers may answer with a body that is not the JSON of its worker list.
    import io

    from lava_sglang.sglang_plugin import server_process

    worker = "http://127.0.0.1:30001"
    answers = iter([b"starting", b'{"workers": [{"url": "http://127.0.0.1:30001"}]}',
                    json.dumps({"workers": [{"url": worker, "is_healthy": True}]}).encode()])
    monkeypatch.setattr(server_process._LoggedProcess, "wait_ready", lambda self, timeout: self)
    monkeypatch.setattr(server_process.urllib.request, "urlopen", lambda url, timeout: io.BytesIO(next(answers)))
    monkeypatch.setattr(server_process.time, "sleep", lambda seconds: None)
    router = server_process.RouterProcess([worker], port=1, log_path=tmp_path / "router.log")
    assert router.wait_ready(timeout=10) is router
