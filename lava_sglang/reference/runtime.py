"""Compress once, answer many, with an HF transformers causal LM (the quality oracle).

    runtime = ReferenceRuntime.load()                    # SmolLM2, fp32
    capture = runtime.prefill(document_ids)              # one prefill; its K, V and window queries kept
    prefix = runtime.compress(capture, "lava", 0.2)      # per (layer, KV head) kept rows
    answers = runtime.generate([prefix], question_ids, max_new_tokens=32)

Other observation sources (docs/observe.md) score the same capture differently:

    seen = runtime.observe(capture, "branches", branches=[question_ids, ...])
    seen = runtime.observe(capture, "reconstruct")       # the model repeats the prefix
    prefix = runtime.compress(capture, "lava", 0.2, observation=seen)

A `CompressedPrefix` is never modified by answering: each call starts its own cache for
the request's tokens, which continue at position n (the original length), and attention
is (compressed prefix) merged by LSE with (own tokens), as on the server. Several prefixes
of the same sequence (different policies or budgets) run as one batch.

Works with Llama/Qwen2/Mistral-style models whose attention goes through transformers'
attention interface (post-RoPE queries and keys are captured there).
"""

from __future__ import annotations

import contextlib
import contextvars
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AttentionInterface, AutoModelForCausalLM, AutoTokenizer, DynamicCache

from lava_sglang.checks import is_int
from lava_sglang.policy import (Branches, CompressionPlan, LayerScores, Observe, ObservationWindow, PlanBuilder, Policy,
                                Reconstruct, Tail, assistant_turn_text, make_observe, make_policy,
                                repeat_attention_chunk, repeat_chunks, repeat_view_positions)
from lava_sglang.policy.plan import repeat_scores, windows_scores
from lava_sglang.reference.attention import attention_with_lse, causal_visibility, merge_attention_states

ATTENTION_NAME = "lava_reference"


@dataclass
class PrefixCapture:
    """What one prefill of a scored sequence leaves: per layer the window queries and the
    full keys and values (post-RoPE, batch dimension dropped), and the last logits."""

    token_ids: list[int]
    q_window: list[torch.Tensor]  # [Hq, w, d]
    keys: list[torch.Tensor]  # [Hkv, n, d]
    values: list[torch.Tensor]  # [Hkv, n, d]
    last_logits: torch.Tensor  # [vocab]

    @property
    def seq_len(self) -> int:
        return len(self.token_ids)


@dataclass
class Observation:
    """What an observation source saw of one capture, ready for `compress` (observe.md).

    branch_windows[layer]: one window per branch (observe "branches"); the tail window comes
    from the capture. repeat_attention[layer]: [Hq, n] over every prefix token (observe
    "reconstruct"); a policy with window w reads its first n - w.
    seconds: the model time the source added to the prefill (branch prefills, repetition).
    token_ids: the prefix it observed (`compress` refuses it for another one); None: any.
    """

    source: Observe
    branch_windows: list[list[ObservationWindow]] | None = None
    repeat_attention: list[torch.Tensor] | None = None
    seconds: float = 0.0
    token_ids: list[int] | None = None


def _check_observation(observation: object) -> None:
    """A ValueError unless `observation` is an `Observation` holding what its source needs."""
    if not isinstance(observation, Observation) or not isinstance(observation.source, Observe):
        raise ValueError(f"observation must be an Observation (`ReferenceRuntime.observe`), got {observation!r}"[:300])
    needed = {Branches: "branch_windows", Reconstruct: "repeat_attention"}.get(type(observation.source))
    if needed and getattr(observation, needed) is None:
        raise ValueError(f"an observation by {observation.source.name} needs its {needed}")


@dataclass
class CompressedPrefix:
    """A compressed KV cache: per layer the kept rows of every KV head, padded to the
    longest head, with the true lengths."""

    plan: CompressionPlan
    keys: list[torch.Tensor]  # [Hkv, longest, d]
    values: list[torch.Tensor]  # [Hkv, longest, d]
    lengths: torch.Tensor  # [layers, Hkv]
    last_logits: torch.Tensor  # logits after the last prefix token (full attention, at prefill)

    @property
    def seq_len(self) -> int:
        return self.plan.seq_len

    def kv_bytes(self, bytes_per_element: int) -> int:
        """Memory the kept K and V rows take at `bytes_per_element` (2 for a bf16 cache)."""
        head_dim = self.keys[0].shape[-1]
        return int(self.lengths.sum()) * 2 * head_dim * bytes_per_element

    @classmethod
    def from_plan(cls, capture: PrefixCapture, plan: CompressionPlan) -> "CompressedPrefix":
        keys, values = [], []
        for layer, kept in enumerate(plan.kept):
            longest = max(len(positions) for positions in kept)
            layer_keys = capture.keys[layer].new_zeros(len(kept), longest, capture.keys[layer].shape[-1])
            layer_values = capture.values[layer].new_zeros(len(kept), longest, capture.values[layer].shape[-1])
            for head, positions in enumerate(kept):
                layer_keys[head, : len(positions)] = capture.keys[layer][head, positions]
                layer_values[head, : len(positions)] = capture.values[layer][head, positions]
            keys.append(layer_keys)
            values.append(layer_values)
        return cls(plan=plan, keys=keys, values=values, lengths=plan.kept_lengths(),
                   last_logits=capture.last_logits)


@dataclass
class _Batch:
    """Compressed prefixes of one sequence stacked for a batched forward."""

    seq_len: int
    keys: list[torch.Tensor]  # [B, Hkv, longest, d]
    values: list[torch.Tensor]
    visible: list[torch.Tensor]  # [B, Hkv, longest] bool
    last_logits: torch.Tensor  # [B, vocab]

    @property
    def size(self) -> int:
        return self.last_logits.shape[0]

    @property
    def dense(self) -> bool:
        """Every row keeps every prefix position (the uncompressed prefix)."""
        return all(layer_keys.shape[2] == self.seq_len and bool(layer_visible.all())
                   for layer_keys, layer_visible in zip(self.keys, self.visible))

    def select(self, rows: torch.Tensor) -> "_Batch":
        """The given rows only, each layer's padding cut to their longest head."""
        keys, values, visible = [], [], []
        for layer_keys, layer_values, layer_visible in zip(self.keys, self.values, self.visible):
            layer_visible = layer_visible[rows]
            longest = int(layer_visible.sum(-1).max())
            keys.append(layer_keys[rows, :, :longest])
            values.append(layer_values[rows, :, :longest])
            visible.append(layer_visible[:, :, :longest])
        return _Batch(seq_len=self.seq_len, keys=keys, values=values, visible=visible,
                      last_logits=self.last_logits[rows])

    @classmethod
    def of_positions(cls, capture: PrefixCapture, positions: torch.Tensor) -> "_Batch":
        """One row holding only the given prefix positions of every (layer, KV head); what
        follows it still starts at position n."""
        keys = [layer_keys[:, positions][None] for layer_keys in capture.keys]
        values = [layer_values[:, positions][None] for layer_values in capture.values]
        visible = [torch.ones(layer_keys.shape[:3], dtype=torch.bool, device=layer_keys.device) for layer_keys in keys]
        return cls(seq_len=capture.seq_len, keys=keys, values=values, visible=visible,
                   last_logits=capture.last_logits[None])

    @classmethod
    def stack(cls, prefixes: Sequence[CompressedPrefix]) -> "_Batch":
        if not prefixes:
            raise ValueError("prefixes must not be empty")
        if len({prefix.seq_len for prefix in prefixes}) != 1:
            raise ValueError("prefixes in one batch must compress the same sequence length")
        keys, values, visible = [], [], []
        for layer in range(len(prefixes[0].keys)):
            longest = max(prefix.keys[layer].shape[1] for prefix in prefixes)
            pad = [longest - prefix.keys[layer].shape[1] for prefix in prefixes]
            keys.append(torch.stack([
                torch.nn.functional.pad(p.keys[layer], (0, 0, 0, n)) for p, n in zip(prefixes, pad)]))
            values.append(torch.stack([
                torch.nn.functional.pad(p.values[layer], (0, 0, 0, n)) for p, n in zip(prefixes, pad)]))
            lengths = torch.stack([prefix.lengths[layer] for prefix in prefixes])  # [B, Hkv]
            device = keys[-1].device  # the lengths may be on the host; the mask goes with the keys
            visible.append(torch.arange(longest, device=device)[None, None, :] < lengths.to(device)[:, :, None])
        return cls(seq_len=prefixes[0].seq_len, keys=keys, values=values, visible=visible,
                   last_logits=torch.stack([prefix.last_logits for prefix in prefixes]))


# What the registered attention function does for the forward in flight: capture the
# window (prefill) or attend over compressed prefixes (answering). A context variable
# keeps concurrent runtimes in different threads apart.
_active: contextvars.ContextVar[Callable | None] = contextvars.ContextVar("lava_reference_attention", default=None)


def _attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    handler = _active.get()
    if handler is None:
        raise RuntimeError(f"the '{ATTENTION_NAME}' attention runs only inside ReferenceRuntime calls")
    return handler(module, query, key, value, scaling), None


AttentionInterface.register(ATTENTION_NAME, _attention)


def _causal_attention(module, query, key, value, scaling):
    """An attention handler (`ReferenceRuntime._attending`): the model's own causal attention."""
    return torch.nn.functional.scaled_dot_product_attention(
        query, key, value, is_causal=True, scale=scaling, enable_gqa=True).transpose(1, 2)


def _grouped(query: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """[B, Hq, T, d] -> [B, Hkv, G, T, d] (query head g reads KV head g // G, as HF's repeat_kv)."""
    batch, num_q_heads, length, head_dim = query.shape
    return query.view(batch, num_kv_heads, num_q_heads // num_kv_heads, length, head_dim)


def _ungrouped(out: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[B, Hkv, G, T, d] -> [B, T, Hq, d], the layout HF's attention functions return."""
    batch, num_kv_heads, group, length, head_dim = out.shape
    return out.reshape(batch, num_kv_heads * group, length, head_dim).transpose(1, 2).to(dtype)


class ReferenceRuntime:
    """The model and tokenizer, and every step of compress once, answer many (the module's
    docstring). The runtime takes the model over: its attention is routed through the runtime
    from construction on, so the model no longer runs outside the runtime's calls."""

    def __init__(self, model, tokenizer, window: int = 32):
        if not is_int(window) or window < 1:  # the prefill keeps the last `window` queries: 0 would keep all
            raise ValueError(f"window must be an int >= 1, got {window!r}")
        model.config._attn_implementation = ATTENTION_NAME
        model.eval()
        self.model = model
        self.tokenizer = tokenizer
        self.window = window
        self.device = next(model.parameters()).device

    @classmethod
    def load(cls, path: str | Path | None = None, dtype: torch.dtype = torch.float32, window: int = 32):
        """Load a checkpoint (default: SmolLM2-135M-Instruct, converted on first use)."""
        if path is None:
            from lava_sglang.model import smollm2_path

            path = smollm2_path()
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa")
        return cls(model, tokenizer, window=window)

    @contextlib.contextmanager
    def _attending(self, handler: Callable) -> Iterator[None]:
        token = _active.set(handler)
        try:
            yield
        finally:
            _active.reset(token)

    @torch.inference_mode()
    def prefill(self, token_ids: Sequence[int]) -> PrefixCapture:
        """Run the sequence once with full attention and keep what compression needs."""
        token_ids = [int(t) for t in token_ids]
        if not token_ids:
            raise ValueError("token_ids must not be empty")
        window = min(self.window, len(token_ids))
        q_window, keys, values = [], [], []

        def capture(module, query, key, value, scaling):
            q_window.append(query[0, :, -window:].clone())
            keys.append(key[0].clone())
            values.append(value[0].clone())
            return _causal_attention(module, query, key, value, scaling)

        ids = torch.tensor([token_ids], device=self.device)
        with self._attending(capture):
            logits = self.model(input_ids=ids, use_cache=False, logits_to_keep=1).logits
        return PrefixCapture(token_ids=token_ids, q_window=q_window, keys=keys, values=values,
                             last_logits=logits[0, -1].float())

    @torch.inference_mode()
    def surprisal(self, token_ids: Sequence[int]) -> torch.Tensor:
        """[n] each token's -log p(x_t | x_<t) under a causal forward of the sequence, fp32 on
        the CPU; 0 for the first token (no context)."""
        if not token_ids:
            raise ValueError("token_ids must not be empty")

        ids = torch.tensor([[int(t) for t in token_ids]], device=self.device)
        with self._attending(_causal_attention):
            logits = self.model(input_ids=ids, use_cache=False).logits[0, :-1].float()
        log_probs = torch.log_softmax(logits, dim=-1).gather(1, ids[0, 1:, None])[:, 0]
        return torch.cat([log_probs.new_zeros(1), -log_probs]).cpu()

    def compress(self, capture: PrefixCapture, policy: str | Policy, budget: float | int,
                 observation: Observation | None = None, **options) -> CompressedPrefix:
        """Plan by the capture's window (or, given an observation, its source) and keep only the
        planned rows; the same plan as `compress_plan`. options: the policy's fields; the
        window defaults to the source's kept window, else the runtime's (`Observe.kept_window`)."""
        return self.compress_many(capture, [(policy, budget)], observation, **options)[0]

    def compress_many(self, capture: PrefixCapture, configs: Sequence[tuple[str | Policy, float | int]],
                      observation: Observation | None = None, **options) -> list[CompressedPrefix]:
        """`compress` for several (policy, budget) pairs of one capture, scoring each layer
        once per distinct scoring instead of once per pair (same plans as `compress`)."""
        if observation is not None:
            _check_observation(observation)
            if observation.token_ids not in (None, list(capture.token_ids)):
                raise ValueError("the observation was made of another prefix than this capture's")
        if options and any(isinstance(policy, Policy) for policy, _ in configs):
            raise ValueError(f"options {', '.join(sorted(options))} go with a policy's name; a built policy has its "
                             "own (they would be dropped)")
        source = observation.source if observation is not None else Tail()
        options.setdefault("window", source.kept_window or self.window)
        shared_scores: dict[tuple, list[LayerScores]] = {}
        prefixes = []
        for policy, budget in configs:
            if not isinstance(policy, Policy):
                policy = make_policy(policy, **options)
            builder = PlanBuilder(policy, budget, seq_len=capture.seq_len, num_layers=len(capture.keys),
                                  num_kv_heads=capture.keys[0].shape[0], observe=source)
            if builder.needs_queries:
                if policy.scoring not in shared_scores:
                    shared_scores[policy.scoring] = self._layer_scores(capture, policy, observation,
                                                                       builder.prefix_len)
                for layer_scores in shared_scores[policy.scoring]:
                    builder.add_layer_scores(layer_scores)
            else:  # a plan that reads no scores (streamingllm, full, a budget that keeps all)
                for keys in capture.keys:
                    builder.add_layer_scores(LayerScores(scores=keys.new_zeros(keys.shape[0], builder.prefix_len),
                                                         entropy=0.0))
            prefixes.append(CompressedPrefix.from_plan(capture, builder.finish()))
        return prefixes

    def _layer_scores(self, capture: PrefixCapture, policy: Policy, observation: Observation | None,
                      prefix_len: int) -> list[LayerScores]:
        layers = range(len(capture.keys))
        if observation is not None and isinstance(observation.source, Reconstruct):
            return [repeat_scores(policy, observation.repeat_attention[layer][:, :prefix_len], capture.values[layer])
                    for layer in layers]
        tail_queries = self._tail_queries(capture, policy)
        if observation is None or isinstance(observation.source, Tail):
            return [policy.layer_scores(q, k, v) for q, k, v in zip(tail_queries, capture.keys, capture.values)]
        return [windows_scores(policy, observation.source,
                               [ObservationWindow(tail_queries[layer])] + [
                                   ObservationWindow(self._last_queries(branch.queries, branch.own_keys.shape[1],
                                                                        policy), branch.own_keys)
                                   for branch in observation.branch_windows[layer]],
                               capture.keys[layer], capture.values[layer], prefix_len) for layer in layers]

    @classmethod
    def _tail_queries(cls, capture: PrefixCapture, policy: Policy) -> list[torch.Tensor]:
        """Per layer the captured window queries a policy's window reads: the last
        min(policy.window, n) of those the runtime captured."""
        return [cls._last_queries(queries, capture.seq_len, policy) for queries in capture.q_window]

    @staticmethod
    def _last_queries(queries: torch.Tensor, seq_len: int, policy: Policy) -> torch.Tensor:
        """The last min(policy.window, seq_len) of a window's captured queries [Hq, r, d], as
        the server's window of that size has them (a branch's too: observe.md's one w)."""
        rows = min(policy.window, seq_len)
        captured = queries.shape[1]
        if rows > captured:
            raise ValueError(f"{policy.name}'s window is {policy.window} tokens, but the capture holds {captured} "
                             f"window queries: make the runtime with window >= {policy.window}")
        return queries[:, captured - rows:]

    def full_prefix(self, capture: PrefixCapture) -> CompressedPrefix:
        """The uncompressed prefix (what branches and the repetition are prefilled against)."""
        return self.compress(capture, "full", 1.0)

    @torch.inference_mode()
    def observe(self, capture: PrefixCapture, source: str | Observe, branches: Sequence[Sequence[int]] = (),
                **options) -> Observation:
        """Run what observation source `source` needs beyond the prefill (observe.md).

        branches: token ids of each branch present at compression (observe "branches"); each
        is prefilled after the whole uncompressed prefix and contributes its last `window`
        queries and all its keys.
        """
        if not isinstance(source, (str, Observe)):
            raise ValueError(f"source must be an observation source's name or an Observe, got {source!r}")
        if options and not isinstance(source, str):
            raise ValueError(f"options {', '.join(sorted(options))} go with a source's name; {source.name} is built")
        source = make_observe(source, **options) if isinstance(source, str) else source
        source.validate()
        started = time.perf_counter()
        if isinstance(source, Branches):
            if not branches or not all(isinstance(branch, Sequence) and branch
                                       and all(is_int(token) for token in branch) for branch in branches):
                raise ValueError("observe 'branches' needs at least one branch, each a non-empty sequence of token ids")
            windows = self._branch_windows(capture, branches)
            return Observation(source, branch_windows=windows, seconds=time.perf_counter() - started,
                               token_ids=list(capture.token_ids))
        if isinstance(source, Reconstruct):
            repeat = self._repeat_attention(capture, source)
            return Observation(source, repeat_attention=repeat, seconds=time.perf_counter() - started,
                               token_ids=list(capture.token_ids))
        return Observation(source, token_ids=list(capture.token_ids))

    def _branch_windows(self, capture: PrefixCapture, branches) -> list[list[ObservationWindow]]:
        batch = _Batch.of_positions(capture, torch.arange(capture.seq_len))
        windows: list[list[ObservationWindow]] = [[] for _ in capture.keys]
        for branch in branches:
            def record(layer, query, key, scaling):
                rows = min(self.window, query.shape[3])
                queries = query[0, :, :, -rows:].flatten(0, 1)  # [Hq, r, d]
                windows[layer].append(ObservationWindow(queries.clone(), own_keys=key[0].clone()))

            self._forward(batch, torch.tensor([list(branch)]), record=record, logits_to_keep=1)
        return windows

    def _repeat_attention(self, capture: PrefixCapture, source: Reconstruct) -> list[torch.Tensor]:
        """Per layer [Hq, n]: the largest attention a repeating query pays each prefix token,
        the prefix repeated chunk by chunk (`Reconstruct.chunk_prompt`). Each chunk's
        repetition follows the whole prefix, scores only the tokens it copies, and is dropped
        before the next one, as on the server; under view "chunk" it attends only to the
        prefix's sinks and the tokens it copies (`repeat_view_positions`). (A plan reads its
        first m = n - window.) Unlike the server, which skips a chunk that copies only its
        window's tokens, every chunk is repeated, so that a policy with a smaller window can
        read the scores: the runtime's repetition cost can count one chunk more than the
        server's."""
        seq_len = capture.seq_len
        whole_prefix = _Batch.of_positions(capture, torch.arange(seq_len)) if source.view == "prefix" else None
        repeat: list[torch.Tensor | None] = [None] * len(capture.keys)

        def encode(text: str) -> list[int]:
            return self.tokenizer(text, add_special_tokens=False)["input_ids"]

        assistant_turn = assistant_turn_text(self.tokenizer.apply_chat_template) if source.chat_turn else ""

        for start, end in repeat_chunks(seq_len, source.chunk_tokens):
            # The keys the chunk sees, and where the copied ones are among them.
            if source.view == "chunk":  # the copied tokens are the view's last
                batch = _Batch.of_positions(capture, repeat_view_positions((start, end), source.sink_tokens))
                seen = batch.keys[0].shape[2]
                copied = (seen - (end - start), seen)
            else:
                batch, seen, copied = whole_prefix, seq_len, (start, end)

            def record(layer, query, key, scaling, batch=batch, seen=seen, copied=copied, start=start, end=end):
                keys = torch.cat([batch.keys[layer][0], key[0]], dim=1)  # [Hkv, seen + own, d]
                scores = repeat_attention_chunk(query[0].flatten(0, 1), keys, seen, seen, copied, scaling,
                                                source.normalize, source.sink_tokens)
                if repeat[layer] is None:
                    repeat[layer] = scores.new_zeros(scores.shape[0], seq_len)
                repeat[layer][:, start:end] = scores

            tokens = (source.chunk_prompt(capture.token_ids, start, encode, assistant_turn)
                      + capture.token_ids[start:end])
            self._forward(batch, torch.tensor([tokens]), record=record, logits_to_keep=1)
        return repeat

    @torch.inference_mode()
    def forward(self, prefixes: Sequence[CompressedPrefix], token_ids: torch.Tensor,
                cache: DynamicCache | None = None) -> tuple[torch.Tensor, DynamicCache]:
        """Logits of `token_ids` [B, T] (row b after prefix b), continuing `cache` if given."""
        return self._forward(_Batch.stack(prefixes), token_ids, cache)

    def _forward(self, batch: _Batch, token_ids: torch.Tensor, cache: DynamicCache | None = None,
                 record: Callable | None = None, logits_to_keep: int = 0) -> tuple[torch.Tensor, DynamicCache]:
        """`record(layer, query [B, Hkv, G, T, d], own keys [B, Hkv, S, d], scaling)`, if given,
        sees every layer's attention inputs.
        logits_to_keep: the last so many positions' logits (0: all; the LM head is a fifth of
        the model, so callers that read only the last logits save that much)."""
        if token_ids.shape[0] != batch.size:
            raise ValueError(f"token_ids has {token_ids.shape[0]} rows for {batch.size} prefixes")
        cache = cache if cache is not None else DynamicCache()
        start = batch.seq_len + cache.get_seq_length()
        positions = torch.arange(start, start + token_ids.shape[1], device=self.device).expand(token_ids.shape[0], -1)
        dense = batch.dense

        def attend(module, query, key, value, scaling):
            layer = module.layer_idx
            grouped = _grouped(query, key.shape[1])
            if record is not None:
                record(layer, grouped, key, scaling)
            own_visible = causal_visibility(query.shape[2], key.shape[2], query.device)
            if dense:  # an uncompressed prefix: one attention over prefix and own keys
                keys = torch.cat([batch.keys[layer], key], dim=2)
                values = torch.cat([batch.values[layer], value], dim=2)
                visible = torch.cat([own_visible.new_ones(query.shape[2], batch.seq_len), own_visible], dim=1)
                out = torch.nn.functional.scaled_dot_product_attention(
                    query.float(), keys.float(), values.float(), attn_mask=visible, scale=scaling, enable_gqa=True)
                return out.transpose(1, 2).to(query.dtype)
            prefix_visible = batch.visible[layer][:, :, None, None, :]
            out_prefix, lse_prefix = attention_with_lse(
                grouped, batch.keys[layer], batch.values[layer], prefix_visible, scaling)
            out_own, lse_own = attention_with_lse(grouped, key, value, own_visible, scaling)
            out, _ = merge_attention_states(out_prefix, lse_prefix, out_own, lse_own)
            return _ungrouped(out, query.dtype)

        with self._attending(attend):
            logits = self.model(input_ids=token_ids.to(self.device), position_ids=positions,
                                past_key_values=cache, use_cache=True, logits_to_keep=logits_to_keep).logits
        return logits.float(), cache

    @torch.inference_mode()
    def generate(self, prefixes: Sequence[CompressedPrefix], suffix_ids: Sequence[int],
                 max_new_tokens: int, stop_ids: Sequence[int] | None = None,
                 stop_when: Callable[[list[int]], bool] | None = None) -> list[list[int]]:
        """Greedy answers to the same suffix after each prefix (one batch).

        A row ends at a stop token (default: EOS, not included) or once `stop_when(tokens)`
        holds. An empty suffix continues straight from the prefix (the query-aware setting,
        where the question is part of the compressed sequence): the first token then comes
        from the prefill's own logits.
        """
        stop = set(stop_ids if stop_ids is not None else [self.tokenizer.eos_token_id])
        batch = _Batch.stack(prefixes)
        if suffix_ids:
            logits, cache = self._forward(batch, torch.tensor([list(suffix_ids)] * batch.size), logits_to_keep=1)
            next_logits = logits[:, -1]
        else:
            cache = DynamicCache()
            next_logits = batch.last_logits
        answers: list[list[int]] = [[] for _ in prefixes]
        running = list(range(len(prefixes)))  # answer index of each batch row still generating
        for step in range(max_new_tokens):
            next_ids = next_logits.argmax(dim=-1)
            keep = []
            for row, (answer_index, token) in enumerate(zip(running, next_ids.tolist())):
                if token in stop:
                    continue
                answers[answer_index].append(token)
                if stop_when is None or not stop_when(answers[answer_index]):
                    keep.append(row)
            if not keep or step == max_new_tokens - 1:
                break
            if len(keep) < len(running):  # finished rows leave the batch
                rows = torch.tensor(keep)
                batch, next_ids = batch.select(rows), next_ids[rows]
                for layer in cache.layers:
                    layer.batch_select_indices(rows)
                running = [running[row] for row in keep]
            logits, cache = self._forward(batch, next_ids[:, None], cache)
            next_logits = logits[:, -1]
        return answers

    @torch.inference_mode()
    def continuation_logits(self, prefixes: Sequence[CompressedPrefix], suffix_ids: Sequence[int],
                            continuation_ids: Sequence[int]) -> torch.Tensor:
        """Teacher forcing: [B, len(continuation), vocab] logits that predict each
        continuation token after `prefix + suffix + continuation[:i]`."""
        if not continuation_ids:
            raise ValueError("continuation_ids must not be empty")
        batch = _Batch.stack(prefixes)
        tokens = list(suffix_ids) + list(continuation_ids)[:-1]
        if not tokens:  # a one-token continuation right after the prefix
            return batch.last_logits[:, None]
        logits, _ = self._forward(batch, torch.tensor([tokens] * batch.size))
        if suffix_ids:
            return logits[:, len(suffix_ids) - 1 :]
        return torch.cat([batch.last_logits[:, None], logits], dim=1)
