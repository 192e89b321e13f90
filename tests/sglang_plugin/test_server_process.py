"""What a server started by `ServerProcess` would refuse, found before it starts."""

from __future__ import annotations

import json

import pytest

from lava_sglang.sglang_plugin.server_process import check_request_fits


@pytest.fixture
def checkpoint(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"max_position_embeddings": 8192}))
    return tmp_path


def test_a_request_beyond_the_context_length_is_refused_before_the_server_starts(checkpoint):
    check_request_fits(checkpoint, [], 8000, 191, cpu_engine=True)
    with pytest.raises(ValueError, match="exceed the server's context length, 8192 tokens"):
        check_request_fits(checkpoint, [], 8000, 192, cpu_engine=True)
    with pytest.raises(ValueError, match="context length, 1024 tokens"):  # the server's flag wins
        check_request_fits(checkpoint, ["--context-length", "1024"], 1000, 24, cpu_engine=False)
    check_request_fits(checkpoint, ["--context-length=16384"], 9000, 24, cpu_engine=False)


def test_a_prompt_beyond_the_kv_pool_is_refused_before_the_server_starts(checkpoint):
    with pytest.raises(ValueError, match="does not fit the server's KV pool of 512 tokens"):
        check_request_fits(checkpoint, ["--max-total-tokens", "512"], 600, 16, cpu_engine=True)
    check_request_fits(checkpoint, ["--max-total-tokens", "4096"], 600, 16, cpu_engine=True)
    # On a GPU the pool is SGLang's own, sized by the memory: not checked here.
    check_request_fits(checkpoint, [], 8000, 16, cpu_engine=False)
