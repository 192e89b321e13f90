"""Observation sources: whose attention scores the prefix (observe.md).

`tail` is lava.md's window (the prefix's own last w tokens). `branches` adds one window per
forked branch (the branch's last tokens, prefilled after the whole prefix) and combines the
windows into one attention mass per (layer, KV head, prefix token). `reconstruct` is
query-agnostic: the attention prefix tokens receive while the model is teacher-forced to
repeat the prefix (KVzip, arXiv 2505.23416). Every source yields an attention mass [Hkv, m];
pooling, the value-norm scale and LAVa's head and layer allocation follow unchanged.

Torch only: the model-side work (prefilling branches, running the repetition) is the
caller's (the reference runtime, the server); this module says what to feed the plan.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch

from lava_sglang.checks import check_bool, is_int
from lava_sglang.kernels.attention_states import flash_attention_with_lse

from lava_sglang.policy import scores as score_ops
from lava_sglang.policy.specs import build

WINDOW_COMBINES = ("max", "mean")
REPEAT_NORMALIZATIONS = ("global", "local")
REPEAT_VIEWS = ("prefix", "chunk")


@dataclass(frozen=True)
class ObservationWindow:
    """Queries whose attention scores the prefix, with what they see.

    queries: [Hq, r, d] post-RoPE.
    own_keys: None for the tail window (the queries are the prefix's own last r tokens, causal
        among themselves). For a branch window, [Hkv, s, d] post-RoPE keys of the branch's own
        s >= r tokens, of which the queries are the last r: they see the whole prefix and their
        own tokens causally.
    """

    queries: torch.Tensor
    own_keys: torch.Tensor | None = None

    @property
    def is_tail(self) -> bool:
        return self.own_keys is None

    def mass(self, keys: torch.Tensor, prefix_len: int, gqa_reduce: str) -> torch.Tensor:
        """Mean attention the window pays each of the first `prefix_len` prefix keys: [Hkv, m]."""
        if self.is_tail:
            return score_ops.window_attention_mass(self.queries, keys, gqa_reduce)[:, :prefix_len]
        return score_ops.prefix_attention_mass(self.queries, keys, self.own_keys, prefix_len, gqa_reduce)


def combine_window_masses(masses: Sequence[torch.Tensor], combine: str,
                          head_totals: torch.Tensor | None = None) -> torch.Tensor:
    """One mass [Hkv, m] from several windows' masses (observe.md, "Combining windows").

    Each window's mass is first divided by its average per-head total over the prefix, so
    every window casts an equal vote whatever share of its attention stays outside the
    selectable prefix (a tail window spends most of it on itself, a branch on the prefix);
    the ratio between the heads of one window is kept. Then "max" keeps, per (head, token),
    the strongest vote (a fact one branch needs survives however many branches ignore it);
    "mean" averages the votes. A single window's mass is returned as it is: there is no
    vote to balance, and a per-layer scalar would change a plan whose budget is one
    threshold over every layer. `head_totals` ([W, Hkv]: each window's total per KV head, of
    all the model's heads) is given where `masses` hold only some heads (tensor parallel), so
    every rank divides by the average over all of them, as one process does.
    """
    if combine not in WINDOW_COMBINES:
        raise ValueError(f"combine must be one of {list(WINDOW_COMBINES)}, got {combine!r}")
    if not masses:
        raise ValueError("masses must not be empty")
    if len(masses) == 1:
        return masses[0]
    if head_totals is None:
        head_totals = torch.stack([mass.sum(dim=-1) for mass in masses])
    elif head_totals.dim() != 2 or head_totals.shape[0] != len(masses):  # zip would drop the extra windows
        raise ValueError(f"head_totals must be [W = {len(masses)} windows, Hkv], got {list(head_totals.shape)}")
    normalised = []
    for mass, total in zip(masses, head_totals.mean(dim=-1).tolist()):
        normalised.append(mass / total if total > 0 else mass)
    stacked = torch.stack(normalised)
    return stacked.amax(dim=0) if combine == "max" else stacked.mean(dim=0)


def repeat_attention_max(log_probs: torch.Tensor) -> torch.Tensor:
    """[Hq, T, m] log-attention of T repetition queries on the prefix -> [Hq, m] attention,
    max over queries.

    KVzip scores a context token by the largest attention any repeating query pays it: each
    token is needed by (mostly) one query, the one that copies it, so a mean would dilute it
    by the prefix length. Chunks of the repetition combine with `torch.maximum`. exp is
    monotone, so it is taken after the max, on m values per head instead of T x m.
    """
    return log_probs.float().amax(dim=1).exp_()


def repeat_attention_chunk(queries: torch.Tensor, keys: torch.Tensor, first_position: int, prefix_len: int,
                           copied: tuple[int, int], scaling: float, normalize: str = "global", sink_tokens: int = 0,
                           max_logits: int = 1 << 24, lse: torch.Tensor | None = None) -> torch.Tensor:
    """[Hq, end - start]: per query head, the largest attention any query of a repetition
    chunk pays each prefix token the chunk copies (`copied` = (start, end), prefix positions).

    queries: [Hq, T, d] post-RoPE, at positions first_position .. first_position + T - 1
    (first_position >= prefix_len: the repetition follows the whole prefix);
    keys: [Hkv, S, d] post-RoPE at positions 0 .. S - 1: the prefix (0 .. prefix_len - 1),
    then the repetition's own tokens up to the chunk's end (under view "chunk" the reference
    runtime passes the view's keys packed, positions counted within them). Query t sees the keys up to its
    own position. `normalize` says over which keys each query's softmax runs:
      "global"  every key it sees (the attention the model computes);
      "local"   KVzip's: the first `sink_tokens` prefix tokens, the copied tokens and the
                repetition's own tokens up to itself.
    The softmax's normaliser (the log-sum-exp over those keys, `repeat_log_sum_exp`) is
    taken once, or given: `lse` [Hq, T], under "global" the LSE of the model's own attention
    for these queries; then only the copied keys' logits are formed, q.k * scaling - lse,
    fp32 (exp taken after the max over queries), in blocks of query rows so that at most
    `max_logits` logits exist at once.
    """
    num_q_heads, num_rows, head_dim = queries.shape
    num_kv_heads, num_keys, _ = keys.shape
    start, end = copied
    if num_q_heads % num_kv_heads or keys.shape[2] != head_dim:
        raise ValueError(f"queries {tuple(queries.shape)} and keys {tuple(keys.shape)} do not match (GQA)")
    if num_rows < 1:  # a copied token's score is a max over the repetition's queries
        raise ValueError(f"queries must hold at least one repetition query, got {tuple(queries.shape)}")
    if not 0 <= start < end <= prefix_len <= first_position or first_position + num_rows > num_keys:
        raise ValueError(f"need 0 <= start ({start}) < end ({end}) <= prefix_len ({prefix_len}) <= first_position "
                         f"({first_position}) and first_position + T ({first_position + num_rows}) <= S ({num_keys})")
    if normalize not in REPEAT_NORMALIZATIONS:
        raise ValueError(f"normalize must be one of {list(REPEAT_NORMALIZATIONS)}, got {normalize!r}")
    if lse is not None and (normalize != "global" or lse.shape != (num_q_heads, num_rows)):
        raise ValueError(f"a given lse is the global normaliser [Hq, T] = {[num_q_heads, num_rows]}, got "
                         f"{list(lse.shape)} under normalize={normalize!r}")
    grouped = score_ops.group_query_heads(queries, num_kv_heads)
    if lse is not None:
        lse = score_ops.group_query_heads(lse, num_kv_heads)
    else:
        key_positions = torch.arange(num_keys, device=keys.device)
        normalizing = torch.ones(num_keys, dtype=torch.bool, device=keys.device)
        if normalize == "local":  # only the sinks, the copied tokens and the repetition take part
            normalizing = (key_positions < sink_tokens) | ((key_positions >= start) & (key_positions < end)) | (
                key_positions >= prefix_len)
        query_positions = first_position + torch.arange(num_rows, device=keys.device)
        visible = key_positions[normalizing][None, :] <= query_positions[:, None]  # [T, keys normalising]
        lse = repeat_log_sum_exp(grouped, keys[:, normalizing].float(), visible, scaling, max_logits)
    copied_keys = keys[:, start:end].float()  # before every repetition query: all visible
    rows_per_block = max(1, max_logits // (num_q_heads * (end - start)))
    result = None
    for block_start in range(0, num_rows, rows_per_block):
        rows = slice(block_start, block_start + rows_per_block)
        log_probs = torch.einsum("hgtd,hsd->hgts", grouped[:, :, rows], copied_keys)
        log_probs.mul_(scaling).sub_(lse[:, :, rows, None])
        block_max = repeat_attention_max(log_probs.flatten(0, 1))  # [Hq, rows, end - start] -> [Hq, end - start]
        result = block_max if result is None else torch.maximum(result, block_max)
    return result


def repeat_log_sum_exp(grouped_queries: torch.Tensor, keys: torch.Tensor, visible: torch.Tensor, scaling: float,
                       max_logits: int = 1 << 24) -> torch.Tensor:
    """[Hkv, G, T]: log-sum-exp over the visible keys of each query's scaled logits, fp32.

    grouped_queries [Hkv, G, T, d], keys [Hkv, S, d], visible [T, S] (every row sees a key).
    On the CPU in fp32, PyTorch's flash-attention kernel gives it (`flash_attention_with_lse`);
    elsewhere the logits are formed in row blocks.
    """
    num_kv_heads, group, num_rows, _ = grouped_queries.shape
    if num_rows < 1 or keys.shape[1] < 1:  # a softmax over no key has no normaliser
        raise ValueError(f"need at least one query and one key, got queries {tuple(grouped_queries.shape)} and "
                         f"keys {tuple(keys.shape)}")
    flash = flash_attention_with_lse(grouped_queries, keys, keys, visible, scaling)
    if flash is not None:
        return flash[1]
    rows_per_block = max(1, max_logits // (num_kv_heads * group * keys.shape[1]))
    blocks = []
    for block_start in range(0, num_rows, rows_per_block):
        rows = slice(block_start, block_start + rows_per_block)
        logits = torch.einsum("hgtd,hsd->hgts", grouped_queries[:, :, rows], keys) * scaling
        blocks.append(torch.logsumexp(logits.masked_fill(~visible[rows], float("-inf")), dim=-1))
    return torch.cat(blocks, dim=2)


def repeat_chunks(prefix_len: int, chunk_tokens: int) -> list[tuple[int, int]]:
    """The (start, end) prefix positions each repetition chunk copies, in order."""
    return [(start, min(start + chunk_tokens, prefix_len)) for start in range(0, prefix_len, chunk_tokens)]


def repeat_view_positions(copied: tuple[int, int], sink_tokens: int) -> torch.Tensor:
    """The prefix positions a repetition chunk attends to under view "chunk": the first
    `sink_tokens` and the ones it copies (`copied` = (start, end)), ascending, int64."""
    start, end = copied
    return torch.cat([torch.arange(min(sink_tokens, start)), torch.arange(start, end)])


@dataclass(frozen=True)
class Observe:
    """Base of the observation sources; hyper-parameters are dataclass fields."""

    name: ClassVar[str]
    #: The recent window a policy keeps by default when this source scores the prefix; None:
    #: the observation window (the runtime's), whose queries are the scores.
    kept_window: ClassVar[int | None] = None

    def validate(self) -> None:
        """Raise ValueError naming the hyper-parameter that is out of range."""


@dataclass(frozen=True)
class Tail(Observe):
    """lava.md's window: the last w tokens of the prefix."""

    name: ClassVar[str] = "tail"


@dataclass(frozen=True)
class Branches(Observe):
    """The tail window plus one window per branch present at compression, combined."""

    name: ClassVar[str] = "branches"

    combine: str = "max"
    #: The tail window votes too: it keeps what the prefix's own continuation needs, which a
    #: later question may need and no present branch asked for. False: the branches alone,
    #: and the tail where none arrived (a prefix compressed at its wait's end with no branch).
    include_tail: bool = True

    def validate(self) -> None:
        if self.combine not in WINDOW_COMBINES:
            raise ValueError(f"combine must be one of {list(WINDOW_COMBINES)}, got {self.combine!r}")
        check_bool("include_tail", self.include_tail)


@dataclass(frozen=True)
class Reconstruct(Observe):
    """Attention received while the model repeats the prefix after an instruction to do so,
    chunk by chunk as KVzip does (docs/observe.md, "reconstruct")."""

    name: ClassVar[str] = "reconstruct"
    #: The repetition scores every token, so the window is only kept, out of the budget: 8
    #: answered more than 32 over three sets of 1K and 2K-token documents (docs/allocation.md,
    #: "The window").
    kept_window: ClassVar[int | None] = 8

    #: Said after the prefix, before its first chunk is fed again (teacher-forced).
    instruction: str = "\n\nRepeat the previous context exactly.\n"
    #: Said before every later chunk, followed by the previous chunk's last `overlap_tokens`.
    continue_instruction: str = "\n\nRepeat the part of the previous context exactly, starting with "
    overlap_tokens: int = 8
    #: Prefix tokens per repetition chunk: the extra KV while scoring is one chunk and its
    #: instruction, never the prefix twice. 512 kept as much as 256 or more on 1K and 2K-token
    #: documents (80 questions each, docs/results/reuse/chunk512), and as much as 1,024
    #: (docs/results/reuse/chunk1024) with half the extra KV.
    chunk_tokens: int = 512
    #: Over which keys a repetition query's softmax is taken (`repeat_attention_chunk`).
    normalize: str = "global"
    #: Prefix tokens every chunk's local softmax includes (normalize "local"), and its view
    #: "chunk".
    sink_tokens: int = 4
    #: What each chunk's repetition attends to besides its own tokens: "prefix", the whole
    #: prefix (KVzip's); "chunk", the first `sink_tokens` prefix tokens and those it copies
    #: (`repeat_view_positions`), so that the repetition's attention stops growing with the
    #: prefix. Under "chunk" the global softmax is the local one.
    view: str = "prefix"
    #: Repeat each chunk as the assistant's reply: the chat template's end of the user turn and
    #: start of the assistant's follow the instruction (KVzip's prompt; `assistant_turn_text`).
    #: It kept more of what later questions need than the instruction alone
    #: (docs/results/reuse/prompt).
    chat_turn: bool = True

    def validate(self) -> None:
        for name in ("instruction", "continue_instruction"):
            if not isinstance(getattr(self, name), str):
                raise ValueError(f"{name} must be a str, got {getattr(self, name)!r}")
        for name, minimum in (("chunk_tokens", 1), ("overlap_tokens", 0), ("sink_tokens", 0)):
            value = getattr(self, name)
            if not is_int(value) or value < minimum:
                raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
        if self.normalize not in REPEAT_NORMALIZATIONS:
            raise ValueError(f"normalize must be one of {list(REPEAT_NORMALIZATIONS)}, got {self.normalize!r}")
        if self.view not in REPEAT_VIEWS:
            raise ValueError(f"view must be one of {list(REPEAT_VIEWS)}, got {self.view!r}")
        if self.view == "chunk" and self.chunk_tokens < self.sink_tokens:  # else the first chunk's view cuts the sinks
            raise ValueError(f"view 'chunk' needs chunk_tokens >= sink_tokens ({self.sink_tokens}), "
                             f"got {self.chunk_tokens}")
        check_bool("chat_turn", self.chat_turn)

    def chunk_prompt(self, tokens: Sequence[int], start: int, encode, assistant_turn: str = "") -> list[int]:
        """What precedes the repetition of the chunk starting at prefix position `start`:
        the instruction, or for a later chunk the continue instruction and the previous
        chunk's last tokens; with `chat_turn`, then `assistant_turn` (the chat template's
        text between a user message and the reply, `assistant_turn_text`).
        encode: text -> token ids (no special tokens added; a special token's text maps to it)."""
        if start == 0:
            prompt = list(encode(self.instruction))
        else:
            prompt = list(encode(self.continue_instruction)) + list(tokens[max(0, start - self.overlap_tokens):start])
        if self.chat_turn:
            if not assistant_turn:
                raise ValueError("reconstruct:chat_turn=true needs the tokenizer's chat template (assistant_turn_text)")
            prompt += list(encode(assistant_turn))
        return prompt


def assistant_turn_text(apply_chat_template: Callable) -> str:
    """The text a chat template puts between a user message and the assistant's reply
    (e.g. "<|im_end|>\n<|im_start|>assistant\n"), found as kvpress does: render a user
    message ending in a marker with the generation prompt, and take what follows the marker.
    apply_chat_template: an HF tokenizer's. Raises ValueError without a usable chat template."""
    marker = "\n" + "#" * 16
    try:
        text = apply_chat_template([{"role": "user", "content": "context" + marker}], add_generation_prompt=True,
                                   tokenize=False)
    except Exception as error:  # HF: ValueError without a template; a template's own raise_exception: jinja2's
        raise ValueError(f"the tokenizer has no usable chat template: {error}") from error
    if not isinstance(text, str) or marker not in text:
        raise ValueError("the chat template does not render the user message as given")
    turn = text.split(marker, 1)[1]
    if not turn:
        raise ValueError("the chat template puts nothing between a user message and the reply")
    return turn


OBSERVE_SOURCES: dict[str, type[Observe]] = {cls.name: cls for cls in (Tail, Branches, Reconstruct)}


def make_observe(name: str, **options) -> Observe:
    """Build observation source `name` (or a spec, `reconstruct:normalize=local`) with the
    options it has as fields (another source's ignored, one no source has refused; the spec's
    own win)."""
    return build(name, OBSERVE_SOURCES, "observe", options)
