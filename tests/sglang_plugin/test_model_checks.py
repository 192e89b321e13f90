"""The start-up refusals of models and engine states the plugin cannot serve (MLA, sliding
window in the config or on a layer, hybrid layers, logit soft-capping, learned sinks, cross-attention, key and value
heads of different sizes, non-causal attention, an attention scaling other than
1/sqrt(head_dim) for a scoring policy, a window or a minimum prefix as long
as the context, a quantized, fp8 or unusual KV pool, pages of more than one token, an attention backend without the
compressed-prefix path): each names its reason."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import torch

from lava_sglang.sglang_plugin.config import ConfigError, KvPolicyConfig
from lava_sglang.sglang_plugin.plugin import _check_model


def model_with_attention(sinks=None, scaling=0.125, **layer_options):
    """A model of one SGLang attention layer (SmolLM2's shape): `layer_options` for its
    `RadixAttention` (`attn_type` by its value), `sinks` held by the attention module as
    gpt-oss holds them."""
    from sglang.srt.layers.radix_attention import AttentionType, RadixAttention

    if "attn_type" in layer_options:
        layer_options["attn_type"] = AttentionType(layer_options["attn_type"])
    model = torch.nn.Module()
    model.self_attn = torch.nn.Module()
    model.self_attn.attn = RadixAttention(9, 64, scaling, 3, layer_id=0, **layer_options)
    model.self_attn.sinks = sinks
    return model


def server_context(**changes):
    """A stand-in for SGLang's radix-cache factory context describing SmolLM2 on torch_native;
    `changes` maps dotted attribute paths to other values."""
    context = SimpleNamespace(
        is_hybrid_swa=False, is_hybrid_ssm=False, is_dsa=False,
        model_config=SimpleNamespace(attention_arch="AttentionArch.MHA", context_len=8192,
                                     hf_config=SimpleNamespace(sliding_window=None),
                                     get_total_num_kv_heads=lambda: 3),
        tp_worker=SimpleNamespace(model_runner=SimpleNamespace(
            attn_backend=SimpleNamespace(compressed_prefix_path=object()), model=model_with_attention())),
    )
    kv_pool = SimpleNamespace(k_buffer=[], is_quantized_kv_cache=False, dtype=torch.float32, store_dtype=torch.float32)
    context.params = SimpleNamespace(token_to_kv_pool_allocator=SimpleNamespace(get_kvcache=lambda: kv_pool),
                                     page_size=1)
    context.kv_pool = kv_pool
    for path, value in changes.items():
        *parents, name = path.split(".")
        target = context
        for parent in parents:
            target = getattr(target, parent)
        setattr(target, name, value)
    return context


LAVA = KvPolicyConfig(policy="lava")


def test_a_supported_model_passes():
    _check_model(server_context(), LAVA)


@pytest.mark.parametrize("changes, reason", [
    ({"is_hybrid_swa": True}, "hybrid models"),
    ({"is_hybrid_ssm": True}, "hybrid models"),
    ({"is_dsa": True}, "hybrid models"),
    ({"model_config.attention_arch": "AttentionArch.MLA"}, "MLA attention"),
    ({"model_config.is_generation": False}, "models that do not generate"),
    ({"model_config.hf_config.sliding_window": 4096}, "sliding-window attention"),
    # Gemma 3's multimodal config keeps the window in text_config; its layers apply it.
    ({"tp_worker.model_runner.model": model_with_attention(sliding_window_size=1024)}, "sliding-window attention"),
    ({"model_config.context_len": 8}, "--kv-window 8 must be below the model's context length 8"),
    ({"model_config.context_len": 256}, "--kv-min-prefix 256 must be below the model's context length 256"),
    ({"kv_pool.is_quantized_kv_cache": True}, "not a plain per-layer K/V pool"),
    ({"kv_pool.k_buffer": None}, "not a plain per-layer K/V pool"),
    # SGLang's own fp8 pool under --kv-cache-dtype auto: bytes, not called quantized.
    ({"kv_pool.dtype": torch.float8_e4m3fn, "kv_pool.store_dtype": torch.uint8},
     "of torch.float8_e4m3fn is not a plain per-layer K/V pool"),
    ({"kv_pool.store_dtype": torch.uint8}, "not a plain per-layer K/V pool"),
    ({"tp_worker.model_runner.attn_backend": SimpleNamespace()}, "attention backend SimpleNamespace"),
    ({"params.page_size": 64}, "a KV page of 64 tokens: the plugin supports page size 1"),
    ({"tp_worker.model_runner.model": model_with_attention(logit_cap=30.0)}, "logit soft-capping"),
    ({"tp_worker.model_runner.model": model_with_attention(sinks=torch.nn.Parameter(torch.zeros(9)))},
     "learned attention sinks"),
    ({"tp_worker.model_runner.model": model_with_attention(is_cross_attention=True)}, "cross-attention"),
    ({"tp_worker.model_runner.model": model_with_attention(v_head_dim=32)}, "key and value head sizes"),
    ({"tp_worker.model_runner.model": model_with_attention(attn_type="encoder_only")}, "non-causal attention"),
    ({"tp_worker.model_runner.model": model_with_attention(attn_type="decoder_bidirectional")},
     "non-causal attention"),
    ({"tp_worker.model_runner.model": model_with_attention(scaling=0.0078125)}, "attention scaling other than"),
])
def test_unsupported_models_are_refused_with_the_reason(changes, reason):
    with pytest.raises(ConfigError, match=reason) as error:
        _check_model(server_context(**changes), LAVA)
    assert str(error.value).startswith("--kv-policy lava: ")


def test_a_policy_that_scores_nothing_serves_any_attention_scaling():
    _check_model(server_context(**{"tp_worker.model_runner.model": model_with_attention(scaling=0.0078125)}),
                 KvPolicyConfig(policy="streamingllm"))


def test_a_declared_but_unused_sliding_window_is_accepted():
    # Qwen2-style configs carry a sliding_window size with use_sliding_window = False.
    _check_model(server_context(**{"model_config.hf_config": SimpleNamespace(sliding_window=4096,
                                                                              use_sliding_window=False)}), LAVA)


def test_under_tensor_parallel_the_ranks_must_split_the_kv_heads():
    # Fewer KV heads than ranks: SGLang gives ranks copies of shared heads, not a share.
    _check_model(server_context(), LAVA, SimpleNamespace(world_size=3))
    with pytest.raises(ConfigError, match="--tp-size 2 must divide the model's 3 KV heads"):
        _check_model(server_context(), LAVA, SimpleNamespace(world_size=2))


def test_under_tensor_parallel_a_policy_gathered_scores_cannot_plan_is_refused():
    # LAVa's entropy layer budgets with sinks: the sinks' scores are forced after the entropy is taken.
    tensor_parallel = SimpleNamespace(world_size=3)
    _check_model(server_context(), KvPolicyConfig(policy="lava:layer_budget=entropy"), tensor_parallel)
    with pytest.raises(ConfigError, match=r"--tp-size 3: lava: entropy layer budgets with sink_tokens > 0 cannot"):
        _check_model(server_context(), KvPolicyConfig(policy="lava:layer_budget=entropy,sink_tokens=4"),
                     tensor_parallel)
    _check_model(server_context(), KvPolicyConfig(policy="lava:layer_budget=entropy,sink_tokens=4"))
    with pytest.raises(ConfigError, match=r"must divide the model's 3 KV heads; --tp-size 2: lava: entropy"):
        _check_model(server_context(), KvPolicyConfig(policy="lava:layer_budget=entropy,sink_tokens=4"),
                     SimpleNamespace(world_size=2))  # both reasons at once


@pytest.mark.parametrize("backend, given, expected", [
    ("gloo", {}, False),  # the CPU engine's groups: no PyNccl
    ("gloo", {"use_pynccl": True}, True),  # the caller's choice stands
    ("nccl", {}, None),  # a GPU group: SGLang decides
])
def test_a_cpu_parallel_group_gets_no_pynccl_communicator(backend, given, expected):
    from lava_sglang.sglang_plugin.plugin import _around_init_model_parallel_group

    def original(group_ranks, local_rank, backend, use_pynccl=None, **kwargs):
        return use_pynccl

    assert _around_init_model_parallel_group(original, [[0, 1, 2]], 0, backend, **given) is expected


def test_another_sglang_version_is_warned_about(monkeypatch, caplog):
    from lava_sglang.sglang_plugin import plugin, touchpoints

    with caplog.at_level(logging.WARNING, logger="lava_sglang.sglang_plugin.plugin"):
        plugin._warn_on_another_sglang()
        assert not caplog.text  # the pinned version is installed
        monkeypatch.setattr(touchpoints, "installed_sglang_version", lambda: "0.6.0")
        plugin._warn_on_another_sglang()
    assert "written against SGLang 0.5.23, found 0.6.0" in caplog.text
