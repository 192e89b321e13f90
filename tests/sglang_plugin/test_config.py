"""--kv-* flags: every bad value is refused with a message naming the flag, before anything loads."""

from __future__ import annotations

import argparse
import dataclasses
import subprocess
import sys

import pytest

from lava_sglang.sglang_plugin.config import (
    KV_POLICIES,
    FLAGS,
    ConfigError,
    KvPolicyConfig,
    add_arguments,
    check_server_args,
    from_namespace,
    server_arg_overrides,
)


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(argv)


def test_defaults_are_stock_sglang():
    config = from_namespace(parse())
    assert config == KvPolicyConfig() and not config.enabled


def test_budget_is_a_ratio_or_tokens():
    assert from_namespace(parse("--kv-policy", "lava", "--kv-budget", "0.25")).budget == 0.25
    tokens = from_namespace(parse("--kv-policy", "lava", "--kv-budget", "512")).budget
    assert tokens == 512 and isinstance(tokens, int)


def test_a_prefix_is_compressed_only_where_the_plan_would_keep_fewer_tokens_than_it_has():
    config = KvPolicyConfig(policy="lava", budget=0.2, window=32, min_prefix=33)
    # A 33-token commit compresses its first 32 tokens: all within the window, all kept (a second copy).
    assert not config.evicts(32) and config.evicts(33)
    assert not dataclasses.replace(config, budget=64).evicts(64) and dataclasses.replace(config, budget=64).evicts(65)
    assert not dataclasses.replace(config, budget=1.0).evicts(1000)


def test_config_survives_the_trip_to_the_children():
    config = from_namespace(parse("--kv-policy", "snapkv", "--kv-budget", "300", "--kv-window", "16",
                                  "--kv-compress-on", "shared,fork"))
    assert config.compress_on == ("shared", "fork")
    assert KvPolicyConfig.from_env({"LAVA_SGLANG_KV_POLICY": config.to_env()}) == config


@pytest.mark.parametrize("flag, value", [
    ("--kv-policy", "lavaa"), ("--kv-policy", "full"),
    ("--kv-budget", "0"), ("--kv-budget", "-0.5"), ("--kv-budget", "nan"), ("--kv-budget", "1.5"),
    ("--kv-budget", "-3"), ("--kv-budget", "inf"), ("--kv-budget", "a lot"),
    ("--kv-window", "0"), ("--kv-window", "2.5"),
    ("--kv-min-prefix", "8"),  # not above the window (8 under --kv-observe reconstruct)
    ("--kv-pool-kernel", "4"),
    ("--kv-compress-on", "forks"), ("--kv-compress-on", ""), ("--kv-compress-on", "fork,,shared"),
    ("--kv-observe", "branch"), ("--kv-observe", "repeat"),
    ("--kv-observe-wait", "0"), ("--kv-observe-wait", "-1"), ("--kv-observe-wait", "nan"),
    ("--kv-observe-wait", "inf"), ("--kv-observe-wait", "soon"),
    ("--kv-observe-chunk", "0"), ("--kv-observe-chunk", "1.5"),
    ("--kv-observe-normalize", "softmax"), ("--kv-observe-prompt", "chatml"), ("--kv-observe-view", "document"),
    # Python's int() and float() take these; as a flag they are more likely typos (lava_sglang.numbers).
    ("--kv-window", "3_2"), ("--kv-budget", "\uff11\uff12"), ("--kv-budget", "0.2_5"), ("--kv-min-prefix", " 300 "),
    ("--kv-observe-chunk", "5_12"), ("--kv-observe-wait", "\uff13\uff10"),
])
def test_bad_values_name_the_flag(flag, value):
    with pytest.raises(ConfigError, match=flag):
        from_namespace(parse("--kv-policy", "lava", flag, value))


@pytest.mark.parametrize("value", ["1.5", "-0.1", "nan", "inf", "high"])
def test_kv_alpha_outside_0_1_is_refused_where_the_policy_reads_it(value):
    with pytest.raises(ConfigError, match=rf"--kv-alpha must be a float in \[0, 1\], got '{value}'"):
        from_namespace(parse("--kv-policy", "lava:layer_budget=entropy", "--kv-alpha", value))


def test_a_window_in_the_policy_spec_must_be_the_flags():
    # The window capture, the radix cache and the repetition read --kv-window: a policy with
    # another window would plan from a window of another size.
    with pytest.raises(ConfigError, match="its window 16 differs from --kv-window 8"):
        from_namespace(parse("--kv-policy", "lava:window=16"))
    assert from_namespace(parse("--kv-policy", "lava:window=16", "--kv-window", "16")).window == 16


@pytest.mark.parametrize("policy, option, flag, value", [
    ("lava", "pool_kernel=7", "--kv-pool-kernel", "3"),
    ("lava:layer_budget=entropy", "alpha=0.5", "--kv-alpha", "0.3"),
    ("lava:layer_budget=entropy", "alpha=0.5", "--kv-alpha", "0.2"),  # the default, given
    ("ada_snapkv", "alpha=0.5", "--kv-alpha", "0.3"),
])
def test_a_policy_option_and_its_flag_given_two_values_are_refused(policy, option, flag, value):
    # The spec's option would win while /server_info reported the flag's value.
    spec = f"{policy}{',' if ':' in policy else ':'}{option}"
    with pytest.raises(ConfigError, match=f"differs from {flag}"):
        from_namespace(parse("--kv-policy", spec, flag, value))
    name, spec_value = option.split("=")
    for args in ((), (flag, spec_value)):  # one place, or both agreeing: the config reports what is in effect
        config = from_namespace(parse("--kv-policy", spec, *args))
        assert getattr(config.make_policy(), name) == getattr(config, name) == float(spec_value)
    config = from_namespace(parse("--kv-policy", policy, flag, value))
    assert getattr(config.make_policy(), name) == getattr(config, name) == float(value)


@pytest.mark.parametrize("policy", ["lava", "kvzip", "snapkv", "pyramidkv", "streamingllm",
                                    "lava:layer_budget=entropy,head_budget=uniform"])
def test_kv_alpha_is_refused_for_a_policy_that_does_not_read_it(policy):
    # The default lava allocation (one threshold) and the other policies read no alpha:
    # --kv-alpha would change nothing while /server_info reported it.
    with pytest.raises(ConfigError, match=f"--kv-alpha 0.5: --kv-policy {policy} does not read alpha") as refused:
        from_namespace(parse("--kv-policy", policy, "--kv-alpha", "0.5"))
    assert "layer_budget=entropy or uniform with head_budget=topk" in str(refused.value)  # what does read it
    assert from_namespace(parse("--kv-policy", policy)).alpha == 0.2
    for reads in ("ada_snapkv", "lava:layer_budget=entropy"):
        assert from_namespace(parse("--kv-policy", reads, "--kv-alpha", "0.5")).make_policy().alpha == 0.5


def test_kv_pool_kernel_is_refused_for_a_policy_that_scores_nothing():
    # streamingllm keeps sinks and the recent tokens: a pooling width would change nothing
    # while /server_info reported it.
    with pytest.raises(ConfigError, match="--kv-pool-kernel 3: --kv-policy streamingllm scores no tokens"):
        from_namespace(parse("--kv-policy", "streamingllm", "--kv-pool-kernel", "3"))
    assert from_namespace(parse("--kv-policy", "streamingllm")).pool_kernel is None
    assert from_namespace(parse("--kv-policy", "snapkv", "--kv-pool-kernel", "3")).make_policy().pool_kernel == 3


@pytest.mark.parametrize("args, window", [
    ((), 8),  # the repetition scores every token: the window is only kept
    (("--kv-observe", "tail"), 32), (("--kv-observe", "branches"), 32),  # its queries score the prefix
    (("--kv-compress-on", "fork,shared"), 32),  # a shared prefix is scored by its tail
    (("--kv-observe", "tail", "--kv-window", "8"), 8), (("--kv-window", "32"), 32),
])
def test_the_window_defaults_to_what_the_source_needs(args, window):
    config = from_namespace(parse("--kv-policy", "lava", *args))
    assert config.window == window == config.make_policy().window


@pytest.mark.parametrize("source", ["branches", "reconstruct"])
def test_observation_sources(source):
    config = from_namespace(parse("--kv-policy", "lava", "--kv-observe", source, "--kv-observe-wait", "2.5"))
    assert (config.observe, config.observe_wait) == (source, 2.5)


@pytest.mark.parametrize("flag, value, source", [("--kv-observe-wait", "2.5", "tail"),
                                                 ("--kv-observe-chunk", "256", "tail"),
                                                 ("--kv-observe-view", "chunk", "branches"),
                                                 ("--kv-observe-normalize", "local", "branches"),
                                                 ("--kv-observe-prompt", "plain", "tail")])
def test_an_observe_flag_the_source_does_not_read_is_refused(flag, value, source):
    # It would do nothing, silently (as --kv-alpha where the policy does not read it).
    with pytest.raises(ConfigError, match=f"{flag} {value}: --kv-observe {source} does not read it"):
        from_namespace(parse("--kv-policy", "lava", "--kv-observe", source, flag, value))
    with pytest.raises(ConfigError, match=f"--kv-observe {source}: no --kv-policy given"):
        from_namespace(parse("--kv-policy", "none", "--kv-observe", source, flag, value))


@pytest.mark.parametrize("flags", [("--kv-budget", "0.1"), ("--kv-window", "16"), ("--kv-min-prefix", "512"),
                                   ("--kv-alpha", "0.3"), ("--kv-pool-kernel", "3"), ("--kv-compress-on", "shared"),
                                   ("--kv-observe", "tail"), ("--kv-observe-wait", "30"),
                                   ("--kv-observe-chunk", "256"), ("--kv-observe-prompt", "plain")])
def test_a_kv_flag_without_a_policy_is_refused(flags):
    # The default policy, none, is stock SGLang: `--kv-budget 0.1` alone would compress nothing, silently.
    for policy in ([], ["--kv-policy", "none"]):
        with pytest.raises(ConfigError, match=f"{flags[0]} {flags[1]}: no --kv-policy given"):
            from_namespace(parse(*policy, *flags))
    # A flag at its default changes nothing (the --kv-observe-* flags are None until given: refused above).
    assert not from_namespace(parse("--kv-budget", "0.2", "--kv-observe", "reconstruct")).enabled
    assert not from_namespace(parse("--kv-budget", "0.20", "--kv-min-prefix", "256")).enabled  # numbers by value


@pytest.mark.parametrize("flags", [("--kv-observe-wait", "5.0"), ("--kv-observe-chunk", "64"),
                                   ("--kv-observe-prompt", "plain")])
def test_observe_flags_are_refused_for_a_policy_that_scores_nothing(flags):
    # streamingllm keeps sinks and recent tokens: no repetition runs, no branch is waited for.
    with pytest.raises(ConfigError, match=f"{flags[0]} {flags[1]}: --kv-policy streamingllm scores nothing"):
        from_namespace(parse("--kv-policy", "streamingllm", *flags))
    # --kv-observe itself still picks --kv-window's default (8 under reconstruct, else 32).
    assert from_namespace(parse("--kv-policy", "streamingllm")).window == 8
    assert from_namespace(parse("--kv-policy", "streamingllm", "--kv-observe", "tail")).window == 32


@pytest.mark.parametrize("flag, value", [("--kv-observe-wait", "2.5"), ("--kv-observe-chunk", "256")])
def test_an_observe_flag_is_refused_where_no_fork_prefix_is_compressed(flag, value):
    # --kv-observe scores fork prefixes; a shared prefix is scored by its tail window.
    with pytest.raises(ConfigError, match=f"{flag} {value}: --kv-compress-on shared compresses no fork prefix"):
        from_namespace(parse("--kv-policy", "lava", "--kv-compress-on", "shared", flag, value))
    assert from_namespace(parse("--kv-policy", "lava", "--kv-compress-on", "fork,shared", flag, value))


def test_a_source_is_refused_where_no_fork_prefix_is_compressed():
    with pytest.raises(ConfigError, match="--kv-observe branches: --kv-compress-on shared compresses no fork prefix"):
        from_namespace(parse("--kv-policy", "lava", "--kv-compress-on", "shared", "--kv-observe", "branches"))
    assert from_namespace(parse("--kv-policy", "lava", "--kv-compress-on", "fork,shared", "--kv-observe", "branches"))


@pytest.mark.parametrize("flag, value", [("--kv-observe-wait", "30"), ("--kv-observe-chunk", "512"),
                                         ("--kv-observe-prompt", "chat")])
def test_an_observe_flag_the_source_does_not_read_is_refused_at_its_default_too(flag, value):
    # Given is given: the flags are None until set, so the default value is told apart from no value.
    assert (value, None) == (FLAGS["kv_" + flag.removeprefix("--kv-").replace("-", "_")][1],
                             getattr(parse(), flag.removeprefix("--").replace("-", "_")))
    with pytest.raises(ConfigError, match=f"{flag} .*: --kv-observe tail does not read it"):
        from_namespace(parse("--kv-policy", "lava", "--kv-observe", "tail", flag, value))


def test_observe_flags_as_sglang_with_the_patch_types_them():
    # patches/sglang-0.5.23-kv-policy.patch declares the flags with types and None until given:
    # --kv-observe-wait 2.5 is 2.5, not "2.5".
    typed = parse("--kv-policy", "lava", "--kv-observe", "tail")
    assert from_namespace(typed).observe_wait == KvPolicyConfig.observe_wait
    typed.kv_observe_wait = 30.0
    with pytest.raises(ConfigError, match="--kv-observe-wait 30.0: --kv-observe tail does not read it"):
        from_namespace(typed)
    typed.kv_observe, typed.kv_observe_chunk = "reconstruct", 256
    assert (from_namespace(typed).observe_wait, from_namespace(typed).observe_chunk) == (30.0, 256)


def test_the_default_source_is_the_repetition_and_shared_prefixes_need_no_fork():
    assert from_namespace(parse("--kv-policy", "lava")).observe == "reconstruct"
    # Shared prefixes are scored by their recomputed window whatever --kv-observe says.
    assert from_namespace(parse("--kv-policy", "lava", "--kv-compress-on", "shared")).compress_on == ("shared",)


def test_policy_options_and_repetition_flags():
    config = from_namespace(parse("--kv-policy", "lava:layer_budget=entropy,value_norm=false", "--kv-observe",
                                  "reconstruct", "--kv-observe-chunk", "512", "--kv-observe-normalize", "local",
                                  "--kv-observe-view", "chunk"))
    policy = config.make_policy()
    assert (policy.layer_budget, policy.value_norm, policy.pool_kernel) == ("entropy", False, 1)
    assert (config.repetition().chunk_tokens, config.repetition().normalize) == (512, "local")
    assert config.repetition().view == "chunk"
    assert config.repetition().chat_turn  # the default prompt: the chunk is the assistant's reply
    plain = from_namespace(parse("--kv-policy", "lava", "--kv-observe-prompt", "plain"))
    assert (plain.observe_prompt, plain.repetition().chat_turn) == ("plain", False)
    assert from_namespace(parse("--kv-policy", "kvzip", "--kv-observe", "reconstruct")).make_policy().pool_kernel == 1
    with pytest.raises(ConfigError, match="--kv-policy lava:budget=3: policy 'lava:budget=3': options must be"):
        from_namespace(parse("--kv-policy", "lava:budget=3"))


def test_kvzip_scores_by_a_repetition_only():
    with pytest.raises(ConfigError, match=r"--kv-policy kvzip: kvzip scores by reconstruct, not tail \(--kv-observe\)"):
        from_namespace(parse("--kv-policy", "kvzip", "--kv-observe", "tail"))
    # A shared prefix is scored by its tail window whatever --kv-observe says.
    with pytest.raises(ConfigError, match=r"kvzip scores by reconstruct, not tail \(--kv-compress-on shared"):
        from_namespace(parse("--kv-policy", "kvzip", "--kv-compress-on", "fork,shared"))
    assert from_namespace(parse("--kv-policy", "kvzip")).compress_on == ("fork",)
    assert from_namespace(parse("--kv-policy", "lava", "--kv-compress-on", "shared")).compress_on == ("shared",)


def test_unknown_policy_lists_the_allowed_ones():
    with pytest.raises(ConfigError) as error:
        from_namespace(parse("--kv-policy", "h2o"))
    assert all(name in str(error.value) for name in KV_POLICIES)


@pytest.mark.parametrize("option, value, reason", [
    ("disable_radix_cache", True, "--disable-radix-cache"),
    ("attention_backend", "triton", "--attention-backend triton: supported with a policy on cpu: torch_native"),
    ("page_size", 16, "--page-size"),
    ("radix_cache_backend", "flexkv", "--radix-cache-backend"),
    ("pp_size", 2, "--pp-size"),
    ("ep_size", 2, "--ep-size"),
    ("attn_dp_size", 2, "--attn-dp-size/--dwdp-size > 1"),
    ("dwdp_size", 2, "--attn-dp-size/--dwdp-size > 1"),
    ("enable_dp_attention", True, "--attn-dp-size/--dwdp-size > 1"),
    ("attn_cp_size", 2, "--attn-cp-size/--dcp-size"),
    ("dcp_size", 2, "--attn-cp-size/--dcp-size"),
    ("nnodes", 2, "--nnodes"),
    ("disaggregation_mode", "prefill", "--disaggregation-mode prefill"),
    ("enable_pdmux", True, "--enable-pdmux"),
    ("kv_cache_dtype", "fp8_e5m2", "--kv-cache-dtype fp8_e5m2"),
    ("kv_cache_dtype", "nvfp4", "--kv-cache-dtype nvfp4"),
    ("prefill_attention_backend", "triton", "--prefill-attention-backend triton and --decode-attention-backend "
                                            "torch_native .*: one backend for both phases, from torch_native"),
    ("decode_attention_backend", "triton", "--decode-attention-backend triton"),
    ("enable_two_batch_overlap", True, "--enable-two-batch-overlap"),
    ("is_embedding", True, "--is-embedding: an embedding request has the shape of a fork commit"),
    ("enable_streaming_session", True, "SGLang serves them on its own radix cache only"),
    ("enable_session_radix_cache", True, "SGLang serves them on its own radix cache only"),
    ("radix_eviction_policy", "tlru", "SGLang serves them on its own radix cache only"),
    ("enable_lmcache", True, "--enable-lmcache, --enable-flexkv"),
    ("enable_flexkv", True, "--enable-lmcache, --enable-flexkv"),
    ("kv_events_config", '{"publisher": "zmq"}', "--kv-events-config: the events would report"),
])
def test_combinations_that_cannot_work_are_refused(option, value, reason):
    config = from_namespace(parse("--kv-policy", "lava"))
    with pytest.raises(ConfigError, match=reason):
        check_server_args(config, argparse.Namespace(**{option: value}), "cpu")
    check_server_args(KvPolicyConfig(), argparse.Namespace(**{option: value}), "cpu")  # policy none: stock


def test_a_policy_sharded_heads_cannot_plan_is_refused_before_the_model_loads():
    # LAVa's entropy layer budgets with sinks: the gathered scores no longer give the entropy.
    config = from_namespace(parse("--kv-policy", "lava:layer_budget=entropy,sink_tokens=4"))
    with pytest.raises(ConfigError, match="cannot run with --tp-size 2: lava: entropy layer budgets with "
                                          "sink_tokens > 0 cannot be planned over sharded heads"):
        check_server_args(config, argparse.Namespace(tp_size=2), "cpu")
    check_server_args(config, argparse.Namespace(tp_size=1), "cpu")
    check_server_args(from_namespace(parse("--kv-policy", "lava:layer_budget=entropy")), argparse.Namespace(tp_size=2),
                      "cpu")


def test_the_repetition_without_a_tokenizer_is_refused_where_it_would_score():
    # Every fork prefix would fall back to its tail, with one warning per prefix in the log.
    no_tokenizer = argparse.Namespace(skip_tokenizer_init=True)
    with pytest.raises(ConfigError, match="--skip-tokenizer-init and --kv-observe reconstruct"):
        check_server_args(from_namespace(parse("--kv-policy", "lava")), no_tokenizer, "cpu")
    for flags in (("--kv-policy", "lava", "--kv-observe", "tail"), ("--kv-policy", "streamingllm"),
                  ("--kv-policy", "lava", "--kv-compress-on", "shared")):
        check_server_args(from_namespace(parse(*flags)), no_tokenizer, "cpu")


def test_phase_attention_backends_equal_to_the_one_in_effect_are_served():
    config = from_namespace(parse("--kv-policy", "lava"))
    for args in ({"prefill_attention_backend": "torch_native"}, {"decode_attention_backend": "torch_native"},
                 {"radix_eviction_policy": "lru"}):
        check_server_args(config, argparse.Namespace(**args), "cpu")
    check_server_args(config, argparse.Namespace(attention_backend="flashinfer", decode_attention_backend="flashinfer"),
                      "cuda")
    check_server_args(config, argparse.Namespace(prefill_attention_backend="triton"), "cuda")  # triton: chosen
    # Both phases on one backend, whatever --attention-backend says: SGLang builds that one, wrapped.
    check_server_args(config, argparse.Namespace(prefill_attention_backend="flashinfer",
                                                 decode_attention_backend="flashinfer"), "cuda")
    with pytest.raises(ConfigError, match="--prefill-attention-backend triton and --decode-attention-backend "
                                          "flashinfer"):
        check_server_args(config, argparse.Namespace(attention_backend="flashinfer",
                                                     prefill_attention_backend="triton"), "cuda")
    with pytest.raises(ConfigError, match="one backend for both phases, from triton, flashinfer, torch_native"):
        check_server_args(config, argparse.Namespace(prefill_attention_backend="fa3",
                                                     decode_attention_backend="fa3"), "cuda")


def test_the_plugins_radix_cache_without_a_policy_is_refused_at_launch():
    # Refused by the launcher, before the model loads (create_radix_cache would refuse it too,
    # in the scheduler process, after loading).
    with pytest.raises(ConfigError, match="--radix-cache-backend lava is chosen by --kv-policy"):
        check_server_args(KvPolicyConfig(), argparse.Namespace(radix_cache_backend="lava"), "cpu")


@pytest.mark.parametrize("option, value, reason", [
    ("attention_backend", "fa3", "--attention-backend fa3: supported with a policy on cuda: "
                                 "triton, flashinfer, torch_native"),
    ("cuda_graph_backend_decode", "full", "--cuda-graph-backend-decode full: CUDA graphs replay"),
    ("cuda_graph_backend_prefill", "breakable", "--cuda-graph-backend-prefill breakable"),
    ("cuda_graph_config", '{"decode": {"backend": "full"}}', "--cuda-graph-config: its phase backends override"),
    ("enable_torch_compile", True, "--enable-torch-compile"),
    ("enable_deterministic_inference", True, "--enable-deterministic-inference"),
])
def test_gpu_combinations_that_cannot_work_are_refused(option, value, reason):
    config = from_namespace(parse("--kv-policy", "lava"))
    with pytest.raises(ConfigError, match=reason):
        check_server_args(config, argparse.Namespace(**{option: value}), "cuda")
    check_server_args(KvPolicyConfig(), argparse.Namespace(**{option: value}), "cuda")  # policy none: stock


def test_the_repetition_view_of_the_chunk_alone_runs_on_the_cpu_engine_only_and_needs_the_sinks_in_a_chunk():
    config = from_namespace(parse("--kv-policy", "lava", "--kv-observe-view", "chunk"))
    check_server_args(config, argparse.Namespace(), "cpu")
    with pytest.raises(ConfigError, match="--kv-observe-view chunk: .*the CPU engine only"):
        check_server_args(config, argparse.Namespace(), "cuda")
    check_server_args(from_namespace(parse("--kv-policy", "lava")), argparse.Namespace(), "cuda")
    with pytest.raises(ConfigError, match="--kv-observe-chunk 2: view 'chunk' needs chunk_tokens >= sink_tokens"):
        from_namespace(parse("--kv-policy", "lava", "--kv-observe-view", "chunk", "--kv-observe-chunk", "2"))
    assert from_namespace(parse("--kv-policy", "lava", "--kv-observe-chunk", "2")).observe_chunk == 2


def test_each_device_serves_its_own_backends_and_graphs_off():
    config = from_namespace(parse("--kv-policy", "lava"))
    for backend in ("triton", "flashinfer", "torch_native", None):
        check_server_args(config, argparse.Namespace(attention_backend=backend, cuda_graph_backend_decode="disabled",
                                                     cuda_graph_backend_prefill=None), "cuda:0")
    check_server_args(config, argparse.Namespace(attention_backend="torch_native"), "cpu")
    # Graph flags mean nothing on the CPU engine: not refused there.
    check_server_args(config, argparse.Namespace(cuda_graph_backend_decode="full"), "cpu")
    for device in ("npu", "xpu:0", "mps"):  # SGLang runs on them; the plugin was made for none of them
        with pytest.raises(ConfigError, match=f"device {device} .*: the plugin serves on cpu and cuda only"):
            check_server_args(config, argparse.Namespace(), device)


def test_a_plain_kv_cache_dtype_is_served():
    config = from_namespace(parse("--kv-policy", "lava"))
    for dtype in ("auto", "bf16", None):
        check_server_args(config, argparse.Namespace(kv_cache_dtype=dtype), "cpu")


def test_data_parallel_is_served():
    check_server_args(from_namespace(parse("--kv-policy", "lava")), argparse.Namespace(dp_size=2), "cpu")


def test_overlap_scheduling_and_cuda_graphs_are_turned_off_on_an_accelerator_only():
    stock = argparse.Namespace(attention_backend=None, disable_overlap_schedule=False)
    assert server_arg_overrides(stock, "cuda") == {
        "radix_cache_backend": "lava", "attention_backend": "triton", "disable_overlap_schedule": True,
        "cuda_graph_backend_decode": "disabled", "cuda_graph_backend_prefill": "disabled"}
    assert server_arg_overrides(stock, "cuda:1")["disable_overlap_schedule"] is True
    assert server_arg_overrides(stock, "cpu") == {"radix_cache_backend": "lava", "attention_backend": "torch_native"}
    chosen = argparse.Namespace(attention_backend="torch_native", disable_overlap_schedule=True,
                                cuda_graph_backend_decode="disabled", cuda_graph_backend_prefill="disabled")
    assert server_arg_overrides(chosen, "cuda") == {"radix_cache_backend": "lava"}


@pytest.mark.parametrize("argv, flag", [
    (["--kv-policy", "lava", "--kv-budget", "0"], "--kv-budget"),
    (["--kv-policy", "lava", "--disable-radix-cache"], "--disable-radix-cache"),
    (["--kv-policy", "lava", "--kv-cache-dtype", "fp8_e4m3"], "--kv-cache-dtype"),
    (["--kv-policy", "lava", "--pp-size", "2"], "--pp-size"),
])
def test_the_launcher_stops_with_one_line_before_loading_the_model(argv, flag, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "sglang.launch_server", "--model-path", str(tmp_path / "no-model"), *argv],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode != 0
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith("error: ") and flag in last_line
    assert "Traceback" not in result.stderr  # stopped by validation, not by the missing model


def test_requests_reaching_the_model_are_validated_and_a_session_may_send_no_new_tokens(monkeypatch):
    from types import SimpleNamespace

    from lava_sglang.sglang_plugin.config import ENV_VAR
    from lava_sglang.sglang_plugin.plugin import _before_validate_request

    tokenizer_manager = SimpleNamespace(model_config=SimpleNamespace(vocab_size=10))
    plain, in_session = SimpleNamespace(session_params=None), SimpleNamespace(session_params={"id": "s1"})
    monkeypatch.delenv(ENV_VAR, raising=False)  # --kv-policy none: stock SGLang, which lets both through
    _before_validate_request(tokenizer_manager, plain, [])
    _before_validate_request(tokenizer_manager, plain, [3, 10])
    monkeypatch.setenv(ENV_VAR, KvPolicyConfig(policy="lava").to_env())
    # An image request's placeholder ids lie beyond the text vocabulary (mllama's <|image|> is vocab_size)
    # where the model has a multimodal processor; a text-only model ignores the image, and checks the ids.
    image = SimpleNamespace(session_params=None, contains_mm_input=lambda: True)
    multimodal_manager = SimpleNamespace(model_config=tokenizer_manager.model_config, mm_processor=object())
    _before_validate_request(multimodal_manager, image, [3, 10])
    text_only_manager = SimpleNamespace(model_config=tokenizer_manager.model_config, mm_processor=None)
    with pytest.raises(ValueError, match="token id 10 outside the vocabulary"):
        _before_validate_request(text_only_manager, image, [3, 10])
    with pytest.raises(ValueError, match="the prompt is empty"):
        _before_validate_request(tokenizer_manager, plain, [])
    with pytest.raises(ValueError, match="token id 10 outside the vocabulary"):
        _before_validate_request(tokenizer_manager, in_session, [3, 10])
    _before_validate_request(tokenizer_manager, in_session, [])  # the session's history is the prompt
    _before_validate_request(tokenizer_manager, plain, [0, 9])
