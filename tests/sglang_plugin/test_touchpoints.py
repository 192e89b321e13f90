"""The places the plugin touches SGLang exist in the installed version (touchpoints.py)."""

from __future__ import annotations

import pkgutil
from types import SimpleNamespace

from lava_sglang.sglang_plugin import plugin, touchpoints


class RecordingRegistry:
    """Stands for SGLang's HookRegistry: records the targets hooks are registered on."""

    targets: list[str] = []

    @classmethod
    def register(cls, target, hook, hook_type):
        cls.targets.append(target)


def registered_targets(monkeypatch) -> list[str]:
    """The hook targets plugin.register() registers in a server's process (the flags enabled)."""
    RecordingRegistry.targets = []
    monkeypatch.setattr(plugin, "_registered", False)
    monkeypatch.setattr(touchpoints, "register_radix_cache_backend", lambda name, factory: None)
    monkeypatch.setattr(touchpoints, "hook_registry", lambda: (RecordingRegistry, SimpleNamespace(
        BEFORE="before", AFTER="after", AROUND="around")))
    monkeypatch.setattr(touchpoints, "attention_backends", lambda: {name: None for name in
                                                                     plugin.SUPPORTED_ATTENTION_BACKENDS})
    monkeypatch.setattr(plugin.KvPolicyConfig, "from_env", classmethod(lambda cls: SimpleNamespace(enabled=True)))
    plugin.register()
    return RecordingRegistry.targets


def test_every_hook_target_resolves_as_sglangs_hook_registry_resolves_it(monkeypatch):
    """HookRegistry.apply_hooks only logs a target it cannot resolve and starts the server
    without that hook (the idle compression, request validation, /server_info would be
    silently gone): an upgrade that moves one must fail here."""
    targets = registered_targets(monkeypatch)
    assert touchpoints.SCHEDULER_IDLE in targets and len(targets) == len(set(targets)) >= 6
    unresolved = []
    for target in targets:
        owner_path, attribute = target.rsplit(".", 1)  # as HookRegistry._apply_target splits it
        if not callable(getattr(pkgutil.resolve_name(owner_path), attribute, None)):
            unresolved.append(target)
    assert unresolved == []


def test_the_cached_prompt_tokens_are_sglangs_count_made_at_each_prefill():
    # The repetition's cost is compared with the commit's prefill only where the prefill
    # computed most of the prompt (radix_cache._defer_fork_prefix): an upgrade that stopped
    # counting would compare it with a recomputed window again.
    import inspect
    from array import array

    from sglang.srt.managers.schedule_batch import Req, ScheduleBatch
    from sglang.srt.sampling.sampling_params import SamplingParams

    req = Req("r", "", array("q", [1, 2, 3]), SamplingParams(max_new_tokens=1))
    assert touchpoints.cached_prompt_tokens(req) == 0
    req.cached_tokens = 2
    assert touchpoints.cached_prompt_tokens(req) == 2
    assert "req.cached_tokens += " in inspect.getsource(ScheduleBatch.prepare_for_extend)


def test_the_names_the_start_up_checks_read_exist_in_this_sglang():
    """plugin._check_model, touchpoints.multimodal_processor_runs and has_input_embeddings read
    SGLang attributes with a default that means "allowed" (no MLA, a generating model, an
    unquantized pool, no media): an upgrade that renamed one would turn a refusal off with
    no other test failing. Each name is looked up where SGLang 0.5.23 sets it."""
    import dataclasses
    import inspect

    from sglang.srt.configs.model_config import ModelConfig
    from sglang.srt.layers.radix_attention import RadixAttention
    from sglang.srt.managers.io_struct import GenerateReqInput
    from sglang.srt.managers.schedule_batch import Req
    from sglang.srt.managers.tokenizer_manager import TokenizerManager
    from sglang.srt.mem_cache import memory_pool
    from sglang.srt.mem_cache.registry import TreeCacheBuildContext

    def not_set_in(cls, names):
        source = inspect.getsource(cls)
        return [name for name in names if f"self.{name} =" not in source and f"self.{name}: " not in source]

    context_fields = {field.name for field in dataclasses.fields(TreeCacheBuildContext)}
    assert {"is_hybrid_swa", "is_hybrid_ssm", "is_dsa", "model_config", "tp_worker", "params"} <= context_fields
    from sglang.srt.mem_cache.cache_init_params import CacheInitParams

    assert "page_size" in {field.name for field in dataclasses.fields(CacheInitParams)}
    assert not_set_in(ModelConfig, ["attention_arch", "is_generation", "context_len", "hf_config"]) == []
    assert not_set_in(RadixAttention, ["logit_cap", "is_cross_attention", "qk_head_dim", "v_head_dim", "scaling",
                                 "tp_q_head_num", "tp_k_head_num", "sliding_window_size"]) == []
    assert not_set_in(memory_pool.MHATokenToKVPool, ["k_buffer", "v_buffer"]) == []
    assert not_set_in(memory_pool.KVCache, ["dtype", "store_dtype"]) == []
    assert any(isinstance(vars(cls).get("is_quantized_kv_cache"), property)
               for cls in vars(memory_pool).values() if inspect.isclass(cls))
    assert callable(GenerateReqInput.contains_mm_input)
    assert not_set_in(TokenizerManager, ["mm_processor"]) == []
    assert not_set_in(Req, ["input_embeds", "positional_embed_overrides", "cached_tokens"]) == []
