"""Quality benchmark: what answer quality compression costs on a real model (CPU).

Tasks
  retrieval  documents with K planted facts "The special code for <key> is <7 digits>.";
             every key is its own question; correct = the greedy answer names the code
             (a longer number holding its digits does not).
  fidelity   open questions; per answer token KL(full || compressed) and top-1 agreement
             with the full-cache answer, teacher-forced on that answer.
Modes
  compress_once  the document is compressed once, then every question is answered against
                 that same compressed cache; what scores the document is the observation
                 source (docs/observe.md): `tail` (its last tokens), `branches` (the tail and
                 the questions present at compression), `reconstruct` (a repetition of it);
  query_aware    the question is appended before scoring; one compression per question.
Splits
  A document's first half of questions are `at_compression`: their branches exist when the
  document is compressed, so `branches` sees them; the rest are `later`, asked of the
  compressed document afterwards. The middle questions of documents with an odd count go to
  `at_compression` and `later` in turn (before 2026-12-06 always to `at_compression`, which
  gave it every one-question document). Records carry both splits and `all`.
  Retrieval questions are shuffled per document (seeded) first, so neither split is tied to
  where its facts sit in the document.

Every configuration (observe x policy x keep ratio) of a question runs in one batch of the
reference runtime, so all of them see exactly the same documents and questions.
"""

from __future__ import annotations

import itertools
import json
import math
import platform
import random
import time
from collections import defaultdict
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from lava_sglang.argtypes import COMPRESSING_POLICIES, QUALITY_WINDOW, replace_file
from lava_sglang.bench import code_revision
from lava_sglang.bench.documents import (MAX_FACTS, RETRIEVAL_ANSWER_TOKENS, Document, code_finished,
                                         fidelity_documents, names_code, prompt_parts, retrieval_documents)
from lava_sglang.bench.stats import mean_interval, wilson_interval
from lava_sglang.policy import POLICIES, WINDOW_COMBINES, make_observe, make_policy, policy_name, spec_of
from lava_sglang.reference import CompressedPrefix, ReferenceRuntime

TASKS = ("retrieval", "fidelity")
MODES = ("compress_once", "query_aware")
SPLITS = ("at_compression", "later")
FIDELITY_QUESTIONS_PER_DOCUMENT = 4


class ConfigFieldError(ValueError):
    """A `QualityConfig` field that cannot run, named (the CLI names its flag instead)."""

    def __init__(self, field_name: str, message: str):
        super().__init__(f"{field_name}: {message}")
        self.field_name = field_name
        self.message = message


@contextmanager
def _naming(field_name: str, spec: str):
    """A policy or source spec whose options are refused, named with its field."""
    try:
        yield
    except ValueError as error:  # the spec's own checks name it already
        raise ConfigFieldError(field_name, str(error) if repr(spec) in str(error) else f"{spec}: {error}") from None


@dataclass
class QualityConfig:
    contexts: list[int] = field(default_factory=lambda: [2048, 4096])
    questions: list[int] = field(default_factory=lambda: [40, 12])  # per task, one per context
    policies: list[str] = field(default_factory=lambda: list(COMPRESSING_POLICIES))
    keep_ratios: list[float] = field(default_factory=lambda: [0.1, 0.2, 0.4])
    modes: list[str] = field(default_factory=lambda: list(MODES))
    #: Observation sources of compress_once (query_aware always scores with its own tail).
    observe: list[str] = field(default_factory=lambda: ["reconstruct"])  # the server's default source
    branch_combine: str = "max"
    #: The splits query_aware runs on (a prefill per question: the costliest part of a run).
    query_aware_splits: list[str] = field(default_factory=lambda: list(SPLITS))
    tasks: list[str] = field(default_factory=lambda: list(TASKS))
    facts_per_document: list[int] = field(default_factory=lambda: [1, 4, 8])  # retrieval, cycled
    retrieval_answer_tokens: int = RETRIEVAL_ANSWER_TOKENS
    fidelity_answer_tokens: int = 32
    #: The observation window (tail, branches, query_aware); a repetition keeps its own
    #: (`Observe.kept_window`) unless a policy spec sets one.
    window: int = QUALITY_WINDOW
    seed: int = 0

    def validate(self) -> None:
        if len(self.questions) != len(self.contexts):
            raise ConfigFieldError("questions", f"give one question count per context: contexts={self.contexts}, "
                                                f"questions={self.questions}")
        if any(n < 1 for n in self.questions):
            raise ConfigFieldError("questions", f"counts must be >= 1, got {self.questions}")
        if any(c < 2 * self.window for c in self.contexts):
            raise ConfigFieldError("contexts", f"each must be at least twice the window, {2 * self.window} tokens, "
                                               f"got {self.contexts}")
        for spec in self.policies:
            with _naming("policies", spec):
                window = make_policy(spec, window=self.window).window
            if any(context < 2 * window for context in self.contexts):  # it would keep (nearly) every token
                raise ConfigFieldError("policies", f"{spec}: its window of {window} tokens needs contexts of at least "
                                                   f"{2 * window} tokens, got {self.contexts}")
        self.source_names()
        for name, values, allowed in (("modes", self.modes, MODES), ("tasks", self.tasks, TASKS),
                                      ("query_aware_splits", self.query_aware_splits, SPLITS)):
            unknown = [v for v in values if v not in allowed]
            if unknown:
                raise ConfigFieldError(name, f"unknown {unknown}; choose from {sorted(allowed)}")
        if not self.observe:
            raise ConfigFieldError("observe", "give at least one source")
        for name in ("contexts", "keep_ratios", "modes", "tasks", "query_aware_splits"):
            values = getattr(self, name)
            if len(set(values)) != len(values):  # a repeated cell would count its questions twice
                raise ConfigFieldError(name, f"give distinct values, got {values}")
            if not values and name != "query_aware_splits":
                raise ConfigFieldError(name, "give at least one")
        if self.seed < 0:  # random.Random(-s) draws what Random(s) draws
            raise ConfigFieldError("seed", f"must be >= 0, got {self.seed}")
        if self.branch_combine not in WINDOW_COMBINES:
            raise ConfigFieldError("branch_combine", f"must be one of {list(WINDOW_COMBINES)}, "
                                                     f"got {self.branch_combine!r}")
        if "full" in map(policy_name, self.policies):
            raise ConfigFieldError("policies", "'full' is always run as the reference; do not list it")
        bad = [r for r in self.keep_ratios if not 0 < r <= 1]
        if bad:
            raise ConfigFieldError("keep_ratios", f"must be in (0, 1], got {bad}")
        if not self.facts_per_document or not 1 <= min(self.facts_per_document) <= max(self.facts_per_document) \
                <= MAX_FACTS:
            raise ConfigFieldError("facts_per_document", f"must be counts in [1, {MAX_FACTS}], "
                                                         f"got {self.facts_per_document}")
        self._check_distinct()
        idle = [spec for spec in self.policies if not self.runs(spec)]
        if idle:  # it would be left out of every cell, and the report would not say so
            raise ConfigFieldError("policies", f"{', '.join(idle)} scores only by "
                                               f"{' or '.join(POLICIES[policy_name(idle[0])].scored_by)}, which no "
                                               f"selected mode and observation source gives (query_aware scores by "
                                               f"its tail)")
        self._check_windows_observed()

    def _check_windows_observed(self) -> None:
        """A policy that reads a window's queries (tail and branches sources, query_aware) reads the
        benchmark's QUALITY_WINDOW of them: a spec's wider window would fail once the model has
        loaded, with a fix no flag gives."""
        window_read = {"tail", "branches"} & self.source_names() if "compress_once" in self.modes else set()
        if "query_aware" in self.modes:
            window_read.add("tail")
        for spec in self.policies:
            policy_class = POLICIES[policy_name(spec)]
            reads = window_read & set(policy_class.scored_by or window_read)
            window = make_policy(spec, window=self.window).window
            if policy_class.needs_scores and reads and window > self.window:
                raise ConfigFieldError("policies", f"{spec}: its window of {window} tokens is wider than the "
                                                   f"{self.window} window queries that score it under "
                                                   f"{' and '.join(sorted(reads))} (query_aware scores by the tail); "
                                                   f"give window <= {self.window}, or a reconstruct source alone")

    def _check_distinct(self) -> None:
        """Two labels for one source, or for one policy as the benchmark builds it, would give
        two identical rows. A policy that reads no scores is built once, with the runtime's
        window; one that does, per source, whose kept window it takes unless its spec sets one."""
        sources = [make_observe(spec, combine=self.branch_combine) for spec in self.observe]
        if len(set(sources)) != len(sources):
            raise ConfigFieldError("observe", f"{self.observe} name one source twice")
        positional = [spec for spec in self.policies if not POLICIES[policy_name(spec)].needs_scores]
        groups = [(None, [spec_of(make_policy(spec, window=self.window)) for spec in positional])]
        built_under = (sources if "compress_once" in self.modes else []) + (
            [make_observe("tail")] if "query_aware" in self.modes else [])
        for source in built_under:
            groups.append((source.name, [spec_of(make_policy(spec, window=source.kept_window or self.window))
                                         for spec in self.policies if spec not in positional
                                         and source.name in (POLICIES[policy_name(spec)].scored_by or [source.name])]))
        for source_name, specs in groups:
            if len(set(specs)) != len(specs):
                where = f" under {source_name}" if source_name else ""
                raise ConfigFieldError("policies", f"{self.policies} name one policy twice{where} (options spelled "
                                                   f"out: {specs})")

    def source_names(self) -> set[str]:
        """The names of the observation sources (`observe`), their options checked."""
        names = set()
        for source in self.observe:
            with _naming("observe", source):
                names.add(make_observe(source).name)
        return names

    def runs(self, spec: str) -> bool:
        """Whether policy `spec` has a cell: a source it scores by among the selected modes'."""
        sources = POLICIES[policy_name(spec)].scored_by
        given = self.source_names() if "compress_once" in self.modes else set()
        if "query_aware" in self.modes:
            given.add("tail")
        return sources is None or bool(given & set(sources))


def split_of(index: int, num_questions: int, middle_at_compression: bool = True) -> str:
    """`at_compression` for the first half of a document's questions, else `later`; an odd
    count's middle question as `middle_at_compression` says (`middles_at_compression`)."""
    at_compression = num_questions // 2 + (num_questions % 2 if middle_at_compression else 0)
    return SPLITS[0] if index < at_compression else SPLITS[1]


def middles_at_compression(documents: Sequence[Document]) -> list[bool]:
    """Per document, whether its middle question (an odd count's) is `at_compression`: in turn
    over the documents with an odd count, so that documents of one question (facts 1, 4, 8
    cycled) are in both splits alike. Rounded up everywhere, `at_compression` had them all."""
    flags, odd_counts = [], 0
    for document in documents:
        flags.append(odd_counts % 2 == 0)
        odd_counts += len(document.questions) % 2
    return flags


def retrieval_fact_counts(num_questions: int, pattern: Sequence[int]) -> list[int]:
    """Facts per document, cycling `pattern`, the last document trimmed to the count."""
    counts = []
    for facts in itertools.cycle(pattern):
        left = num_questions - sum(counts)
        if left <= 0:
            return counts
        counts.append(min(facts, left))


def benchmark_documents(task: str, context: int, num_questions: int, count_tokens, seed: int = 0,
                        facts_per_document: Sequence[int] = (1, 4, 8)) -> list[Document]:
    """The documents and questions of one (task, context) cell of the benchmark, as a run with
    `seed` asks them (count_tokens: text -> token count of the model's tokenizer)."""
    seed = seed * 1_000_003 + context + (0 if task == "retrieval" else 7)
    if task == "retrieval":
        counts = retrieval_fact_counts(num_questions, facts_per_document)
        documents = retrieval_documents(count_tokens, context, counts, seed)
        # Facts are planted latest-first, so question order follows position in the document;
        # shuffled, the split (first half at compression) does not pick the facts near the end.
        order = random.Random(seed)
        for document in documents:
            order.shuffle(document.questions)
        return documents
    num_documents = math.ceil(num_questions / FIDELITY_QUESTIONS_PER_DOCUMENT)
    documents = fidelity_documents(count_tokens, context, num_documents, FIDELITY_QUESTIONS_PER_DOCUMENT, seed)
    del documents[-1].questions[num_questions - (num_documents - 1) * FIDELITY_QUESTIONS_PER_DOCUMENT:]
    return documents


class _Cells:
    """Per-question results collected per (task, context, mode, observe, split, policy, ratio)."""

    def __init__(self):
        self.values: dict[tuple, list] = defaultdict(list)
        self.kept: dict[tuple, list[float]] = defaultdict(list)
        # Each value's document and question, by their indices in the run's order.
        self.questions: dict[tuple, list[tuple[int, int]]] = defaultdict(list)

    def add(self, key: tuple, value, prefix: CompressedPrefix, document: int, question: int) -> None:
        self.values[key].append(value)
        self.kept[key].append(prefix.plan.keep_ratio)
        self.questions[key].append((document, question))

    def records(self) -> list[dict]:
        records = []
        for key, values in self.values.items():
            task, context, mode, observe, split, policy, ratio = key
            record = {"task": task, "context_tokens": context, "mode": mode, "observe": observe, "split": split,
                      "policy": policy, "keep_ratio": ratio, "n_questions": len(values),
                      "measured_keep_ratio": round(sum(self.kept[key]) / len(self.kept[key]), 4)}
            if task == "retrieval":
                hits = sum(values)
                record["accuracy"] = hits / len(values)
                record["ci95"] = list(wilson_interval(hits, len(values)))
                # [document, right, asked]: what the share of the full cache's answers is resampled by.
                per_document: dict[int, list[int]] = defaultdict(lambda: [0, 0])
                for (document, _), hit in zip(self.questions[key], values):
                    per_document[document][0] += hit
                    per_document[document][1] += 1
                record["by_document"] = [[document, right, asked] for document, (right, asked) in per_document.items()]
                # [document, question] answered right: which of the full cache's right answers a
                # compressed copy keeps (the counts alone bound it; written since 2026-12-07).
                record["right_questions"] = sorted([document, question] for (document, question), hit
                                                   in zip(self.questions[key], values) if hit)
            else:
                kls = [kl for kl, _ in values]
                top1s = [top1 for _, top1 in values]
                documents = [document for document, _ in self.questions[key]]
                record["kl"] = sum(kls) / len(kls)
                # JSON has no infinity: the unbounded end of one document's interval is null.
                record["kl_ci95"] = [bound if math.isfinite(bound) else None
                                     for bound in mean_interval(kls, documents, low=0.0)]
                record["top1"] = sum(top1s) / len(top1s)
                record["ci95"] = list(mean_interval(top1s, documents, low=0.0, high=1.0))
            records.append(record)
        return records


# One compressed prefix of a question's batch: (mode, observe, policy, keep ratio).
Config = tuple[str, str, str, float]


class QualityBenchmark:
    def __init__(self, runtime: ReferenceRuntime, config: QualityConfig):
        config.validate()
        if getattr(runtime, "window", config.window) != config.window:  # the runtime's window is the one observed
            raise ConfigFieldError("window", f"{config.window}, but the runtime observes windows of {runtime.window} "
                                             "tokens: load it with the same window")
        self.runtime = runtime
        self.config = config
        self.tokenizer = runtime.tokenizer
        self.cells = _Cells()
        scored = [p for p in config.policies if POLICIES[policy_name(p)].needs_scores]
        positional = [("full", 1.0)] + [(p, r) for p in config.policies if p not in scored for r in config.keep_ratios]
        self.positional = positional  # the same for every observation source: computed once
        self.scored = list(itertools.product(scored, config.keep_ratios))
        self.seconds: dict[str, float] = defaultdict(float)  # model time: prefill and each source

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _count_tokens(self, text: str) -> int:
        return len(self._ids(text))

    def documents(self, task: str, context: int, num_questions: int) -> list[Document]:
        return benchmark_documents(task, context, num_questions, self._count_tokens, self.config.seed,
                                   self.config.facts_per_document)

    def _prefill(self, token_ids: list[int], name: str = "prefill"):
        started = time.perf_counter()
        capture = self.runtime.prefill(token_ids)
        self.seconds[name] += time.perf_counter() - started
        return capture

    def _compress_once(self, prefix_ids: list[int], branches: list[list[int]]) -> tuple[list[Config], list]:
        """Every compress-once prefix of a document: the positional ones, then each source's."""
        capture = self._prefill(prefix_ids)
        configs = [("compress_once", "tail", policy, ratio) for policy, ratio in self.positional]
        prefixes = self.runtime.compress_many(capture, self.positional)
        for source in self.config.observe:
            # Without a branch at compression (a one-question document) branches is the tail.
            if make_observe(source).name == "branches" and not branches:
                observation = None
            else:
                observation = self.runtime.observe(capture, source, branches=branches,
                                                   combine=self.config.branch_combine)
                self.seconds[source] += observation.seconds
            scored = self.scored_by(source)
            configs += [("compress_once", source, policy, ratio) for policy, ratio in scored]
            prefixes += self.runtime.compress_many(capture, scored, observation)
        return configs, prefixes

    def scored_by(self, source: str) -> list[tuple[str, float]]:
        """The scored (policy, ratio) pairs defined with observation source `source` (kvzip
        scores by a repetition only)."""
        name = make_observe(source).name
        pairs = []
        for policy, ratio in self.scored:
            sources = POLICIES[policy_name(policy)].scored_by
            if sources is None or name in sources:
                pairs.append((policy, ratio))
        return pairs

    def _query_aware(self, token_ids: list[int]) -> tuple[list[Config], list]:
        pairs = self.positional + self.scored_by("tail")
        prefixes = self.runtime.compress_many(self._prefill(token_ids, "query_aware_prefill"), pairs)
        return [("query_aware", "tail", policy, ratio) for policy, ratio in pairs], prefixes

    def _record(self, task: str, context: int, document: int, question: int, split: str, configs: Sequence[Config],
                prefixes: Sequence[CompressedPrefix], values) -> None:
        for (mode, source, policy, ratio), prefix, value in zip(configs, prefixes, values):
            # Positional policies do not depend on the source: recorded under each one.
            sources = [source] if (policy, ratio) in self.scored or mode == "query_aware" else self.config.observe
            for source, split_name in itertools.product(sources, (split, "all")):
                self.cells.add((task, context, mode, source, split_name, policy, ratio), value, prefix, document,
                               question)

    def _retrieval(self, prefixes, suffix_ids, answer: str) -> list[bool]:
        answers = self.runtime.generate(prefixes, suffix_ids, self.config.retrieval_answer_tokens,
                                        stop_when=code_finished(self.tokenizer.decode))
        return [names_code(self.tokenizer.decode(tokens), answer) for tokens in answers]

    def _fidelity(self, prefixes, suffix_ids, reference_ids: list[int]) -> list[tuple[float, float]]:
        logits = self.runtime.continuation_logits(prefixes, suffix_ids, reference_ids)
        log_probs = torch.log_softmax(logits, dim=-1)
        full = log_probs[0:1]  # the full cache is configuration 0
        kl = (full.exp() * (full - log_probs)).sum(-1).mean(-1)
        top1 = (logits.argmax(-1) == logits[0:1].argmax(-1)).float().mean(-1)
        return list(zip(kl.tolist(), top1.tolist()))

    def _reference_answer(self, full_prefix: CompressedPrefix | None, prefix_ids, suffix_ids) -> list[int]:
        """The full-cache greedy answer, with its EOS when it ended before the cap."""
        if full_prefix is None:
            full_prefix = self.runtime.compress(self._prefill(prefix_ids, "reference_prefill"), "full", 1.0)
        cap = self.config.fidelity_answer_tokens
        answer = self.runtime.generate([full_prefix], suffix_ids, cap)[0]
        return answer + [self.tokenizer.eos_token_id] if len(answer) < cap else answer

    def run_document(self, task: str, context: int, document_index: int, document: Document, progress: tqdm,
                     middle_at_compression: bool = True) -> None:
        prefix_text, _ = prompt_parts(document.text, "")
        prefix_ids = self._ids(prefix_text)
        suffixes = [self._ids(prompt_parts(document.text, question.text)[1]) for question in document.questions]
        splits = [split_of(index, len(suffixes), middle_at_compression) for index in range(len(suffixes))]
        once = None
        if "compress_once" in self.config.modes:
            # The branches present at compression are the at_compression questions' prompts.
            once = self._compress_once(prefix_ids, [s for s, split in zip(suffixes, splits) if split == SPLITS[0]])
        for question_index, (question, suffix_ids, split) in enumerate(zip(document.questions, suffixes, splits)):
            reference = None  # the full cache's answer, generated once, for the first mode that needs it
            for mode in self.config.modes:
                if mode == "query_aware" and split not in self.config.query_aware_splits:
                    continue
                if task == "fidelity" and reference is None:
                    reference = self._reference_answer(once[1][0] if once else None, prefix_ids, suffix_ids)
                if mode == "compress_once":
                    (configs, prefixes), suffix = once, suffix_ids
                else:
                    (configs, prefixes), suffix = self._query_aware(prefix_ids + suffix_ids), []
                values = (self._retrieval(prefixes, suffix, question.answer) if task == "retrieval"
                          else self._fidelity(prefixes, suffix, reference))
                self._record(task, context, document_index, question_index, split, configs, prefixes, values)
            progress.update(1)

    def run(self, progress: bool = True, partial: Path | None = None, command: str | None = None) -> dict:
        """All documents; with `partial`, the result so far is written there (JSON) after every
        document, so a run cut short keeps what it measured. command: the command line, kept
        in the metadata (`--report-only` rebuilds a report from it)."""
        started = time.time()
        self.code = code_revision()  # now: a partial file written into the checkout would make it read dirty
        plan = []
        for context, count in zip(self.config.contexts, self.config.questions):
            for task in self.config.tasks:
                try:
                    plan.append((task, context, self.documents(task, context, count)))
                except ValueError as error:  # too many facts for the document's paragraphs
                    raise ConfigFieldError("facts_per_document", f"{error} (contexts {context})") from None
        self._check_positions(plan)
        total = sum(len(doc.questions) for _, _, docs in plan for doc in docs)
        done = 0  # not the bar's count, which a disabled bar does not keep
        with tqdm(total=total, desc="quality", unit="question", disable=not progress) as bar:
            for task, context, documents in plan:
                bar.set_postfix_str(f"{task} {context} tokens")
                for index, (document, middle) in enumerate(zip(documents, middles_at_compression(documents))):
                    self.run_document(task, context, index, document, bar, middle_at_compression=middle)
                    done += len(document.questions)
                    if partial is not None:
                        replace_file(partial, json.dumps(self._result(started, done, total, command), indent=1) + "\n")
        return self._result(started, total, total, command)

    def _check_positions(self, plan) -> None:
        """Every document's longest prompt and its answer within the model's positions: beyond
        them the model runs positions it was not trained on, and its answers mean nothing."""
        positions = getattr(self.runtime.model.config, "max_position_embeddings", None)
        if positions is None:
            return
        for task, context, documents in plan:
            answer_tokens = (self.config.retrieval_answer_tokens if task == "retrieval"
                             else self.config.fidelity_answer_tokens)
            for document in documents:  # tokenized as `run_document` tokenizes it: prefix, then each suffix
                suffixes = [prompt_parts(document.text, question.text)[1] for question in document.questions]
                prefix_tokens = self._count_tokens(prompt_parts(document.text, "")[0])
                longest = prefix_tokens + max(map(self._count_tokens, suffixes))
                if longest + answer_tokens > positions:
                    raise ConfigFieldError("contexts", f"{context}: a prompt of {longest} tokens and a "
                                                       f"{answer_tokens}-token answer exceed the model's {positions} "
                                                       "positions")

    def _result(self, started: float, questions_done: int, questions_planned: int, command: str | None) -> dict:
        meta = run_metadata(self.runtime, self.config, time.time() - started)
        meta["code"] = self.code
        if command is not None:
            meta["command"] = command
        meta["model_seconds"] = {name: round(value, 2) for name, value in self.seconds.items()}
        meta["questions_done"] = questions_done
        meta["questions_planned"] = questions_planned
        return {
            "records": sorted(self.cells.records(), key=lambda r: (r["task"], r["context_tokens"], r["mode"],
                                                                   r["observe"], r["split"], r["policy"],
                                                                   r["keep_ratio"])),
            "meta": meta,
        }


def run_metadata(runtime: ReferenceRuntime, config: QualityConfig, wall_seconds: float) -> dict:
    import transformers

    model_config = runtime.model.config
    return {
        "model": Path(getattr(model_config, "_name_or_path", "") or "model").name,
        "model_shape": {"layers": model_config.num_hidden_layers, "q_heads": model_config.num_attention_heads,
                        "kv_heads": model_config.num_key_value_heads, "head_dim": model_config.head_dim},
        "dtype": str(next(runtime.model.parameters()).dtype),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, {platform.platform()}",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        # The documents are built from this Python's pydoc_data: another release gives other text.
        "python": platform.python_version(),
        "wall_seconds": round(wall_seconds, 1),
        "config": asdict(config),
        # The window each compress_once source keeps unless a policy spec sets one.
        "kept_window": ({spec: make_observe(spec).kept_window or config.window for spec in config.observe}
                        if "compress_once" in config.modes else {}),
        # The report's label: over documents since 2026-12-07; before, "student-t" over questions
        # (since 09b5984, 2026-12-06), and normal over questions before that.
        "fidelity_interval": "student-t-documents",
    }
