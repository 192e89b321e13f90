"""The plugin's wiring into SGLang: flags, radix cache backend, attention, server info."""

from __future__ import annotations

import logging
import math
import os

import torch

from lava_sglang.policy import HeadShard, spec_of
from lava_sglang.sglang_plugin import attention, touchpoints
from lava_sglang.sglang_plugin.config import (
    ENV_VAR,
    RECONSTRUCT,
    SUPPORTED_ATTENTION_BACKENDS,
    ConfigError,
    KvPolicyConfig,
    add_arguments,
    check_server_args,
    from_namespace,
    server_arg_overrides,
)

logger = logging.getLogger(__name__)

_registered = False
# The pool dtypes whose K and V rows the compressor and the compressed-prefix path read as numbers.
PLAIN_KV_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def register() -> None:
    global _registered
    if _registered:
        return
    _registered = True
    _warn_on_another_sglang()
    touchpoints.register_radix_cache_backend(touchpoints.RADIX_CACHE_BACKEND, create_radix_cache)
    hooks, hook_type = touchpoints.hook_registry()
    hooks.register(touchpoints.ADD_CLI_ARGS, _after_add_cli_args, hook_type.AFTER)
    hooks.register(touchpoints.FROM_CLI_ARGS, _around_from_cli_args, hook_type.AROUND)
    hooks.register(touchpoints.INTERNAL_STATE, _after_internal_state, hook_type.AFTER)
    hooks.register(touchpoints.VALIDATE_REQUEST, _before_validate_request, hook_type.BEFORE)
    hooks.register(touchpoints.PARALLEL_GROUP, _around_init_model_parallel_group, hook_type.AROUND)
    if KvPolicyConfig.from_env().enabled:  # in the processes the launcher spawns
        hooks.register(touchpoints.SCHEDULER_IDLE, _before_scheduler_idle, hook_type.BEFORE)
        backends = touchpoints.attention_backends()
        for name in SUPPORTED_ATTENTION_BACKENDS:
            backends[name] = attention.wrap_factory(backends[name])


def _warn_on_another_sglang() -> None:
    installed = touchpoints.installed_sglang_version()
    if installed != touchpoints.SGLANG_VERSION:
        logger.warning("lava: written against SGLang %s, found %s; the touch points in "
                       "lava_sglang/sglang_plugin/touchpoints.py may have moved", touchpoints.SGLANG_VERSION, installed)


def _after_add_cli_args(result, parser):
    add_arguments(parser)
    return result


def _around_from_cli_args(original, cls, args):
    """Validate the --kv-* flags before anything loads; hand the config to the children."""
    if hasattr(args, "kv_policy"):
        try:
            config = from_namespace(args)
            device = _device(args)
            check_server_args(config, args, device)
        except ConfigError as error:
            raise SystemExit(f"error: {error}") from None
        if config.enabled:
            overrides = server_arg_overrides(args, device) if device is not None else {}
            for name, value in overrides.items():
                setattr(args, name, value)
                logger.info("lava: --kv-policy %s sets %s=%s", config.policy, name, value)
            os.environ[ENV_VAR] = config.to_env()
        else:
            os.environ.pop(ENV_VAR, None)
    return original(cls, args)


def check_launch_args(server_args: list[str]) -> KvPolicyConfig:
    """The config a `python -m sglang.launch_server` given `server_args` (with or without
    --model-path) would run, with every refusal it makes before loading anything: the --kv-*
    flags and the SGLang options a policy cannot serve with (`check_server_args`) on the device
    SGLang would pick. For the commands that start servers, before they start one; raises
    ConfigError."""
    parser = touchpoints.server_arg_parser()
    if not any(action.dest == "kv_policy" for action in parser._actions):
        add_arguments(parser)

    def refuse(message: str):  # argparse's own error prints the whole usage and exits
        raise ConfigError(f"SGLang's launcher would refuse them: {message}")

    parser.error = refuse
    model_path = [] if {"--model-path", "--model"} & {arg.partition("=")[0] for arg in server_args} else [
        "--model-path", "unused"]
    args = parser.parse_args(list(server_args) + model_path)
    config = from_namespace(args)
    check_server_args(config, args, _device(args))
    return config


def _device(args) -> str | None:
    """The device SGLang will run on; None where it finds none (it then stops with its own error)."""
    if args.device:
        return args.device
    try:
        return touchpoints.default_device()
    except RuntimeError:
        return None


def _before_validate_request(tokenizer_manager, obj, input_ids, *args, **kwargs):
    """Stock SGLang 0.5.23 lets an empty prompt, or a token id outside the vocabulary, reach
    the model, where it kills the scheduler and every request with it; reject them (HTTP 400)
    on a server with a policy (`--kv-policy none` is stock SGLang). A request of a session may
    be empty here: the session's history supplies its prompt. The ids of a request that SGLang's multimodal
    processor expands are not checked against the vocabulary: its placeholders lie beyond it
    (media sent to a text-only model do not skip the check)."""
    if not KvPolicyConfig.from_env().enabled:
        return
    session_params = getattr(obj, "session_params", None)
    in_session = isinstance(session_params, dict) and bool(session_params.get("id"))
    if input_ids is not None and len(input_ids) == 0 and not in_session:
        raise ValueError("the prompt is empty: a request needs at least one input token")
    if touchpoints.multimodal_processor_runs(tokenizer_manager, obj):
        return
    vocab_size = tokenizer_manager.model_config.vocab_size
    bad = next((token for token in input_ids or () if not 0 <= token < vocab_size), None)
    if bad is not None:
        raise ValueError(f"input_ids contains token id {bad} outside the vocabulary [0, {vocab_size})")


def _around_init_model_parallel_group(original, group_ranks, local_rank, backend, *args, **kwargs):
    """Stock SGLang 0.5.23 asks for a PyNccl communicator on every platform but NPU and XPU,
    and PyNccl fails on a CPU device (`Expected a cuda device, but got: cpu`), so a
    `--tp-size` > 1 server does not start on the CPU engine. A gloo group is a CPU group:
    unless the caller chose, it gets none, and its collectives fall back to
    torch.distributed (`GroupCoordinator.all_reduce`'s CPU branch)."""
    if backend == "gloo" and not args and kwargs.get("use_pynccl") is None:
        kwargs["use_pynccl"] = False
    return original(group_ranks, local_rank, backend, *args, **kwargs)


def _before_scheduler_idle(scheduler, *args, **kwargs):
    """The scheduler has nothing to run (it calls this on the idle turns of its loop)."""
    compress_ready_when_idle = getattr(scheduler.tree_cache, "compress_ready_when_idle", None)
    if compress_ready_when_idle is not None:
        compress_ready_when_idle()


def _after_internal_state(result, controller, *args, **kwargs):
    config = KvPolicyConfig.from_env()
    cache = attention.bound_cache()
    # The compressed store and pool under a policy; the pool alone under --kv-policy none, so
    # benchmarks measure stock SGLang's memory the same way.
    pool = touchpoints.pool_counters(controller)
    counters = {"store": {**cache.stats(), **pool}} if cache is not None else {"pool": pool}
    # The policy with every field as it ran, so a later check (bench serve-reference) plans
    # with these options even after a default changes.
    spec = spec_of(config.make_policy()) if config.enabled else None
    result.internal_state["lava_kv_policy"] = {**config.__dict__, "policy_spec": spec, **counters}
    return result


def create_radix_cache(ctx):
    """`--radix-cache-backend lava`: SGLang calls this in the scheduler process."""
    from lava_sglang.sglang_plugin.metrics import StoreMetrics
    from lava_sglang.sglang_plugin.radix_cache import LavaRadixCache
    from lava_sglang.sglang_plugin.repetition import RepetitionClient
    from lava_sglang.sglang_plugin.tensor_parallel import TensorParallel

    config = KvPolicyConfig.from_env()
    if not config.enabled:
        raise ConfigError("--radix-cache-backend lava is chosen by --kv-policy; pass --kv-policy instead")
    tensor_parallel = TensorParallel.of_this_scheduler()
    _check_model(ctx, config, tensor_parallel)
    kv_pool = ctx.params.token_to_kv_pool_allocator.get_kvcache()
    metrics = StoreMetrics(enabled=bool(ctx.server_args.enable_metrics),
                           labels={"model_name": ctx.server_args.served_model_name},
                           records_events=tensor_parallel is None or tensor_parallel.rank == 0)
    server_args = ctx.server_args
    max_prompt_tokens = touchpoints.max_prompt_tokens(ctx.model_config.context_len,
                                                      ctx.params.token_to_kv_pool_allocator.size)
    repetition_client = (RepetitionClient(server_args.url(), max_prompt_tokens, server_args.api_key,
                                          dp_rank=touchpoints.dp_rank(),
                                          admin_api_key=getattr(server_args, "admin_api_key", None),
                                          verify=touchpoints.ssl_verify(server_args))
                         if config.observe == RECONSTRUCT else None)
    cache = LavaRadixCache(ctx.params, config=config, kv_pool=kv_pool, metrics=metrics,
                           repetition_client=repetition_client, tensor_parallel=tensor_parallel)
    attention.bind(cache)
    logger.info("lava: KV policy %s, options %s", config.policy, config)
    return cache


def _check_model(ctx, config: KvPolicyConfig, tensor_parallel=None) -> None:
    """Refuse models and engine states the plugin cannot serve, at start-up, with the reason.
    tensor_parallel: this scheduler's `TensorParallel`, None without."""
    model_config = ctx.model_config
    sharding_refusals = []
    if tensor_parallel is not None:
        num_kv_heads = model_config.get_total_num_kv_heads()
        if num_kv_heads % tensor_parallel.world_size:
            # SGLang then gives ranks copies of shared KV heads, which a plan over all heads
            # would count as distinct heads.
            sharding_refusals.append(f"--tp-size {tensor_parallel.world_size} must divide the model's "
                                     f"{num_kv_heads} KV heads")
        try:
            HeadShard.check_policy(config.make_policy())
        except ValueError as error:
            sharding_refusals.append(f"--tp-size {tensor_parallel.world_size}: {error}")
    hf_config = model_config.hf_config
    backend = ctx.tp_worker.model_runner.attn_backend
    model = ctx.tp_worker.model_runner.model
    layers = touchpoints.attention_layers(model)
    kv_pool = ctx.params.token_to_kv_pool_allocator.get_kvcache()
    refusals = [
        (ctx.is_hybrid_swa or ctx.is_hybrid_ssm or ctx.is_dsa,
         "hybrid models (sliding-window, state-space or sparse layers) are not supported"),
        ("MLA" in str(getattr(model_config, "attention_arch", "")), "MLA attention is not supported"),
        # Their requests generate nothing, the shape of a fork commit: prompts would be compressed.
        (not getattr(model_config, "is_generation", True),
         "models that do not generate (embedding, reward, classification) are not supported"),
        # A multimodal config (Gemma 3) holds the window in its text config, which SGLang's
        # layers then apply: the compressed-prefix path would attend over the whole prefix.
        ((getattr(hf_config, "sliding_window", None) not in (None, 0)
          and getattr(hf_config, "use_sliding_window", True))
         or any(layer.sliding_window_size not in (None, 0, -1) for layer in layers),
         "sliding-window attention is not supported"),
        # The compressed-prefix path computes plain softmax attention; these change it.
        (any(layer.logit_cap for layer in layers), "attention logit soft-capping is not supported"),
        (touchpoints.has_attention_sinks(model), "learned attention sinks are not supported"),
        (any(layer.is_cross_attention for layer in layers), "cross-attention is not supported"),
        # The store's compaction and the CPU prefix attention read K and V rows of one size.
        (any(layer.qk_head_dim != layer.v_head_dim for layer in layers),
         "key and value head sizes that differ are not supported"),
        (not all(map(touchpoints.is_causal_attention, layers)), "non-causal attention is not supported"),
        # A window's attention mass is scored at 1/sqrt(head_dim) (the tail, the branches, a
        # repetition cut short); another temperature (Granite's multiplier) would score other keys.
        (config.make_policy().needs_scores
         and any(not math.isclose(layer.scaling, layer.qk_head_dim ** -0.5, rel_tol=1e-6) for layer in layers),
         "an attention scaling other than 1/sqrt(head_dim) is not supported by the window scores"),
        (config.window >= model_config.context_len,
         f"--kv-window {config.window} must be below the model's context length {model_config.context_len}"),
        # No prefix the model can hold would be compressed. (A budget that keeps every prefix whole,
        # 1.0, is served: the plugin's path with stock SGLang's answers, documented and tested.)
        (config.min_prefix >= model_config.context_len,
         f"--kv-min-prefix {config.min_prefix} must be below the model's context length {model_config.context_len}"),
        # --kv-cache-dtype auto takes fp8 from a checkpoint that declares it, in a pool that holds
        # bytes (store_dtype uint8) without calling itself quantized.
        (not isinstance(getattr(kv_pool, "k_buffer", None), list) or getattr(kv_pool, "is_quantized_kv_cache", False)
         or getattr(kv_pool, "dtype", None) not in PLAIN_KV_DTYPES
         or getattr(kv_pool, "store_dtype", None) != kv_pool.dtype,
         f"KV pool {type(kv_pool).__name__} of {getattr(kv_pool, 'dtype', None)} is not a plain per-layer K/V pool "
         f"of {', '.join(map(str, PLAIN_KV_DTYPES))}"),
        (not hasattr(backend, "compressed_prefix_path"),
         f"attention backend {type(backend).__name__}: supported: {', '.join(SUPPORTED_ATTENTION_BACKENDS)}"),
        # The launcher refuses --page-size > 1; SGLang may still choose pages of its own (ROCm's
        # aiter layout): a compressed prefix's n - 1 tokens would not fill whole pages.
        (ctx.params.page_size != 1, f"a KV page of {ctx.params.page_size} tokens: the plugin supports page size 1"),
        (bool(sharding_refusals), "; ".join(sharding_refusals)),  # both, so that one fix does not reveal the other
    ]
    for refused, reason in refusals:
        if refused:
            raise ConfigError(f"--kv-policy {config.policy}: {reason}")
