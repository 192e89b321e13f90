"""`--kv-policy` and its options: parsing, validation, and the hand-over to SGLang's children.

The launcher parses the flags (they are added to SGLang's own parser by the plugin), checks
them before anything loads, and passes the result to the scheduler processes, which SGLang
starts with `spawn`, through one environment variable.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
from dataclasses import dataclass

from lava_sglang.argtypes import DEFAULT_MIN_PREFIX
from lava_sglang.numbers import INT_PATTERN, parse_float, parse_int
from lava_sglang.policy import (POLICIES, REPEAT_NORMALIZATIONS, REPEAT_VIEWS, HeadShard, Reconstruct, budget_evicts,
                                make_policy, resolve_budget)
from lava_sglang.sglang_plugin.touchpoints import RADIX_CACHE_BACKEND

ENV_VAR = "LAVA_SGLANG_KV_POLICY"
NONE = "none"
KV_POLICIES = (NONE, *sorted(name for name in POLICIES if name != "full"))
# The attention backends the plugin wraps (`attention.with_compressed_prefixes`: its own path
# serves the batches that read a compressed prefix, and under `torch_native` the extends over
# a cached prefix; the backend every other batch), per
# device; the first is chosen when none is given. On CUDA the path computes each request's
# own tokens with the wrapped backend's kernels (`own_attention.py`): SGLang's Triton kernels,
# or FlashInfer's wrappers under `flashinfer`. Triton is the default because its kernels are
# tested as they are (under the interpreter); FlashInfer's only through a stand-in wrapper.
CPU_ATTENTION_BACKENDS = ("torch_native",)
CUDA_ATTENTION_BACKENDS = ("triton", "flashinfer", "torch_native")
SUPPORTED_ATTENTION_BACKENDS = tuple(dict.fromkeys(CPU_ATTENTION_BACKENDS + CUDA_ATTENTION_BACKENDS))  # all wrapped
# --cuda-graph-backend-{decode,prefill} value that turns a phase's CUDA graphs off: the
# compressed-prefix path builds its metadata on the host per batch, which a graph replay skips.
CUDA_GRAPHS_OFF = "disabled"
CUDA_GRAPH_PHASES = ("cuda_graph_backend_decode", "cuda_graph_backend_prefill")
# Per-phase attention backends: two that differ give a hybrid backend.
ATTENTION_PHASES = ("prefill_attention_backend", "decode_attention_backend")
# --kv-cache-dtype values whose pool holds K and V as plain numbers: the compressor scores and
# copies them as such, so a quantized pool (fp8, fp4: bytes plus scales) is refused. (`auto`
# takes fp8 from a checkpoint that declares it: the scheduler's start-up check refuses that pool.)
PLAIN_KV_CACHE_DTYPES = ("auto", "bf16", "bfloat16")
FORK, SHARED = "fork", "shared"
COMPRESS_TRIGGERS = (FORK, SHARED)
TAIL, BRANCHES, RECONSTRUCT = "tail", "branches", "reconstruct"
SERVER_OBSERVE_SOURCES = (TAIL, BRANCHES, RECONSTRUCT)
DEFERRED_OBSERVE_SOURCES = (BRANCHES, RECONSTRUCT)  # a fork prefix waits for what observes it
CHAT, PLAIN = "chat", "plain"
OBSERVE_PROMPTS = (CHAT, PLAIN)  # --kv-observe-prompt: Reconstruct.chat_turn true / false
# Bounds on what a deferred --kv-observe holds while prefixes wait: a window is the queries of
# w tokens at every layer (~2 MB for SmolLM2 in fp32, ~16 MB for an 8B model), and a branch's
# window also the keys of its own tokens at every layer (fp32: ~23 KB per token for SmolLM2,
# ~131 KB for an 8B model, so at most ~12 MB and ~67 MB per branch); a repetition's scores are
# Hq x n fp32 per layer (~1 MB per 1K tokens for SmolLM2).
MAX_PENDING_PREFIXES = 32  # beyond that, a committed prefix is compressed at once by its tail
MAX_BRANCH_WINDOWS = 8  # branches captured + windows added, at most (PendingPrefix.claim_branch)
MAX_BRANCH_OWN_TOKENS = 512  # a longer branch (a continuation, not a question) adds no window
# The branch windows of all waiting prefixes together (32 prefixes x 8 branches of an 8B model
# could hold ~17 GB beside the KV pool); a branch past it adds no window.
MAX_BRANCH_WINDOW_BYTES = 1 << 30
OBSERVATION_WINDOW = 32  # --kv-window's default where the window's queries score the prefix


def default_window(observe: str, compress_on: tuple[str, ...]) -> int:
    """--kv-window's default: where a repetition scores the compressed prefixes the window is
    only kept (`Reconstruct.kept_window`); where its queries score them (tail, branches, or a
    prefix compressed as shared, which its tail scores), the observation window. A fork prefix
    the repetition cannot score faithfully falls back to its tail (docs/observe.md), then
    with the smaller window's queries."""
    if observe == RECONSTRUCT and SHARED not in compress_on:
        return Reconstruct.kept_window
    return OBSERVATION_WINDOW


class ConfigError(ValueError):
    """A bad --kv-* value or a combination the plugin cannot serve; the message names the flag."""


@dataclass(frozen=True)
class KvPolicyConfig:
    """What the plugin does, as given on the command line.

    policy: `none` leaves SGLang untouched; otherwise the policy compressing shared prefixes.
    budget: keep ratio in (0, 1] (float) or average tokens kept per layer and KV head (int),
        the observation window included.
    window: recent window w: the last w prefix tokens are kept; under `tail` and `branches`
        (and for a prefix compressed as shared) they score the rest (`default_window`).
    min_prefix: prefixes shorter than this many tokens are not compressed.
    alpha: the safeguard of LAVa's per-layer head budgets (lava.md); other policies ignore it.
    pool_kernel: width of the score pooling (lava.md).
    compress_on: what gets compressed: `fork`, the prefix a frontend program commits before
        fork(); `shared`, a prompt prefix of at least `min_prefix` tokens once a second
        request shares it.
    observe: what scores a fork prefix (docs/observe.md): `reconstruct` (the default), the
        attention of a teacher-forced repetition of the prefix, which the server runs chunk
        by chunk as internal requests after the commit; `tail`, its own last `window`
        tokens, at once; `branches`, the tail and the forked branches' questions, once the
        branches have run on the full prefix. Shared prefixes (`compress_on` shared) are
        always scored by the window their second request recomputes.
    observe_wait: seconds a fork prefix waits under `branches` or `reconstruct`; after
        that it is compressed with what arrived (the tail alone if nothing did).
    observe_chunk: under `reconstruct`, prefix tokens each repetition chunk repeats (one
        internal request per chunk; the extra KV while scoring is one chunk and its prompt).
    observe_normalize: under `reconstruct`, over which keys a repetition query's softmax is
        taken: `global` (all it sees) or `local` (KVzip's: sinks, copied chunk, repetition).
    observe_view: under `reconstruct`, what each chunk's repetition attends to: `prefix` (the
        whole prefix, KVzip's) or `chunk` (the first tokens and the chunk it copies).
    observe_prompt: under `reconstruct`, how each chunk is introduced: `chat` (the
        instruction, then the chat template's opening of the assistant's reply, KVzip's
        prompt) or `plain` (the instruction alone).
    """

    policy: str = NONE
    budget: float | int = 0.2
    window: int = Reconstruct.kept_window  # default_window(observe, compress_on)
    min_prefix: int = DEFAULT_MIN_PREFIX
    alpha: float = 0.2
    pool_kernel: int | None = None  # None: the policy's own (lava and kvzip 1, the SnapKV family 7)
    compress_on: tuple[str, ...] = (FORK,)
    observe: str = RECONSTRUCT
    observe_wait: float = 30.0
    observe_chunk: int = Reconstruct.chunk_tokens
    observe_normalize: str = Reconstruct.normalize
    observe_view: str = Reconstruct.view
    observe_prompt: str = CHAT if Reconstruct.chat_turn else PLAIN

    @property
    def enabled(self) -> bool:
        return self.policy != NONE

    def evicts(self, prefix_len: int) -> bool:
        """Whether the plan keeps fewer tokens than a `prefix_len`-token prefix has. One that
        keeps them all (an int budget >= the prefix, a ratio of 1.0, a prefix within the window)
        would only make a second full copy: the radix cache leaves such a prefix as stock SGLang
        caches it."""
        return budget_evicts(self.budget, prefix_len, self.window)

    def make_policy(self):
        return make_policy(self.policy, window=self.window, pool_kernel=self.pool_kernel, alpha=self.alpha)

    def repetition(self) -> Reconstruct:
        """The repetition `--kv-observe reconstruct` runs (docs/observe.md)."""
        return Reconstruct(chunk_tokens=self.observe_chunk, normalize=self.observe_normalize, view=self.observe_view,
                           chat_turn=self.observe_prompt == CHAT)

    def to_env(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_env(cls, environ=os.environ) -> KvPolicyConfig:
        text = environ.get(ENV_VAR)
        return cls.from_fields(json.loads(text)) if text else cls()

    @classmethod
    def from_fields(cls, fields: dict) -> KvPolicyConfig:
        """The config whose fields `fields` holds as JSON gives them back (`to_env`, or
        /server_info's `lava_kv_policy`, where counters sit beside them); the others default."""
        names = {field.name for field in dataclasses.fields(cls)}
        known = {name: value for name, value in fields.items() if name in names}
        if "compress_on" in known:
            known["compress_on"] = tuple(known["compress_on"])
        return cls(**known)


FLAGS = {
    "kv_policy": ("--kv-policy", NONE,
                  f"KV-cache policy for shared prefixes: one of {', '.join(KV_POLICIES)} (default: none, "
                  "stock SGLang), optionally with options of its own, e.g. lava:layer_budget=entropy "
                  "(docs/allocation.md). kvzip needs --kv-observe reconstruct. lava-sglang plugin."),
    "kv_budget": ("--kv-budget", "0.2",
                  "Budget per compressed prefix: a keep ratio in (0, 1] (e.g. 0.2) or an int >= 1, the "
                  "average tokens kept per layer and KV head (e.g. 512). Default 0.2."),
    "kv_window": ("--kv-window", None,
                  "Recent window: the last N prefix tokens are always kept, and under --kv-observe tail or "
                  "branches (and for prefixes compressed as shared) their queries score the others; a window= "
                  f"in the --kv-policy spec must equal it. Default: {Reconstruct.kept_window} with --kv-observe "
                  f"reconstruct unless --kv-compress-on has shared (the repetition scores every token; "
                  f"{Reconstruct.kept_window} answered more than {OBSERVATION_WINDOW}, docs/allocation.md), "
                  f"{OBSERVATION_WINDOW} otherwise."),
    "kv_min_prefix": ("--kv-min-prefix", str(DEFAULT_MIN_PREFIX),
                      "Do not compress prefixes shorter than this many tokens (must exceed --kv-window and be below "
                      "the model's context length). "
                      f"Default {DEFAULT_MIN_PREFIX}."),
    "kv_alpha": ("--kv-alpha", None, "LAVa's head-budget safeguard alpha in [0, 1] (each KV head keeps at least "
                 "floor(alpha x its layer's budget)); only for policies with per-layer head top-k budgets "
                 "(lava:layer_budget=entropy or uniform with head_budget=topk, ada_snapkv), refused for the others; "
                 "an alpha= in the "
                 f"--kv-policy spec must equal it. Default {KvPolicyConfig.alpha}, or the spec's."),
    "kv_pool_kernel": ("--kv-pool-kernel", None, "Width of the score pooling (odd int >= 1). Default: the "
                       "policy's own (lava and kvzip 1, no pooling; snapkv, ada_snapkv, pyramidkv 7); refused for "
                       "streamingllm, which scores nothing."),
    "kv_compress_on": ("--kv-compress-on", FORK,
                       "What gets compressed, comma-separated: fork (the prefix a frontend program commits "
                       "before fork()), shared (a prompt prefix of >= --kv-min-prefix tokens, once a second "
                       "request shares it). Default fork."),
    "kv_observe": ("--kv-observe", RECONSTRUCT,
                   "What scores a fork prefix: reconstruct (the attention of a teacher-forced repetition of the "
                   "prefix, run chunk by chunk as internal requests; query-agnostic, what later questions need), "
                   "tail (its own last --kv-window tokens, compressed at once) or branches (the tail and the "
                   "questions of the forked branches, compressed once the branches have run on the full prefix); "
                   "docs/observe.md. Default reconstruct."),
    "kv_observe_wait": ("--kv-observe-wait", "30",
                        "With --kv-observe branches or reconstruct: seconds a fork prefix waits for its branches "
                        "or its repetition before it is compressed with what arrived. Default 30."),
    "kv_observe_chunk": ("--kv-observe-chunk", str(Reconstruct.chunk_tokens),
                         "With --kv-observe reconstruct: prefix tokens per repetition chunk; each chunk is one "
                         "internal request (the prefix, a repeat instruction, the chunk) whose tokens are freed "
                         f"before the next, so scoring holds one chunk more than the prefix. Default "
                         f"{Reconstruct.chunk_tokens}."),
    "kv_observe_normalize": ("--kv-observe-normalize", Reconstruct.normalize,
                             "With --kv-observe reconstruct: the softmax a repetition query's score is read from: "
                             "global (over every key it sees) or local (KVzip's: the first tokens, the chunk it "
                             f"copies and the repetition). Default {Reconstruct.normalize}."),
    "kv_observe_view": ("--kv-observe-view", Reconstruct.view,
                        "With --kv-observe reconstruct: what each repetition chunk attends to besides its own tokens: "
                        "prefix (the whole prefix, as KVzip does) or chunk (the first tokens and the chunk it copies, "
                        "so that the repetition's attention does not grow with the prefix; docs/kvzip.md). Default "
                        f"{Reconstruct.view}."),
    "kv_observe_prompt": ("--kv-observe-prompt", KvPolicyConfig.observe_prompt,
                          "With --kv-observe reconstruct: how each repetition chunk is introduced: chat (the "
                          "instruction, then the chat template's opening of the assistant's reply, as KVzip does; "
                          "a model without a chat template falls back to plain) or plain (the instruction alone). "
                          f"Default {KvPolicyConfig.observe_prompt}."),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the --kv-* flags to SGLang's parser. Values stay strings here: `from_namespace`
    validates them and fails with one line naming the flag, not argparse's full usage.
    An SGLang built with patches/sglang-0.5.23-kv-policy.patch already has them: nothing to add."""
    if "--kv-policy" in parser._option_string_actions:
        return
    group = parser.add_argument_group("KV-cache compression (lava-sglang plugin)")
    for dest, (flag, default, help_text) in FLAGS.items():
        unset = dest.removeprefix("kv_") in OBSERVE_FLAG_READERS  # None until given: see `from_namespace`
        group.add_argument(flag, dest=dest, type=str, default=None if unset else default, help=help_text)


def _int(flag: str, text: str, minimum: int) -> int:
    try:
        value = parse_int(text)
    except ValueError:
        raise ConfigError(f"{flag} must be an int >= {minimum}, got {text!r}") from None
    if value < minimum:
        raise ConfigError(f"{flag} must be an int >= {minimum}, got {text!r}")
    return value


def _float(text: str) -> float:
    """`text` as a float; nan (which every range check refuses) when it is not one."""
    try:
        return parse_float(text)
    except ValueError:
        return math.nan


def parse_budget(text: str) -> float | int:
    """'0.2' -> keep ratio 0.2; '512' -> 512 tokens."""
    allowed = "a keep ratio in (0, 1] (e.g. 0.2) or an int >= 1 in tokens (e.g. 512)"
    try:
        budget = parse_int(text) if INT_PATTERN.fullmatch(str(text)) else parse_float(text)
        resolve_budget(budget, 1)
    except ValueError:
        raise ConfigError(f"--kv-budget must be {allowed}, got {text!r}") from None
    return budget


def parse_triggers(text: str) -> tuple[str, ...]:
    """'fork,shared' -> ('fork', 'shared')."""
    triggers = tuple(dict.fromkeys(part.strip() for part in str(text).split(",")))
    if not triggers or any(trigger not in COMPRESS_TRIGGERS for trigger in triggers):
        raise ConfigError(f"--kv-compress-on must be a comma-separated list of {', '.join(COMPRESS_TRIGGERS)}, "
                          f"got {text!r}")
    return triggers


def from_namespace(args: argparse.Namespace) -> KvPolicyConfig:
    """The validated config from parsed flags; raises ConfigError naming the flag."""
    policy = str(args.kv_policy)
    if policy.partition(":")[0] not in KV_POLICIES or policy.startswith(f"{NONE}:"):
        raise ConfigError(f"--kv-policy must be one of {', '.join(KV_POLICIES)}, got {policy!r}")
    alpha = None if args.kv_alpha is None else _float(args.kv_alpha)  # None: not given
    if alpha is not None and not 0.0 <= alpha <= 1.0:
        raise ConfigError(f"--kv-alpha must be a float in [0, 1], got {args.kv_alpha!r}")
    pool_kernel = None if args.kv_pool_kernel is None else _int("--kv-pool-kernel", args.kv_pool_kernel, 1)
    if pool_kernel is not None and pool_kernel % 2 == 0:
        raise ConfigError(f"--kv-pool-kernel must be an odd int >= 1, got {args.kv_pool_kernel!r}")
    observe = str(args.kv_observe)
    if observe not in SERVER_OBSERVE_SOURCES:
        raise ConfigError(f"--kv-observe must be one of {', '.join(SERVER_OBSERVE_SOURCES)}, got {observe!r}")
    triggers = parse_triggers(args.kv_compress_on)
    window = (default_window(observe, triggers) if args.kv_window is None
              else _int("--kv-window", args.kv_window, 1))
    min_prefix = _int("--kv-min-prefix", args.kv_min_prefix, 2)
    if min_prefix <= window:
        raise ConfigError(f"--kv-min-prefix must be greater than --kv-window ({window}), got {min_prefix}")
    # The --kv-observe-* flags are None when not given (here and in the patch), so that one given to
    # a source that does not read it is refused below even at its default value.
    observe_flags = {name: getattr(args, f"kv_{name}") for name in OBSERVE_FLAG_READERS}
    given_observe_flags = [name for name, value in observe_flags.items() if value is not None]
    observe_flags = {name: FLAGS[f"kv_{name}"][1] if value is None else value for name, value in observe_flags.items()}
    observe_wait = _float(observe_flags["observe_wait"])
    if not 0 < observe_wait < math.inf:
        raise ConfigError(f"--kv-observe-wait must be a number of seconds > 0, got {observe_flags['observe_wait']!r}")
    observe_chunk = _int("--kv-observe-chunk", observe_flags["observe_chunk"], 1)
    observe_normalize = str(observe_flags["observe_normalize"])
    if observe_normalize not in REPEAT_NORMALIZATIONS:
        raise ConfigError(f"--kv-observe-normalize must be one of {', '.join(REPEAT_NORMALIZATIONS)}, "
                          f"got {observe_normalize!r}")
    observe_view = str(observe_flags["observe_view"])
    if observe_view not in REPEAT_VIEWS:
        raise ConfigError(f"--kv-observe-view must be one of {', '.join(REPEAT_VIEWS)}, got {observe_view!r}")
    observe_prompt = str(observe_flags["observe_prompt"])
    if observe_prompt not in OBSERVE_PROMPTS:
        raise ConfigError(f"--kv-observe-prompt must be one of {', '.join(OBSERVE_PROMPTS)}, got {observe_prompt!r}")
    config = KvPolicyConfig(policy=policy, budget=parse_budget(args.kv_budget), window=window,
                            min_prefix=min_prefix, alpha=KvPolicyConfig.alpha if alpha is None else alpha,
                            pool_kernel=pool_kernel, compress_on=triggers,
                            observe=observe, observe_wait=observe_wait, observe_chunk=observe_chunk,
                            observe_normalize=observe_normalize, observe_view=observe_view,
                            observe_prompt=observe_prompt)
    if observe == RECONSTRUCT:
        try:
            config.repetition().validate()
        except ValueError as error:
            raise ConfigError(f"--kv-observe-view {observe_view} with --kv-observe-chunk {observe_chunk}: "
                              f"{error}") from None
    if not config.enabled:  # stock SGLang: every other --kv-* flag would do nothing
        for dest, (flag, default, _) in FLAGS.items():
            value = getattr(args, dest)
            unset = dest.removeprefix("kv_") in OBSERVE_FLAG_READERS  # None until given
            if dest != "kv_policy" and value is not None and (unset or _differs(value, default)):
                raise ConfigError(f"{flag} {value}: no --kv-policy given (none, the default, is stock SGLang, which "
                                  "reads no --kv-* flag); give a policy or leave it out")
        return config
    policy_object = _policy_object(config, args, policy, alpha, pool_kernel, window)
    if FORK not in triggers or not policy_object.needs_scores:  # nothing reads the observation flags
        why = (f"--kv-policy {policy} scores nothing" if not policy_object.needs_scores else
               f"--kv-compress-on {','.join(triggers)} compresses no fork prefix, the only prefixes --kv-observe "
               "scores (a shared prefix is scored by its tail window)")
        given = [(FLAGS["kv_" + name][0], getattr(config, name)) for name in given_observe_flags]
        if observe != FLAGS["kv_observe"][1] and FORK not in triggers:  # else it sets --kv-window's default
            given.insert(0, ("--kv-observe", observe))
        if given:
            raise ConfigError(f"{given[0][0]} {given[0][1]}: {why}; leave it out")
    for name in given_observe_flags:  # a flag the source does not read would do nothing
        readers = OBSERVE_FLAG_READERS[name]
        if observe not in readers:
            raise ConfigError(f"{FLAGS['kv_' + name][0]} {getattr(config, name)}: --kv-observe {observe} does "
                              f"not read it (only {' and '.join(readers)} do); leave it out")
    config = dataclasses.replace(config, pool_kernel=getattr(policy_object, "pool_kernel", pool_kernel),
                                 alpha=getattr(policy_object, "alpha", config.alpha))
    try:
        policy_object.check_source(observe)
    except ValueError as error:
        raise ConfigError(f"--kv-policy {policy}: {error} (--kv-observe)") from None
    if SHARED in triggers:
        try:
            policy_object.check_source("tail")
        except ValueError as error:
            raise ConfigError(f"--kv-policy {policy}: {error} (--kv-compress-on shared scores a shared prefix "
                              "by its tail window)") from None
    return config


def _differs(value, default) -> bool:
    """Whether a flag's value is not its default, numbers by value (`0.20` is `0.2`)."""
    try:
        return float(value) != float(default)
    except (TypeError, ValueError):
        return str(value) != str(default)


def _policy_object(config: KvPolicyConfig, args, policy: str, alpha, pool_kernel, window: int):
    """The policy the config makes, checked against the flags that set it too (--kv-alpha,
    --kv-pool-kernel, --kv-window); raises ConfigError."""
    if alpha is not None and not _reads_alpha(policy, window):
        raise ConfigError(f"--kv-alpha {args.kv_alpha}: --kv-policy {policy} does not read alpha (only lava's "
                          "per-layer head top-k, layer_budget=entropy or uniform with head_budget=topk, and "
                          "ada_snapkv do); leave it out")
    try:
        policy_object = config.make_policy()
    except ValueError as error:
        raise ConfigError(f"--kv-policy {policy}: {error}") from None
    if policy_object.window != window:  # the radix cache and the repetition read --kv-window too
        raise ConfigError(f"--kv-policy {policy}: its window {policy_object.window} differs from --kv-window "
                          f"{window}, which the radix cache and the repetition read too; set the window with "
                          "--kv-window (a spec's window= must equal it)")
    if pool_kernel is not None and not hasattr(policy_object, "pool_kernel"):
        raise ConfigError(f"--kv-pool-kernel {pool_kernel}: --kv-policy {policy} scores no tokens, so it "
                          "pools nothing; leave it out")
    # A spec's option wins over its flag: refuse two values given, and report the one in effect.
    for flag, name, value in (("--kv-pool-kernel", "pool_kernel", pool_kernel), ("--kv-alpha", "alpha", alpha)):
        if value is not None and getattr(policy_object, name, value) != value:
            raise ConfigError(f"--kv-policy {policy}: its {name} differs from {flag} {value}; set it in one place")
    return policy_object


#: The sources that read each --kv-observe-* flag, by KvPolicyConfig field.
OBSERVE_FLAG_READERS = {"observe_wait": DEFERRED_OBSERVE_SOURCES, "observe_chunk": (RECONSTRUCT,),
                        "observe_normalize": (RECONSTRUCT,), "observe_view": (RECONSTRUCT,),
                        "observe_prompt": (RECONSTRUCT,)}


def _reads_alpha(policy: str, window: int) -> bool:
    """Whether policy spec `policy` reads alpha (a spec the registry refuses is reported by
    the caller, with its own error)."""
    try:
        return make_policy(policy, window=window).reads_alpha
    except ValueError:
        return True


SUPPORTED_DEVICES = ("cpu", "cuda")


def is_cpu(device: str) -> bool:
    """Whether `device` ("cpu", "cuda", "cuda:1", ...) is the CPU engine's."""
    return device.partition(":")[0] == "cpu"


def attention_backends_for(device: str) -> tuple[str, ...]:
    """The attention backends the plugin serves with on `device`."""
    return CPU_ATTENTION_BACKENDS if is_cpu(device) else CUDA_ATTENTION_BACKENDS


def check_server_args(config: KvPolicyConfig, args: argparse.Namespace, device: str | None) -> None:
    """Refuse SGLang options the plugin cannot serve with a policy on `device` (the one SGLang
    runs on; None where SGLang finds none, and then stops with its own error); raises
    ConfigError."""
    if not config.enabled:
        if getattr(args, "radix_cache_backend", None) == RADIX_CACHE_BACKEND:
            raise ConfigError(f"--radix-cache-backend {RADIX_CACHE_BACKEND} is chosen by --kv-policy; pass "
                              "--kv-policy instead")
        return
    backends = attention_backends_for(device) if device is not None else SUPPORTED_ATTENTION_BACKENDS
    on_accelerator = device is not None and not is_cpu(device)
    graph_phases = [f"--{phase.replace('_', '-')} {getattr(args, phase)}" for phase in CUDA_GRAPH_PHASES
                    if on_accelerator and getattr(args, phase, None) not in (None, CUDA_GRAPHS_OFF)]
    attention_backend = getattr(args, "attention_backend", None) or backends[0]  # as server_arg_overrides sets it
    phase_backends = {phase: getattr(args, phase, None) or attention_backend for phase in ATTENTION_PHASES}
    refusals = [
        (device is not None and device.partition(":")[0] not in SUPPORTED_DEVICES,
         f"device {device} (--device, or SGLang's default where it is not given): the plugin serves on "
         f"{' and '.join(SUPPORTED_DEVICES)} only (its attention path, overlap-scheduling and CUDA-graph settings "
         "are made for them)"),
        (getattr(args, "disable_radix_cache", False),
         "--disable-radix-cache: compressed prefixes live in the radix cache"),
        (getattr(args, "radix_cache_backend", None) not in (None, RADIX_CACHE_BACKEND),
         f"--radix-cache-backend {getattr(args, 'radix_cache_backend', None)}: the plugin is the radix cache"),
        ((getattr(args, "page_size", None) or 1) != 1, "--page-size > 1: the plugin supports page size 1"),
        (getattr(args, "attention_backend", None) not in (None, *backends),
         f"--attention-backend {getattr(args, 'attention_backend', None)}: supported with a policy on "
         f"{device or 'any device'}: {', '.join(backends)}"),
        (len(set(phase_backends.values())) > 1 or not set(phase_backends.values()) <= set(backends),
         f"--prefill-attention-backend {phase_backends['prefill_attention_backend']} and "
         f"--decode-attention-backend {phase_backends['decode_attention_backend']} (the --attention-backend's "
         f"where not given): one backend for both phases, from {', '.join(backends)} (two make SGLang wrap them "
         "in one hybrid backend, which the compressed-prefix path does not wrap)"),
        (getattr(args, "enable_two_batch_overlap", False),
         "--enable-two-batch-overlap: its attention backend wraps the one the compressed-prefix path wraps"),
        (getattr(args, "is_embedding", False),
         "--is-embedding: an embedding request has the shape of a fork commit (no new tokens), and its prompt "
         "would be compressed and later embeddings computed from the compressed copy"),
        (any(getattr(args, name, False) for name in ("enable_streaming_session", "enable_session_radix_cache"))
         or getattr(args, "radix_eviction_policy", None) == "tlru",
         "--enable-streaming-session, --enable-session-radix-cache, --radix-eviction-policy tlru: SGLang serves "
         "them on its own radix cache only, and the plugin's is another"),
        (any(getattr(args, name, False) for name in ("enable_lmcache", "enable_flexkv")),
         "--enable-lmcache, --enable-flexkv: their caches replace the radix cache, which the plugin is"),
        (bool(getattr(args, "kv_events_config", None)),
         "--kv-events-config: the events would report a compressed prefix's full copy removed and never the "
         "compressed prefix stored (the plugin publishes no events for its compressed nodes)"),
        (bool(graph_phases), f"{', '.join(graph_phases)}: CUDA graphs replay a batch without the host work that "
         "builds the compressed prefixes' metadata; with a policy they are off"),
        (on_accelerator and getattr(args, "cuda_graph_config", None) is not None,
         "--cuda-graph-config: its phase backends override the ones the policy turns off (CUDA graphs replay a "
         "batch without the host work that builds the compressed prefixes' metadata)"),
        (getattr(args, "enable_torch_compile", False),
         "--enable-torch-compile: the compressed-prefix path builds its metadata on the host per batch, which "
         "torch.compile cannot trace"),
        (getattr(args, "enable_deterministic_inference", False),
         "--enable-deterministic-inference: the compressed-prefix path's split-K and merges are not SGLang's "
         "batch-invariant kernels"),
        (config.observe == RECONSTRUCT and FORK in config.compress_on and config.make_policy().needs_scores
         and getattr(args, "skip_tokenizer_init", False),
         "--skip-tokenizer-init and --kv-observe reconstruct (the default): the repetition's prompt is tokenized "
         "in the scheduler, which then has no tokenizer, and every fork prefix would be scored by its tail "
         "instead; give --kv-observe tail or branches"),
        (on_accelerator and config.observe == RECONSTRUCT and config.observe_view == "chunk",
         "--kv-observe-view chunk: a batch holding a repetition chunk under the view takes the torch attention "
         "path, which is not made for a GPU's batches (the CPU engine only)"),
        (getattr(args, "speculative_algorithm", None) is not None, "--speculative-algorithm: not supported"),
        (getattr(args, "enable_hierarchical_cache", False), "--enable-hierarchical-cache: not supported"),
        ((getattr(args, "pp_size", 1) or 1) > 1, "--pp-size > 1: pipeline parallel is not supported"),
        (any((getattr(args, name, 1) or 1) > 1 for name in ("attn_dp_size", "dwdp_size"))
         or getattr(args, "enable_dp_attention", False),
         "--attn-dp-size/--dwdp-size > 1 (--enable-dp-attention): attention data parallel schedules different "
         "requests on the ranks of one tensor-parallel group, whose caches must take the same decisions"),
        ((getattr(args, "attn_cp_size", 1) or 1) > 1 or (getattr(args, "dcp_size", 1) or 1) > 1,
         "--attn-cp-size/--dcp-size > 1: context parallel splits a prefix's tokens over ranks; a compressed "
         "prefix's rows are not split"),
        ((getattr(args, "ep_size", 1) or 1) > 1, "--ep-size > 1: expert parallel is not supported"),
        ((getattr(args, "nnodes", 1) or 1) > 1, "--nnodes > 1: a server on several nodes is not supported"),
        ((getattr(args, "disaggregation_mode", None) or "null") != "null",
         f"--disaggregation-mode {getattr(args, 'disaggregation_mode', None)}: prefill-decode disaggregation "
         "moves a request's KV between servers; compressed prefixes are not transferred"),
        (getattr(args, "enable_pdmux", False), "--enable-pdmux: not supported"),
        ((getattr(args, "kv_cache_dtype", None) or "auto") not in PLAIN_KV_CACHE_DTYPES,
         f"--kv-cache-dtype {getattr(args, 'kv_cache_dtype', None)}: the compressed store reads and copies K "
         f"and V as numbers; supported: {', '.join(PLAIN_KV_CACHE_DTYPES)}"),
    ]
    for refused, reason in refusals:
        if refused:
            raise ConfigError(f"--kv-policy {config.policy} cannot run with {reason}")
    tp_size = getattr(args, "tp_size", 1) or 1
    if tp_size > 1:  # found here, not once the model has loaded (the scheduler checks it again there)
        try:
            HeadShard.check_policy(config.make_policy())
        except ValueError as error:
            raise ConfigError(f"--kv-policy {config.policy} cannot run with --tp-size {tp_size}: {error}") from None


def server_arg_overrides(args: argparse.Namespace, device: str) -> dict[str, object]:
    """The SGLang options a policy sets for the user (`device`: the one SGLang runs on):

    - the plugin's radix cache backend;
    - the device's first supported attention backend, when none is given;
    - CUDA graphs off on an accelerator (see CUDA_GRAPHS_OFF);
    - overlap scheduling off on an accelerator. SGLang's overlap loop processes batch N's
      results (where a released request's prefix is compressed: its KV copied to the store,
      the full copy freed, store slots taken, rows repointed) while batch N+1 runs on the
      forward stream, and fences only its own writes behind that batch's metadata reads
      (`Scheduler._apply_war_barrier`): nothing orders the compression's frees and writes
      after the kernels of N+1 that read those slots. On the CPU engine the device's streams
      are no-ops and `run_batch` returns once the forward is done, so no batch is in flight
      while results are processed; the overlap loop there only reorders the scheduling
      (N+1 is formed before N's results are processed), which every server test runs.
    """
    overrides: dict[str, object] = {"radix_cache_backend": RADIX_CACHE_BACKEND}
    if getattr(args, "attention_backend", None) is None:
        overrides["attention_backend"] = attention_backends_for(device)[0]
    if is_cpu(device):
        return overrides
    if not getattr(args, "disable_overlap_schedule", False):
        overrides["disable_overlap_schedule"] = True
    for phase in CUDA_GRAPH_PHASES:
        if getattr(args, phase, None) != CUDA_GRAPHS_OFF:
            overrides[phase] = CUDA_GRAPHS_OFF
    return overrides
