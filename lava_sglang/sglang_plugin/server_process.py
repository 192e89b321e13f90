"""Launch an SGLang server subprocess on 127.0.0.1 (tests, demo, benchmarks).

    with ServerProcess(model_path, ["--dtype", "float32"], log_path="server.log") as server:
        requests.post(server.url + "/generate", json=...)

Without a CUDA device the server runs on SGLang's CPU engine (`--device cpu --attention-backend
torch_native --sleep-on-idle`, environment from `cpu_engine_env`), with `--max-total-tokens
16384` unless the caller gives its own: SGLang's default would reserve most of the RAM.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import deque
from pathlib import Path

from lava_sglang.sglang_plugin.cpu_engine import cpu_engine_env

HOST = "127.0.0.1"
CPU_DEFAULT_MAX_TOTAL_TOKENS = 16384


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def _cpu_engine_args(args: list[str]) -> list[str]:
    """The flags the CPU engine needs that `args` does not already set."""
    defaults = {
        "--device": ["cpu"],
        "--attention-backend": ["torch_native"],
        "--sleep-on-idle": [],
        "--max-total-tokens": [str(CPU_DEFAULT_MAX_TOTAL_TOKENS)],
    }
    given = {arg.split("=", 1)[0] for arg in args}
    return [token for flag, value in defaults.items() if flag not in given for token in (flag, *value)]


class ServerProcess:
    """`python -m sglang.launch_server` in its own process group, logging to `log_path`."""

    def __init__(
        self,
        model_path: str | os.PathLike,
        server_args: list[str] | None = None,
        port: int | None = None,
        log_path: str | os.PathLike | None = None,
        env: dict[str, str] | None = None,
    ):
        import torch

        self.port = port or free_port()
        if log_path is None:
            fd, log_path = tempfile.mkstemp(prefix="sglang-server-", suffix=".log")
            os.close(fd)
        self.log_path = Path(log_path)
        args = list(server_args or [])
        if not torch.cuda.is_available():
            args += _cpu_engine_args(args)
        self.command = [
            sys.executable, "-m", "sglang.launch_server",
            "--model-path", str(model_path), "--host", HOST, "--port", str(self.port), *args,
        ]  # fmt: skip
        self.env = cpu_engine_env({**os.environ, **(env or {})})  # env: variables for the server only
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def start(self) -> ServerProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                self.command, env=self.env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True,  # its own process group, so stop() reaches the scheduler too
            )  # fmt: skip
        return self

    def wait_ready(self, timeout: float = 300.0) -> ServerProcess:
        """Block until the server generates (`/health_generate` answers 200)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"SGLang server exited with code {self.process.returncode}\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.url + "/health_generate", timeout=30) as response:
                    if response.status == 200:
                        return self
            except OSError:  # not listening yet, or 503 while it warms up (HTTPError)
                pass
            time.sleep(1.0)
        raise TimeoutError(f"SGLang server not ready after {timeout:.0f} s\n{self.log_tail()}")

    def stop(self, grace: float = 20.0) -> None:
        """SIGTERM the launcher (it shuts its scheduler and detokenizer down), then SIGKILL
        whatever is left of the process group after `grace` seconds."""
        if self.process is None:
            return
        pgid = self.process.pid  # start_new_session: the group id is the launcher's pid
        self.process.terminate()
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and _group_alive(pgid, self.process):
            time.sleep(0.2)
        _signal_group(pgid, signal.SIGKILL)
        self.process.wait()
        self.process = None

    def log_tail(self, lines: int = 40) -> str:
        with open(self.log_path, errors="replace") as log:
            return "".join(deque(log, maxlen=lines))

    def __enter__(self) -> ServerProcess:
        self.start()
        try:
            return self.wait_ready()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


def _group_alive(pgid: int, leader: subprocess.Popen) -> bool:
    leader.poll()  # reap the launcher if it has exited, or it would count as alive
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
