"""Every place the plugin touches SGLang 0.5.23, named once.

An SGLang upgrade starts here: the hook targets (dotted paths the plugin wraps through
SGLang's HookRegistry) and the SGLang objects the plugin subclasses or calls.
"""

from __future__ import annotations

import sys

SGLANG_VERSION = "0.5.23"  # the version pinned in pyproject.toml; the plugin warns on any other


def installed_sglang_version() -> str:
    from importlib.metadata import version

    return version("sglang")

# Hook targets (sglang.srt.plugins.hook_registry).
ADD_CLI_ARGS = "sglang.srt.server_args.ServerArgs.add_cli_args"  # add the --kv-* flags
FROM_CLI_ARGS = "sglang.srt.server_args.ServerArgs.from_cli_args"  # validate them, pick the radix cache
VALIDATE_REQUEST = (  # reject token ids outside the vocabulary (they crash the scheduler)
    "sglang.srt.managers.tokenizer_manager.TokenizerManager._validate_one_request"
)
PARALLEL_GROUP = (  # a gloo (CPU) group gets no PyNccl communicator: the CPU engine's tensor parallel
    "sglang.srt.distributed.parallel_state.init_model_parallel_group"
)
SCHEDULER_IDLE = (  # a waiting prefix that became ready with no release is compressed while idle
    "sglang.srt.managers.scheduler.Scheduler.on_idle"
)
INTERNAL_STATE = (  # /server_info -> internal_states[i]["lava_kv_policy"]
    "sglang.srt.managers.scheduler_components.internal_state.SchedulerInternalStateController.get_internal_state"
)

# The radix cache backend name passed to --radix-cache-backend.
RADIX_CACHE_BACKEND = "lava"

# RadixCache internals, beyond the prefix-cache API, that the compressed tree
# (compressed_tree.py) overrides, calls or keeps up to date (mem_cache/radix_cache.py); a
# test checks they exist. inc_lock_ref, dec_lock_ref and evict are overridden with 0.5.23's
# bodies, changed where a compressed node counts its owned slots, not its key's length: diff
# them against the new version on an upgrade.
RADIX_CACHE_METHODS = ("_match_prefix_helper", "_insert_helper", "_split_node", "_delete_leaf",
                       "_update_leaf_status", "_inc_hit_count", "update_eviction_metrics", "inc_lock_ref",
                       "dec_lock_ref", "evict")
RADIX_CACHE_STATE = ("evictable_leaves", "evictable_size_", "protected_size_", "kv_events", "eviction_strategy")


def max_prompt_tokens(context_len: int, pool_tokens: int) -> int:
    """The longest prompt SGLang's scheduler admits: it refuses (or, with
    --allow-auto-truncate, cuts) one of min(context_len - 1, KV pool tokens - 1) - 5 tokens or
    more (tp_worker.py, get_worker_info's max_req_input_len; managers/utils.py,
    validate_input_length), a bound below the tokenizer manager's context length when the
    pool is smaller than the context."""
    return min(context_len - 1, pool_tokens - 1) - 6


def same_cache_namespace(key, other) -> bool:
    """Whether two RadixKeys are in one namespace of the prefix cache (the same extra_key, which
    holds a LoRA adapter's id, cache_salt and bigram mode), the only keys RadixKey.match
    compares: it raises on any other pair."""
    return (key.extra_key, key.cache_salt, key.is_bigram) == (other.extra_key, other.cache_salt, other.is_bigram)


def radix_cache_api():
    """RadixCache and the types its methods take and return (mem_cache/radix_cache.py)."""
    from sglang.srt.mem_cache.base_prefix_cache import (
        DecLockRefResult,
        EvictParams,
        EvictResult,
        IncLockRefResult,
        MatchPrefixParams,
    )
    from sglang.srt.mem_cache.radix_cache import RadixCache, RadixKey, TreeNode

    return (RadixCache, RadixKey, TreeNode, EvictParams, EvictResult, IncLockRefResult, DecLockRefResult,
            MatchPrefixParams)


def register_radix_cache_backend(name, factory) -> None:
    from sglang.srt.mem_cache.registry import register_radix_cache_backend as register

    register(name, factory)


def server_arg_parser():
    """A parser as `launch_server`'s (`prepare_server_args`: `ServerArgs.add_cli_args`,
    abbreviations allowed), without the --kv-* flags unless the plugin's hook is loaded in
    this process."""
    import argparse

    from sglang.srt.server_args import ServerArgs

    parser = argparse.ArgumentParser(prog="sglang serve", add_help=False)
    ServerArgs.add_cli_args(parser)
    return parser


def default_device() -> str:
    """The device SGLang picks when --device is not given (`ServerArgs`' own resolution)."""
    from sglang.srt.utils.common import get_device

    return get_device()


def ssl_verify(server_args):
    """What this server's own HTTPS requests pass as `requests`' `verify=` (the
    `--ssl-ca-certs` file, False for a certificate without one, True without SSL), as
    SGLang's warm-up requests do."""
    from sglang.srt.arg_groups.serving_hook import ssl_verify_of

    return ssl_verify_of(server_args)


def dp_rank() -> int | None:
    """This scheduler's data-parallel rank under `--dp-size` > 1, else None (`routed_dp_rank`
    of a /generate request sends it to that rank)."""
    from sglang.srt.runtime_context import get_parallel

    return get_parallel().dp_rank


def tp_group():
    """This scheduler's tensor-parallel group (SGLang's `GroupCoordinator`)."""
    from sglang.srt.distributed.parallel_state import get_tp_group

    return get_tp_group()


def attention_layers(model) -> list:
    """The model's attention layers (SGLang's `RadixAttention` modules)."""
    from sglang.srt.layers.radix_attention import RadixAttention

    return [module for module in model.modules() if isinstance(module, RadixAttention)]


def has_attention_sinks(model) -> bool:
    """Whether the model learns attention sinks, which its attention modules hold as `sinks`
    and pass to the backend per call (gpt-oss, Granite)."""
    return any(getattr(module, "sinks", None) is not None for module in model.modules())


def attention_backends() -> dict:
    """The name -> factory dict the model runner builds its attention backend from."""
    from sglang.srt.layers.attention.attention_registry import ATTENTION_BACKENDS

    return ATTENTION_BACKENDS


def kv_write_loc(out_cache_loc):
    """The write location `KVCache.set_kv_buffer` takes: no sliding-window location, as hybrid
    sliding-window models are refused at start-up (`plugin.py`)."""
    from sglang.srt.mem_cache.memory_pool import KVWriteLoc

    return KVWriteLoc(out_cache_loc, None)


def commit_deferred_frees(allocator) -> None:
    """Make the frees pending in the allocator's open free group (`free_group_begin` ..
    `free_group_end`, around a batch's result processing) available now."""
    if getattr(allocator, "free_group", None) is not None:
        allocator.free_group_end()
        allocator.free_group_begin()


def pool_counters(internal_state_controller) -> dict:
    """The KV pool of the scheduler whose /server_info is being built (the INTERNAL_STATE
    hook's `self`): free tokens, and the radix tree's evictable and protected tokens."""
    scheduler = internal_state_controller.scheduler
    return {
        "pool_available": scheduler.token_to_kv_pool_allocator.available_size(),
        "evictable": scheduler.tree_cache.evictable_size(),
        "protected": scheduler.tree_cache.protected_size(),
    }


def seconds_since_first_forward(req) -> float | None:
    """Seconds since the request's first forward pass began (SchedulerReqTimeStats's
    `forward_entry_time`, a perf_counter stamp set for every request); None if not stamped.
    For a released commit (no new tokens) it is the request's prefill time."""
    import time

    stamp = getattr(getattr(req, "time_stats", None), "forward_entry_time", 0.0)
    return time.perf_counter() - stamp if stamp else None


def cached_prompt_tokens(req) -> int:
    """How many of the request's prompt tokens its prefill took from the cache (`Req.cached_tokens`,
    counted by SGLang's `prepare_for_extend`); 0 where not counted."""
    return getattr(req, "cached_tokens", 0) or 0


def multimodal_processor_runs(tokenizer_manager, request) -> bool:
    """Whether SGLang's multimodal processor will turn a request's (`GenerateReqInput`) images,
    video or audio into placeholder ids beyond the text vocabulary (mllama's <|image|>). A
    text-only model has no processor: SGLang ignores the media (`TokenizerManager._tokenize_one_request`)
    and the ids go to the model as given."""
    contains = getattr(request, "contains_mm_input", None)
    has_media = bool(contains()) if callable(contains) else False
    return has_media and getattr(tokenizer_manager, "mm_processor", None) is not None


def has_input_embeddings(req) -> bool:
    """Whether a scheduler request (`Req`) was given embeddings instead of text: its input ids
    are then SGLang's stand-in (`[1] * length`), which neither name a document nor can be
    repeated."""
    return (getattr(req, "input_embeds", None) is not None
            or getattr(req, "positional_embed_overrides", None) is not None)


def hook_registry():
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    return HookRegistry, HookType


def triton_attention_ops():
    """The Triton kernels of SGLang's `triton` attention backend the GPU path calls for each
    request's own tokens (`own_attention.py`): the KV index builder with a start offset (for the
    FlashInfer wrapping too), the split-K decode kernel (per-split LSE) and the extend kernel
    (`lse_extend`)."""
    from sglang.kernels.ops.attention.decode_attention import decode_attention_fwd
    from sglang.kernels.ops.attention.extend_attention import extend_attention_fwd
    from sglang.kernels.ops.attention.kv_indices import create_flashinfer_kv_indices_triton

    return create_flashinfer_kv_indices_triton, decode_attention_fwd, extend_attention_fwd


def recomputes_cached_prefixes(backend) -> bool:
    """Whether `backend` is SGLang's `torch_native` backend (`TorchNativeAttnBackend`, a
    subclass too: it would inherit the extend), whose extend attends from every position of
    a request's sequence, cached prefix included, and discards the prefix's rows
    (`_run_sdpa_forward_extend`): a question over a cached document costs the document's
    whole attention again."""
    module = sys.modules.get("sglang.srt.layers.attention.torch_native_backend")
    return module is not None and isinstance(backend, module.TorchNativeAttnBackend)


def is_causal_attention(layer) -> bool:
    """Whether an attention layer (SGLang's `RadixAttention`) is a decoder's causal one, the
    only kind the plugin's attention computes (not bidirectional, not encoder-only)."""
    from sglang.srt.layers.radix_attention import AttentionType

    return layer.attn_type == AttentionType.DECODER


def flashinfer_own_wrappers(backend) -> tuple | None:
    """For SGLang's `flashinfer` attention backend (`FlashInferAttnBackend`): a FlashInfer paged
    decode wrapper and a paged prefill wrapper of the plugin's own (`FlashInferOwnAttention`
    plans them per batch), built as the backend builds its own, on its workspace buffer, which
    its wrappers share too. None for any other backend.

    SGLang's backend module, which imports FlashInfer, is looked up, not imported: a backend of
    its class means it is loaded. Exactly that class: subclasses (trtllm_mha, ...) run other
    kernels. SGLang's backend assumes one head dim for K and V, and so do these wrappers."""
    module = sys.modules.get("sglang.srt.layers.attention.flashinfer_backend")
    if module is None or type(backend) is not module.FlashInferAttnBackend:
        return None
    from flashinfer import BatchDecodeWithPagedKVCacheWrapper, BatchPrefillWithPagedKVCacheWrapper

    return (BatchDecodeWithPagedKVCacheWrapper(backend.workspace_buffer, "NHD", backend=backend.decode_backend,
                                               use_tensor_cores=backend.decode_use_tensor_cores),
            BatchPrefillWithPagedKVCacheWrapper(backend.workspace_buffer, "NHD", backend=backend.prefill_backend))
