"""The compression plan: which positions every (layer, KV head) keeps.

`compress_plan` is the one entry point the benchmarks, the SGLang plugin and outside users
call. `PlanBuilder` is its streaming form for prefill, layer by layer (the plugin feeds it
statistics as each layer's attention runs, or scores made by the Triton kernel), and gives
the same plan: `compress_plan` is implemented with it.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from lava_sglang.checks import is_int, is_number
from lava_sglang.policy import scores as score_ops
from lava_sglang.policy.allocation import decimal_fraction
from lava_sglang.policy.base import LayerScores, Policy
from lava_sglang.policy.observe import (Branches, Observe, ObservationWindow, Reconstruct, Tail,
                                        combine_window_masses, make_observe)
from lava_sglang.policy.registry import make_policy


@dataclass(frozen=True)
class CompressionPlan:
    """Positions kept per (layer, KV head), with the budgets that produced them.

    kept[layer][kv_head]: 1-D int64 positions in ascending order, the window included.
    layer_budgets[layer]: selectable (non-window) tokens per KV head the layer was given.
    head_budgets[layer][kv_head]: selectable tokens that head keeps.
    layer_entropy[layer]: normalised entropy of the layer's scores (nan when not scored).
    """

    policy: str
    seq_len: int
    window: int
    budget_tokens: int
    kept: list[list[torch.Tensor]]
    layer_budgets: list[int]
    head_budgets: list[list[int]]
    layer_entropy: list[float]

    @property
    def num_layers(self) -> int:
        return len(self.kept)

    @property
    def num_kv_heads(self) -> int:
        return len(self.kept[0])

    def kept_lengths(self) -> torch.Tensor:
        """[layers, kv_heads] int64: rows each (layer, KV head) keeps."""
        return torch.tensor([[len(positions) for positions in layer] for layer in self.kept], dtype=torch.int64)

    @property
    def kept_rows(self) -> int:
        """Kept K (or V) rows over all layers and KV heads."""
        return int(self.kept_lengths().sum())

    @property
    def keep_ratio(self) -> float:
        """Kept rows over the rows of the uncompressed cache."""
        return self.kept_rows / (self.num_layers * self.num_kv_heads * self.seq_len)


def resolve_budget(budget: float | int, seq_len: int) -> int:
    """Average tokens kept per layer and KV head (window included), per lava.md.

    A float in (0, 1] is a keep ratio, taken at its decimal value (0.2 of 2000 is 400, not
    401 from binary rounding; numpy's float32 0.2 too, by its own shortest decimal); an
    int >= 1 is a token count.
    """
    if isinstance(budget, bool) or not isinstance(budget, numbers.Real):
        raise ValueError(f"budget must be a float in (0, 1] or an int >= 1, got {budget!r}")
    if isinstance(budget, numbers.Integral):
        if budget < 1:
            raise ValueError(f"budget must be an int >= 1 when given in tokens, got {budget!r}")
        return int(budget)
    ratio = float(budget)
    if not math.isfinite(ratio) or not 0.0 < ratio <= 1.0:
        raise ValueError(f"budget must be a keep ratio in (0, 1] when given as a float, got {budget!r}")
    return math.ceil(decimal_fraction(budget) * seq_len)


def budget_evicts(budget: float | int, seq_len: int, window: int) -> bool:
    """Whether a plan of `seq_len` tokens under `budget` keeps fewer than all of them: the
    budget is below the length, and some token lies outside the recent window (which is always
    kept)."""
    return resolve_budget(budget, seq_len) < seq_len and seq_len > window


class PlanRefused(ValueError):
    """A plan refused once the scores are gathered: every tensor-parallel rank refuses it alike,
    so a caller can go on without compressing (the ranks' pools stay alike)."""


def _check_tensor(name: str, tensor: object, layer: int) -> torch.Tensor:
    if not isinstance(tensor, torch.Tensor) or tensor.dim() != 3:
        shape = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
        raise ValueError(f"{name}[{layer}] must be a 3-D tensor, got {shape}")
    if not torch.isfinite(tensor).all():
        raise ValueError(f"{name}[{layer}] contains non-finite values (nan or inf)")
    return tensor


def windows_scores(policy: Policy, observe: Observe, windows: Sequence[ObservationWindow], keys: torch.Tensor,
                   values: torch.Tensor, prefix_len: int,
                   gather_heads: Callable[[torch.Tensor], torch.Tensor] | None = None) -> LayerScores:
    """A layer's scores from its observation windows, combined per `observe` (observe.md).
    `gather_heads` (tensor parallel, `HeadShard.all_gather`) gives several windows' per-head
    totals of every rank, which their combination divides by."""
    if isinstance(observe, Branches) and not observe.include_tail:
        windows = [window for window in windows if not window.is_tail] or windows
    masses = [window.mass(keys, prefix_len, policy.gqa_reduce) for window in windows]
    combine = observe.combine if isinstance(observe, Branches) else "max"
    head_totals = None
    if gather_heads is not None and len(masses) > 1:
        own_totals = torch.stack([mass.sum(dim=-1) for mass in masses])[:, :, None]  # [W, Hkv_local, 1]
        head_totals = gather_heads(own_totals.contiguous())[..., 0]
    return policy.scores_from_mass(combine_window_masses(masses, combine, head_totals), values)


def repeat_scores(policy: Policy, repeat_attention: torch.Tensor, values: torch.Tensor) -> LayerScores:
    """A layer's scores from its repetition attention [Hq, m] (observe.md, "reconstruct")."""
    grouped = score_ops.group_query_heads(repeat_attention, values.shape[0])
    return policy.scores_from_mass(score_ops.reduce_query_group(grouped, policy.gqa_reduce), values)


@dataclass(frozen=True)
class HeadShard:
    """This process's share of the KV heads when they are split over ranks (tensor parallel):
    KV heads [rank * Hkv_local, (rank + 1) * Hkv_local) of the model's Hkv = world_size *
    Hkv_local, as SGLang splits them.

    all_gather: every rank's [L, Hkv_local, m] scores concatenated along dim 1 in rank order
    (SGLang's TP group all-gather); every rank calls it once per plan, with L * Hkv_local * m
    fp32 scores, so a document's plan exchanges L * Hkv * m * 4 bytes in all; and, under
    observe "branches" with more than one window, once per layer with the windows' [W,
    Hkv_local, 1] per-head totals, whose mean over all heads each window's votes divide by. The plan's
    `layer_entropy` is the gathered layers' where the policy reads it, the rank's own otherwise.
    """

    rank: int
    world_size: int
    all_gather: Callable[[torch.Tensor], torch.Tensor]

    def validate(self) -> None:
        for name, value in (("rank", self.rank), ("world_size", self.world_size)):
            if not is_int(value):
                raise ValueError(f"head_shard.{name} must be an int, got {value!r}")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"head_shard.rank must be in [0, {self.world_size}), got {self.rank}")

    @staticmethod
    def check_policy(policy: Policy) -> None:
        """Raise ValueError for a policy whose plan gathered scores cannot reproduce: LAVa's
        entropy layer budgets with sinks (the sinks' scores are forced to inf after the
        entropy is taken, so the gathered scores no longer give the entropy one process
        computes)."""
        if policy.uses_layer_entropy and getattr(policy, "sink_tokens", 0):
            raise ValueError(f"{policy.name}: entropy layer budgets with sink_tokens > 0 cannot be planned over "
                             f"sharded heads")


class PlanBuilder:
    """Builds a `CompressionPlan` one layer at a time.

    Layers arrive in order through one of (observe.md):
      `add_layer`          the tail window's queries, keys, values (observe="tail");
      `add_layer_windows`  several observation windows, combined per `observe`
                           ("tail": the tail window alone; "branches": tail and branches);
      `add_layer_repeat`   the prefix's attention from a repetition (observe="reconstruct");
      `add_layer_scores`   statistics computed elsewhere (e.g. the window-statistics kernel).
    `finish` allocates the budgets once every layer is in.

    With `head_shard` (tensor parallel), `num_kv_heads` is this rank's share and the layers
    carry only its heads' scores: `finish` gathers every rank's scores, allocates over all
    heads as one process would (the layer entropies recomputed from the gathered scores) and
    returns this rank's heads' rows, so every rank keeps exactly what the single-process plan
    keeps for its heads.
    """

    def __init__(self, policy: Policy, budget: float | int, *, seq_len: int, num_layers: int, num_kv_heads: int,
                 observe: Observe | str = "tail", head_shard: HeadShard | None = None):
        policy = make_policy(policy) if isinstance(policy, str) else policy
        if not isinstance(policy, Policy):
            raise ValueError(f"policy must be a policy name, a spec or a Policy, got {policy!r}")
        policy.validate()
        observe = make_observe(observe) if isinstance(observe, str) else observe
        if not isinstance(observe, Observe):
            raise ValueError(f"observe must be a source name or an Observe, got {observe!r}")
        observe.validate()
        self.observe = observe
        for name, value in (("seq_len", seq_len), ("num_layers", num_layers), ("num_kv_heads", num_kv_heads)):
            if not is_int(value) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        self.policy = policy
        self.seq_len = seq_len
        self.num_layers = num_layers
        self.num_kv_heads = num_kv_heads
        self.window = min(policy.window, seq_len)
        self.prefix_len = seq_len - self.window
        budget_tokens = resolve_budget(budget, seq_len)  # validated even where everything is kept
        self.budget_tokens = seq_len if policy.keeps_everything else budget_tokens
        self._layers: list[LayerScores | None] = []
        self._num_q_heads: int | None = None
        if head_shard is not None:
            head_shard.validate()
            head_shard.check_policy(policy)
        self.head_shard = head_shard

    @property
    def evicts(self) -> bool:
        """False when the plan keeps everything (budget >= n, n <= w or the full policy)."""
        return budget_evicts(self.budget_tokens, self.seq_len, self.window)  # budget_tokens: n for the full policy

    @property
    def needs_queries(self) -> bool:
        """Whether `add_layer` uses the window queries; callers may skip capturing them if not."""
        return self.policy.needs_scores and self.evicts

    def add_layer(self, q_window: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> None:
        layer = len(self._layers)
        self._check_room(layer)
        if isinstance(self.observe, Reconstruct):
            raise ValueError("observe 'reconstruct' scores by a repetition: use add_layer_repeat")
        keys, values = self._check_keys_values(layer, keys, values)
        q_window = self._check_queries(layer, q_window, keys, tail=True)
        self._layers.append(self.policy.layer_scores(q_window, keys, values) if self.needs_queries else None)

    def _check_keys_values(self, layer: int, keys, values) -> tuple[torch.Tensor, torch.Tensor]:
        return self._check_rows("keys", keys, layer), self._check_rows("values", values, layer)

    def _check_rows(self, name: str, rows, layer: int) -> torch.Tensor:
        """A layer's keys or values: [Hkv, n, d], finite."""
        rows = _check_tensor(name, rows, layer)
        if tuple(rows.shape[:2]) != (self.num_kv_heads, self.seq_len) or rows.shape[2] < 1:
            raise ValueError(f"{name}[{layer}] must be [Hkv={self.num_kv_heads}, n={self.seq_len}, d >= 1], "
                             f"got {tuple(rows.shape)}")
        return rows

    def _check_queries(self, layer: int, queries, keys: torch.Tensor, tail: bool) -> torch.Tensor:
        """Window queries [Hq, r, d]: r = w = min(window, n) for the tail, any r >= 1 for a branch."""
        queries = _check_tensor("q_window", queries, layer)
        num_q_heads, q_len, head_dim = queries.shape
        if num_q_heads < 1:  # a mean over no heads would score every token nan
            raise ValueError(f"q_window[{layer}] has no query heads, got {tuple(queries.shape)}")
        if num_q_heads % self.num_kv_heads:
            raise ValueError(f"q_window[{layer}] has Hq={num_q_heads}, not a multiple of Hkv={self.num_kv_heads}")
        if self._num_q_heads not in (None, num_q_heads):
            raise ValueError(f"q_window[{layer}] has Hq={num_q_heads}, earlier layers had {self._num_q_heads}")
        if (tail and q_len != self.window) or q_len < 1 or head_dim != keys.shape[2]:
            expected = f"w={self.window}" if tail else "r >= 1"
            raise ValueError(
                f"q_window[{layer}] must be [Hq, {expected}, d={keys.shape[2]}] "
                f"(w = min(window, n)), got {tuple(queries.shape)}"
            )
        self._num_q_heads = num_q_heads
        return queries

    def add_layer_windows(self, windows: Sequence[ObservationWindow], keys: torch.Tensor,
                          values: torch.Tensor) -> None:
        """Score the layer's selectable prefix by several windows, combined (observe.md).

        windows: the tail window (its queries [Hq, w, d], w = min(window, n)) and, with
        observe="branches", branch windows; keys, values: [Hkv, n, d] of the prefix.
        """
        layer = len(self._layers)
        self._check_room(layer)
        if not isinstance(self.observe, (Tail, Branches)):
            raise ValueError(f"add_layer_windows needs observe 'tail' or 'branches', not {self.observe.name!r}")
        if isinstance(windows, ObservationWindow) or not isinstance(windows, Sequence) or not windows:
            raise ValueError(f"windows[{layer}] must be a non-empty sequence of ObservationWindow")
        tails = [window for window in windows if window.is_tail]
        if isinstance(self.observe, Tail) and (len(windows) != 1 or not tails):
            raise ValueError(f"observe 'tail' takes exactly the tail window, got {len(windows)} window(s) "
                             f"with {len(tails)} tail window(s)")
        if len(tails) > 1:
            raise ValueError(f"windows[{layer}] has {len(tails)} tail windows; at most one")
        keys, values = self._check_keys_values(layer, keys, values)
        for window in windows:
            self._check_queries(layer, window.queries, keys, tail=window.is_tail)
            if not window.is_tail:
                own = _check_tensor("own_keys", window.own_keys, layer)
                if own.shape[0] != self.num_kv_heads or own.shape[2] != keys.shape[2] or \
                        own.shape[1] < window.queries.shape[1]:
                    raise ValueError(f"own_keys[{layer}] must be [Hkv={self.num_kv_heads}, s >= r="
                                     f"{window.queries.shape[1]}, d={keys.shape[2]}], got {tuple(own.shape)}")
        gather_heads = self.head_shard.all_gather if self.head_shard is not None else None
        self._layers.append(windows_scores(self.policy, self.observe, windows, keys, values, self.prefix_len,
                                           gather_heads) if self.needs_queries else None)

    def add_layer_repeat(self, repeat_attention: torch.Tensor, values: torch.Tensor) -> None:
        """Score the layer by the attention a repetition of the prefix pays it (observe.md).

        repeat_attention: [Hq, m] fp32, per query head the largest attention any repetition
        query paid each selectable prefix token (`repeat_attention_max`, over all chunks);
        values: [Hkv, n, d] of the prefix.
        """
        layer = len(self._layers)
        self._check_room(layer)
        if not isinstance(self.observe, Reconstruct):
            raise ValueError(f"add_layer_repeat needs observe 'reconstruct', not {self.observe.name!r}")
        if not isinstance(repeat_attention, torch.Tensor) or repeat_attention.dim() != 2:
            shape = tuple(repeat_attention.shape) if isinstance(repeat_attention, torch.Tensor) else \
                type(repeat_attention).__name__
            raise ValueError(f"repeat_attention[{layer}] must be a 2-D tensor [Hq, m], got {shape}")
        repeat_attention = _check_tensor("repeat_attention", repeat_attention[None], layer)[0]
        num_q_heads = repeat_attention.shape[0]
        if num_q_heads < 1 or num_q_heads % self.num_kv_heads or repeat_attention.shape[1] != self.prefix_len:
            raise ValueError(f"repeat_attention[{layer}] must be [Hq (a positive multiple of Hkv={self.num_kv_heads}), "
                             f"m={self.prefix_len}], got {tuple(repeat_attention.shape)}")
        values = self._check_rows("values", values, layer)
        self._layers.append(repeat_scores(self.policy, repeat_attention, values) if self.needs_queries else None)

    def add_layer_scores(self, layer_scores: LayerScores) -> None:
        layer = len(self._layers)
        self._check_room(layer)
        if not isinstance(layer_scores, LayerScores):
            raise ValueError("add_layer_scores takes a LayerScores(scores, entropy), "
                             f"got {type(layer_scores).__name__}")
        expected = (self.num_kv_heads, self.prefix_len)
        if tuple(layer_scores.scores.shape) != expected:
            raise ValueError(f"scores of layer {layer} must be [Hkv, m] = {list(expected)}, "
                             f"got {list(layer_scores.scores.shape)}")
        # nan would sort above every score (and +inf, the forced sinks); -inf below the window
        if torch.isnan(layer_scores.scores).any() or torch.isneginf(layer_scores.scores).any():
            raise ValueError(f"scores of layer {layer} contain nan or -inf")
        # A normalised entropy (scores.layer_entropy) is in [0, 1]; a negative one would give its
        # layer a negative budget and the others more than the whole.
        entropy = layer_scores.entropy
        if self.policy.uses_layer_entropy:
            if not (is_number(entropy) and 0.0 <= entropy <= 1.0):
                raise ValueError(f"the entropy of layer {layer} is {entropy!r}, not a normalised entropy in [0, 1]")
            # a numpy float as a Python one, which the budgets' exact fractions take
            layer_scores = LayerScores(layer_scores.scores, float(entropy))
        self._layers.append(layer_scores if self.needs_queries else None)

    def _check_room(self, layer: int) -> None:
        if layer >= self.num_layers:
            raise ValueError(f"got more layers than num_layers={self.num_layers}")

    def finish(self) -> CompressionPlan:
        if len(self._layers) != self.num_layers:
            raise ValueError(f"got {len(self._layers)} layers, expected num_layers={self.num_layers}")
        entropies = [layer.entropy if layer is not None else math.nan for layer in self._layers]
        if not self.evicts:
            everything = torch.arange(self.seq_len)
            return self._plan(
                kept=[[everything] * self.num_kv_heads for _ in range(self.num_layers)],
                layer_budgets=[self.prefix_len] * self.num_layers,
                head_budgets=[[self.prefix_len] * self.num_kv_heads for _ in range(self.num_layers)],
                entropies=entropies,
            )
        selectable = max(self.budget_tokens - self.window, 0)
        scores = torch.stack([layer.scores for layer in self._layers]) if self.needs_queries else None
        num_kv_heads, own_heads = self.num_kv_heads, slice(None)
        if self.head_shard is not None:
            num_kv_heads = self.num_kv_heads * self.head_shard.world_size
            own_heads = slice(self.head_shard.rank * self.num_kv_heads, (self.head_shard.rank + 1) * self.num_kv_heads)
            if scores is not None:
                scores = self._gathered(scores)
                if self.policy.uses_layer_entropy:
                    entropies = [score_ops.layer_entropy(layer) for layer in scores]
        # Scores computed here from finite inputs can still overflow fp32 (a key of 1e30), and a
        # nan sorts above every score. Checked once gathered, so that every rank refuses alike.
        if scores is not None and torch.isnan(scores).any():
            raise PlanRefused("the scores computed from the observation contain nan (an overflow of the queries, "
                             "keys or values)")
        layer_budgets, head_budgets = self.policy.allocate(scores, entropies, selectable * self.num_layers,
                                                           self.prefix_len, num_kv_heads)
        head_budgets = [heads[own_heads] for heads in head_budgets]
        kept = self._kept_positions(scores[:, own_heads] if scores is not None else None, head_budgets)
        return self._plan(kept=kept, layer_budgets=layer_budgets, head_budgets=head_budgets, entropies=entropies)

    def _gathered(self, scores: torch.Tensor) -> torch.Tensor:
        """Every rank's scores [L, Hkv, m], from this rank's [L, Hkv_local, m]."""
        gathered = self.head_shard.all_gather(scores.contiguous())
        expected = (self.num_layers, self.num_kv_heads * self.head_shard.world_size, self.prefix_len)
        if not isinstance(gathered, torch.Tensor) or tuple(gathered.shape) != expected:
            shape = tuple(gathered.shape) if isinstance(gathered, torch.Tensor) else type(gathered).__name__
            raise ValueError(f"head_shard.all_gather must return every rank's scores {list(expected)}, got {shape}")
        return gathered

    def _kept_positions(self, scores: torch.Tensor | None, head_budgets: list[list[int]]) -> list[list[torch.Tensor]]:
        """Per (layer, KV head) the kept positions, ascending, the window included: one
        selection for all layers and heads on the scores' device, one copy to the host."""
        device = scores.device if scores is not None else torch.device("cpu")
        budgets = torch.tensor(head_budgets, dtype=torch.int64, device=device)
        prefix_kept = self.policy.keep_mask(scores, budgets, self.prefix_len)
        window_kept = prefix_kept.new_ones((self.num_layers, self.num_kv_heads, self.window))
        kept_mask = torch.cat([prefix_kept, window_kept], dim=-1).cpu()
        positions = kept_mask.nonzero()[:, 2]  # row-major: grouped by (layer, head), ascending
        per_head = positions.split(kept_mask.sum(dim=-1).flatten().tolist())
        return [list(per_head[layer * self.num_kv_heads:(layer + 1) * self.num_kv_heads])
                for layer in range(self.num_layers)]

    def _plan(self, *, kept, layer_budgets, head_budgets, entropies) -> CompressionPlan:
        return CompressionPlan(
            policy=self.policy.name, seq_len=self.seq_len, window=self.window, budget_tokens=self.budget_tokens,
            kept=kept, layer_budgets=layer_budgets, head_budgets=head_budgets, layer_entropy=entropies,
        )


def compress_plan(
    policy: str | Policy,
    q_window: Sequence[torch.Tensor],
    keys: Sequence[torch.Tensor],
    values: Sequence[torch.Tensor],
    budget: float | int,
    *,
    window: int = 32,
    pool_kernel: int | None = None,
    alpha: float | None = None,
) -> CompressionPlan:
    """Plan which tokens each layer and KV head keeps (lava.md).

    policy: a registered name ("lava", "kvzip", "snapkv", "ada_snapkv", "pyramidkv",
        "streamingllm", "full"), a spec with options ("lava:layer_budget=global"), or a `Policy`
        instance (then `window`, `pool_kernel`, `alpha` are its own); `pool_kernel` and `alpha`
        default to the policy's own (lava: 1 and 0.2, `PAPER_SPEC` 7; the SnapKV family pools
        with 7; kvzip does not pool).
    q_window: per layer, [Hq, w, d] post-RoPE queries of the last w = min(window, n) tokens.
    keys, values: per layer, [Hkv, n, d] post-RoPE keys and the values.
    budget: keep ratio in (0, 1] (float) or average tokens per layer and KV head (int),
        window included.
    Raises ValueError naming the offending argument.
    """
    if not isinstance(policy, Policy):
        policy = make_policy(policy, window=window, pool_kernel=pool_kernel, alpha=alpha)  # None: the policy's own
    lists = {"q_window": q_window, "keys": keys, "values": values}
    for name, value in lists.items():
        if isinstance(value, torch.Tensor) or not isinstance(value, Sequence) or len(value) == 0:
            raise ValueError(f"{name} must be a non-empty sequence of per-layer tensors, got {type(value).__name__}")
    lengths = {name: len(value) for name, value in lists.items()}
    if len(set(lengths.values())) != 1:
        raise ValueError(f"q_window, keys and values must have one entry per layer, got {lengths}")
    first_keys = _check_tensor("keys", keys[0], 0)
    builder = PlanBuilder(
        policy, budget, seq_len=first_keys.shape[1], num_layers=len(keys), num_kv_heads=first_keys.shape[0],
    )
    for layer_q, layer_keys, layer_values in zip(q_window, keys, values):
        builder.add_layer(layer_q, layer_keys, layer_values)
    return builder.finish()
