"""The real SGLang server on the CPU engine, and the pure-PyTorch `sgl_kernel` stand-in under it.

The server tests start stock SGLang once (SmolLM2, fp32) and check it against HF transformers
token for token, with and without radix-cache hits. The stand-in tests load the stand-in
module by file path: it is never put on this process's sys.path.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import time

import pytest
import requests
import torch

from lava_sglang.sglang_plugin.cpu_engine import (
    STAND_IN_PARENT,
    cpu_engine_env,
    cpu_thread_binding,
    real_sgl_kernel_loads,
)
from lava_sglang.sglang_plugin.server_process import ServerProcess

NEW_TOKENS = 24
needs_cpu_only = pytest.mark.skipif(
    torch.cuda.is_available(), reason="CPU-engine test; with a CUDA device the server runs on the GPU"
)


# --- the server ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(smollm2_path, tmp_path_factory):
    log_path = tmp_path_factory.mktemp("sglang") / "server.log"
    with ServerProcess(smollm2_path, ["--dtype", "float32", "--max-total-tokens", "8192"], log_path=log_path) as s:
        yield s


@pytest.fixture(scope="module")
def prompts(smollm2_path) -> list[list[int]]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_path)
    chat = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
    return [
        tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=False),
        tokenizer("The three primary colors are")["input_ids"],
    ]


def hf_greedy(model, input_ids: list[int], new_tokens: int) -> list[int]:
    """Greedy continuation with HF transformers' own KV cache; never stops at EOS."""
    out_ids: list[int] = []
    with torch.no_grad():
        step = model(torch.tensor([input_ids]), use_cache=True)
        while True:
            out_ids.append(int(step.logits[0, -1].argmax()))
            if len(out_ids) == new_tokens:
                return out_ids
            step = model(torch.tensor([out_ids[-1:]]), past_key_values=step.past_key_values, use_cache=True)


@pytest.fixture(scope="module")
def expected(hf_model, prompts) -> list[list[int]]:
    return [hf_greedy(hf_model, ids, NEW_TOKENS) for ids in prompts]


def generate(server: ServerProcess, batch: list[list[int]]) -> list[dict]:
    response = requests.post(
        server.url + "/generate",
        json={
            "input_ids": batch,
            "sampling_params": {"temperature": 0, "max_new_tokens": NEW_TOKENS, "ignore_eos": True},
        },
        timeout=300,
    )
    response.raise_for_status()
    return response.json()


def flush_cache(server: ServerProcess) -> None:
    requests.post(server.url + "/flush_cache", timeout=60).raise_for_status()


@pytest.mark.model
@needs_cpu_only
def test_greedy_generation_matches_transformers(server, prompts, expected):
    flush_cache(server)
    results = generate(server, prompts)  # one batch: both requests prefill and decode together
    assert [r["output_ids"] for r in results] == expected
    assert [r["meta_info"]["cached_tokens"] for r in results] == [0, 0]


@pytest.mark.model
@needs_cpu_only
def test_repeated_request_hits_radix_cache(server, prompts, expected):
    flush_cache(server)
    first = generate(server, prompts[:1])[0]
    second = generate(server, prompts[:1])[0]
    assert first["meta_info"]["cached_tokens"] == 0
    # The whole prompt is cached; SGLang recomputes its last token to get the next logits.
    assert second["meta_info"]["cached_tokens"] == len(prompts[0]) - 1
    assert second["output_ids"] == first["output_ids"] == expected[0]


@pytest.mark.model
@needs_cpu_only
def test_extended_prompt_reuses_cached_prefix(server, hf_model, prompts, expected):
    flush_cache(server)
    generate(server, prompts[:1])
    # The first prompt and its greedy answer are in the radix tree; extend that text.
    extended = prompts[0] + expected[0][:8]
    result = generate(server, [extended])[0]
    assert result["meta_info"]["cached_tokens"] == len(extended) - 1
    assert result["output_ids"] == hf_greedy(hf_model, extended, NEW_TOKENS)


# --- the environment -------------------------------------------------------------------------


@needs_cpu_only
def test_cpu_engine_env_for_a_server_subprocess():
    env = cpu_engine_env({"TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join(["/a", str(STAND_IN_PARENT), "/b"])})
    assert "TRITON_INTERPRET" not in env
    assert env["SGLANG_USE_CPU_ENGINE"] == "1"
    if real_sgl_kernel_loads():
        assert env["PYTHONPATH"] == os.pathsep.join(["/a", str(STAND_IN_PARENT), "/b"])
    else:
        assert env["PYTHONPATH"] == os.pathsep.join([str(STAND_IN_PARENT), "/a", "/b"])


@pytest.mark.parametrize("ranks, cores, binding", [
    (2, 2, "0|1"),
    (2, 8, "0-3|4-7"),
    (3, 8, "0-1|2-3|4-5"),
    (3, 2, "0|1|0"),  # more ranks than cores: they share
])
def test_cpu_thread_binding_gives_each_rank_its_own_cores(ranks, cores, binding):
    assert cpu_thread_binding(ranks, cores) == binding


@needs_cpu_only
@pytest.mark.parametrize("flags, binding", [
    (["--dp-size", "2"], "0|1"),
    (["--dp=2"], "0|1"),
    (["--tp-size", "3"], "0|1|0"),
    (["--data-parallel-size", "2"], "0|1"),
    (["--model-path", "m", "--dp-size"], None),  # a flag without its value: SGLang's parser says so
    ([], None),  # one scheduler: SGLang's own binding (one NUMA node) serves
])
def test_server_process_binds_one_core_list_per_scheduler_rank(monkeypatch, tmp_path, flags, binding):
    monkeypatch.delenv("SGLANG_CPU_OMP_THREADS_BIND", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    server = ServerProcess("/models/unused", flags, log_path=tmp_path / "never-started.log")
    assert server.env.get("SGLANG_CPU_OMP_THREADS_BIND") == binding


def _running(pid: int) -> bool:
    """Whether `pid` is a live process (an unreaped zombie is not)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_started_process_stops_when_the_process_that_started_it_is_killed(tmp_path):
    # A parent starts a long command the way ServerProcess starts a server, and is SIGKILLed:
    # no __exit__ runs, the command must stop anyway (a killed test run once left its server up).
    parent_code = (
        "import os, sys, time\n"
        "from lava_sglang.sglang_plugin.server_process import _LoggedProcess\n"
        "child = _LoggedProcess(['sleep', '600'], 0, sys.argv[1], dict(os.environ)).start()\n"
        "print(child.process.pid, flush=True)\n"
        "time.sleep(600)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", parent_code, str(tmp_path / "sleep.log")],
                              stdout=subprocess.PIPE, text=True)
    child_pid = None
    try:
        child_pid = int(parent.stdout.readline())
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and "sleep" not in open(f"/proc/{child_pid}/cmdline").read():
            time.sleep(0.05)  # until the wrapper has become the command
        assert _running(child_pid)
        parent.kill()
        parent.wait()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and _running(child_pid):
            time.sleep(0.1)
        assert not _running(child_pid)
    finally:
        parent.kill()
        parent.wait()
        if child_pid is not None and _running(child_pid):
            os.kill(child_pid, signal.SIGKILL)


# --- the stand-in ops ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stand_in():
    """The stand-in `sgl_kernel`, loaded from its file under a private name."""
    spec = importlib.util.spec_from_file_location(
        "_lava_sgl_kernel_stand_in", STAND_IN_PARENT / "sgl_kernel" / "__init__.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module  # kept alive by the fixture: its torch.library registrations live with it


def test_assign_req_to_token_pool(stand_in):
    req_to_token = torch.full((5, 16), -1, dtype=torch.int32)
    req_pool_indices = torch.tensor([3, 0, 4, 1])
    start = torch.tensor([0, 5, 2, 9], dtype=torch.int32)
    end = torch.tensor([4, 5, 7, 11], dtype=torch.int32)  # the second request gets no new slots
    out_cache_loc = torch.arange(100, 120)  # longer than the 4 + 0 + 5 + 2 slots used

    expect = req_to_token.clone()
    expect[3, 0:4] = torch.tensor([100, 101, 102, 103], dtype=torch.int32)
    expect[4, 2:7] = torch.tensor([104, 105, 106, 107, 108], dtype=torch.int32)
    expect[1, 9:11] = torch.tensor([109, 110], dtype=torch.int32)

    stand_in.assign_req_to_token_pool_cpu(req_pool_indices, req_to_token, start, end, out_cache_loc, 16)
    assert torch.equal(req_to_token, expect)
    # Through the registered op as well, as SGLang's call sites do.
    again = torch.full((5, 16), -1, dtype=torch.int32)
    torch.ops.sgl_kernel.assign_req_to_token_pool_cpu(req_pool_indices, again, start, end, out_cache_loc, 16)
    assert torch.equal(again, expect)


def test_copy_all_layer_kv_cache_moves_rows_in_every_buffer(stand_in):
    torch.manual_seed(0)
    buffers = [
        torch.randn(12, 3, 4),  # like a K buffer: [slots, heads, head_dim]
        torch.randn(12, 3, 4),
        torch.randn(12, 2, 8).to(torch.bfloat16),
        torch.randint(0, 255, (12, 5), dtype=torch.uint8),
    ]
    before = [b.clone() for b in buffers]
    data_ptrs = torch.tensor([b.data_ptr() for b in buffers], dtype=torch.uint64)
    strides = torch.tensor([b.stride(0) * b.dtype.itemsize for b in buffers])
    # Overlapping source and target: a row-by-row copy would smear slot 1 over slots 2-4.
    src = torch.tensor([1, 2, 3, 9, 0, 0])
    tgt = torch.tensor([2, 3, 4, 0, 11, 11])

    stand_in.copy_all_layer_kv_cache_cpu(data_ptrs, strides, tgt[:4], src[:4])  # sliced, as at the call site

    for buf, old in zip(buffers, before):
        expect = old.clone()
        expect[2], expect[3], expect[4], expect[0] = old[1], old[2], old[3], old[9]
        assert torch.equal(buf, expect)


def test_murmur_hash32_known_values(stand_in):
    # Values from SGLang's test of the CPU kernel (test_murmur_hash32_cpu_known_values).
    seed = torch.tensor([0, 1, 42, 0x123456789ABCDEF0], dtype=torch.uint64)
    col_indices = torch.tensor([0, 1, 2, 17])
    expect = [
        [2167721464, 10027521, 2423355346, 2203067026],
        [3755322398, 4196701286, 1002451629, 183234019],
        [772287619, 548237471, 2740678348, 3656549299],
        [3746406971, 2891010872, 104055988, 3372550890],
    ]
    for positions_dtype in (torch.int64, torch.uint64):
        positions = torch.tensor([0, 7, 123, 456], dtype=positions_dtype)
        hashed = stand_in.murmur_hash32_cpu(seed, positions, col_indices)
        assert hashed.dtype == torch.uint32
        assert hashed.long().tolist() == expect


def test_unknown_and_placeholder_ops(stand_in):
    with pytest.raises(AttributeError):
        stand_in.convert_weight_packed  # noqa: B018  (absent: keeps SGLang off the AMX paths)
    assert not hasattr(torch.ops.sgl_kernel, "convert_weight_packed")
    with pytest.raises(NotImplementedError, match="verify_tree_greedy_cpu"):
        stand_in.verify_tree_greedy_cpu()
