"""Launch an SGLang server, or SGLang's router, as a subprocess on 127.0.0.1 (tests, demo,
benchmarks).

    with ServerProcess(model_path, ["--dtype", "float32"], log_path="server.log") as server:
        requests.post(server.url + "/generate", json=...)

Without a CUDA device the server runs on SGLang's CPU engine (`--device cpu --attention-backend
torch_native --sleep-on-idle`, environment from `cpu_engine_env`), with `--max-total-tokens
16384` unless the caller gives its own: SGLang's default would reserve most of the RAM.
`RouterProcess` starts `sglang-router` (cache-aware routing by default) in front of servers.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import deque
from pathlib import Path

from lava_sglang.sglang_plugin.cpu_engine import cpu_engine_env, cpu_thread_binding

HOST = "127.0.0.1"
CPU_DEFAULT_MAX_TOTAL_TOKENS = 16384

# On Linux a command runs under this wrapper (argv: the starting process's pid, the command),
# which asks the kernel to SIGTERM it when the thread that started it exits
# (PR_SET_PDEATHSIG, kept across exec) and then becomes the command. So a server outlives no
# test run or benchmark, even one killed before its `with` block could stop it: SGLang's
# launcher stops its scheduler and detokenizer on SIGTERM, and they die with it anyway.
# Every caller starts its processes on its main thread.
_STOPPED_WITH_PARENT = (
    "import ctypes, os, signal, sys\n"
    "ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1: PR_SET_PDEATHSIG\n"
    "if os.getppid() != int(sys.argv[1]):  # the parent died before the line above\n"
    "    sys.exit(1)\n"
    "os.execvp(sys.argv[2], sys.argv[2:])\n"
)


#: The lowest port `free_port` picks.
PORT_FLOOR = 10000


def free_port() -> int:
    """A port free now, picked at random below the kernel's ephemeral range. A server binds
    its port only once its model has loaded; a port from that range (what binding port 0
    gives) may meanwhile be handed to any program's outgoing connection, and the readiness
    check would then ask whatever holds it. Below the range only a program that asks for a
    port by number takes it, and ours pick at random."""
    ephemeral_low = _ephemeral_port_low()
    picker = random.SystemRandom()
    for _ in range(100):
        port = picker.randrange(PORT_FLOOR, ephemeral_low) if ephemeral_low > PORT_FLOOR else 0
        with socket.socket() as sock:
            try:
                sock.bind((HOST, port))
            except OSError:  # taken: another pick
                continue
            return sock.getsockname()[1]
    raise OSError(f"no free port in [{PORT_FLOOR}, {ephemeral_low}) after 100 picks")


def _ephemeral_port_low() -> int:
    """The first port of the kernel's ephemeral range (Linux's default 32768 where it cannot be read)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def _flag_value(args: list[str], *names: str, default: str) -> str:
    """The value of the first of `names` in `args` (`--flag value` or `--flag=value`)."""
    for index, arg in enumerate(args):
        flag, equals, value = arg.partition("=")
        if flag in names and (equals or index + 1 < len(args)):
            return value if equals else args[index + 1]
    return default


def _scheduler_ranks(args: list[str]) -> int:
    """How many scheduler processes the server runs (data parallel x tensor parallel)."""
    data_parallel = _flag_value(args, "--dp-size", "--dp", "--data-parallel-size", default="1")
    tensor_parallel = _flag_value(args, "--tp-size", "--tp", "--tensor-parallel-size", default="1")
    try:
        return int(data_parallel) * int(tensor_parallel)
    except ValueError:  # a missing or bad value: SGLang's own parser refuses it with the reason
        return 1


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


def check_request_fits(model_path: str | os.PathLike, server_args: list[str], prompt_tokens: int,
                       max_new_tokens: int, cpu_engine: bool) -> None:
    """Refuse (ValueError) a request that a server started by `ServerProcess` with
    `server_args` would refuse (HTTP 400, after it has started): a prompt and answer beyond
    its context length (`--context-length`, else the checkpoint folder's
    `max_position_embeddings`; a model named otherwise is not checked), or a prompt beyond
    what its scheduler admits within the context and the KV pool (`--max-total-tokens`; on
    the CPU engine 16384 unless given, on a GPU SGLang's own, taken as the context)."""
    from lava_sglang.sglang_plugin.touchpoints import max_prompt_tokens

    if "--allow-auto-truncate" in server_args:  # the server cuts such a prompt instead
        return
    config_path = Path(model_path) / "config.json"
    checkpoint = json.loads(config_path.read_text()) if config_path.is_file() else {}
    try:
        context_len = int(_flag_value(server_args, "--context-length",
                                      default=str(checkpoint.get("max_position_embeddings") or 0)))
        pool = int(_flag_value(server_args, "--max-total-tokens",
                               default=str(CPU_DEFAULT_MAX_TOTAL_TOKENS if cpu_engine else context_len)))
    except ValueError:  # a bad --context-length or --max-total-tokens: SGLang's parser names it
        return
    if not context_len:
        return
    if prompt_tokens + max_new_tokens > context_len:  # SGLang's tokenizer manager refuses it
        raise ValueError(f"a prompt of {prompt_tokens} tokens and an answer of up to {max_new_tokens} exceed the "
                         f"server's context length, {context_len} tokens: shorten the document or the answer")
    admitted = max_prompt_tokens(context_len, pool)
    if prompt_tokens > admitted:  # its scheduler refuses it
        raise ValueError(f"a prompt of {prompt_tokens} tokens is longer than the server admits, "
                         f"{admitted} tokens (its context of {context_len} and KV pool "
                         f"of {pool} tokens, --max-total-tokens): shorten the document or give a larger pool")


class ServerExited(RuntimeError):
    """A launched server (or router) process ended before it was ready."""


class _LoggedProcess:
    """A command in its own process group, logging to `log_path`, ready once `health_path`
    answers 200; a context manager that stops the whole group on exit. On Linux the command
    is also stopped when the process that started it dies (`_STOPPED_WITH_PARENT`)."""

    name = "process"
    health_path = "/health"

    def __init__(self, command: list[str], port: int, log_path: str | os.PathLike | None, env: dict[str, str]):
        self.port = port
        if log_path is None:
            fd, log_path = tempfile.mkstemp(prefix=f"{self.name.replace(' ', '-')}-", suffix=".log")
            os.close(fd)
        self.log_path = Path(log_path)
        self.command = command
        self.env = env
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def start(self):
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        command = self.command
        if sys.platform == "linux":
            command = [sys.executable, "-c", _STOPPED_WITH_PARENT, str(os.getpid()), *command]
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                command, env=self.env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True,  # its own process group, so stop() reaches its children too
            )  # fmt: skip
        return self

    def wait_ready(self, timeout: float = 300.0):
        """Block until `health_path` answers 200."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ServerExited(f"{self.name} exited with code {self.process.returncode}\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.url + self.health_path, timeout=30) as response:
                    if response.status == 200:
                        return self
            except OSError:  # not listening yet, or 503 while it warms up (HTTPError)
                pass
            time.sleep(1.0)
        raise TimeoutError(f"{self.name} not ready after {timeout:.0f} s\n{self.log_tail()}")

    def stop(self, grace: float = 20.0) -> None:
        """SIGTERM the leader (an SGLang launcher shuts its scheduler and detokenizer down),
        then SIGKILL whatever is left of the process group after `grace` seconds."""
        if self.process is None:
            return
        pgid = self.process.pid  # start_new_session: the group id is the leader's pid
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

    def __enter__(self):
        self.start()
        try:
            return self.wait_ready()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()


class ServerProcess(_LoggedProcess):
    """`python -m sglang.launch_server` in its own process group, logging to `log_path`."""

    name = "SGLang server"
    health_path = "/health_generate"  # the server generates, not just listens

    def __init__(
        self,
        model_path: str | os.PathLike,
        server_args: list[str] | None = None,
        port: int | None = None,
        log_path: str | os.PathLike | None = None,
        env: dict[str, str] | None = None,
    ):
        import torch

        args = list(server_args or [])
        cpu_engine = not torch.cuda.is_available()
        if cpu_engine:
            args += _cpu_engine_args(args)
        port = port or free_port()
        command = [
            sys.executable, "-m", "sglang.launch_server",
            "--model-path", str(model_path), "--host", HOST, "--port", str(port), *args,
        ]  # fmt: skip
        env = cpu_engine_env({**os.environ, **(env or {})})  # env: variables for the server only
        ranks = _scheduler_ranks(args)
        if cpu_engine and ranks > 1:
            env.setdefault("SGLANG_CPU_OMP_THREADS_BIND", cpu_thread_binding(ranks, os.cpu_count() or 1))
        super().__init__(command, port, log_path, env)


class RouterProcess(_LoggedProcess):
    """SGLang's router (`python -m sglang_router.launch_router`, the Rust load balancer of
    the `sglang-router` package) in front of running servers, with `policy` (cache-aware:
    a request goes to the server whose routed text it shares most of, a new prefix to the
    least loaded server)."""

    name = "SGLang router"

    def __init__(self, worker_urls: list[str], policy: str = "cache_aware", port: int | None = None,
                 log_path: str | os.PathLike | None = None, router_args: list[str] | None = None):
        port = port or free_port()
        self.worker_urls = list(worker_urls)
        command = [
            sys.executable, "-m", "sglang_router.launch_router", "--host", HOST, "--port", str(port),
            "--worker-urls", *self.worker_urls, "--policy", policy, *(router_args or []),
        ]  # fmt: skip
        super().__init__(command, port, log_path, dict(os.environ))

    def wait_ready(self, timeout: float = 300.0) -> RouterProcess:
        """Block until every worker is registered and healthy: the router answers /health
        before it has registered any, and routes everything to the first one it has."""
        deadline = time.monotonic() + timeout
        super().wait_ready(timeout)
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(self.url + "/workers", timeout=30) as response:
                    workers = json.load(response)["workers"]
                registered = {_router_worker_server(worker["url"]) for worker in workers}
                if registered == set(self.worker_urls) and all(worker["is_healthy"] for worker in workers):
                    return self
            except (OSError, ValueError, KeyError, TypeError):  # a refusal, an error or a half-made answer: ask again
                pass
            time.sleep(0.5)
        raise TimeoutError(f"{self.name}: not every worker healthy after {timeout:.0f} s\n{self.log_tail()}")


def _router_worker_server(worker_url: str) -> str:
    """The server of a worker the router lists: with --dp-aware it registers each
    data-parallel rank of a server as `server@rank`."""
    return re.sub(r"@\d+$", "", worker_url)


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
