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
