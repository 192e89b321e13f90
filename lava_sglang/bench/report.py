"""Writes the quality benchmark's results: quality.json (records), quality.md, quality.png."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

from lava_sglang.argtypes import replace_file
from lava_sglang.bench.stats import share_interval
from lava_sglang.policy.registry import POLICIES

SCORED_ORDER = ["lava", "kvzip", "ada_snapkv", "snapkv", "pyramidkv"]
POLICY_MARKER = {"lava": ("o", "-"), "kvzip": ("D", "-"), "ada_snapkv": ("s", "--"), "snapkv": ("^", ":"),
                 "pyramidkv": ("v", "-.")}
SOURCE_COLOR = {"tail": "tab:blue", "branches": "tab:red", "reconstruct": "tab:green", "per question": "tab:purple"}
METRIC = {"retrieval": ("accuracy", "retrieval accuracy"), "fidelity": ("top1", "top-1 agreement with full")}
SPLIT_LABEL = {"at_compression": "at compression", "later": "later", "all": "all"}


def normalise(records: list[dict]) -> list[dict]:
    """Records of runs before observation sources existed scored by the tail, over all questions."""
    return [{"observe": "tail", "split": "all", **record} for record in records]


def _select(records: list[dict], **where) -> list[dict]:
    return [r for r in records if all(r[k] == v for k, v in where.items())]


def _cell(record: dict, metric: str) -> str:
    low, high = record["ci95"]
    return f"{record[metric]:.2f} [{low:.2f}, {high:.2f}]"


#: The fidelity intervals' label by the run's `fidelity_interval` (runs before 2026-12-06 have none).
FIDELITY_INTERVALS = {
    "student-t-documents": "Student-t intervals over documents (a document's questions share one compressed "
                           "copy; a cluster-robust standard error)",
    "student-t": "Student-t intervals over questions (a run made before they were taken over documents, 2026-12-07)",
}


def _reference_mode(records: list[dict]) -> str:
    """The mode whose full-cache records are the report's reference: compress-once's, or in a
    run of query-aware cells alone theirs (the same answers to the same questions)."""
    return "compress_once" if _select(records, mode="compress_once", policy="full") else "query_aware"


def paired_by_document(record: dict, reference: dict) -> list[tuple[int, int]]:
    """(right, the reference's right) per document of a retrieval record and a reference's (the
    full cache's, or another policy's) on the same questions (their `by_document`, written
    since 2026-12-06)."""
    reference_right = {document: (right, asked) for document, right, asked in reference["by_document"]}
    pairs = []
    for document, right, asked in record["by_document"]:
        reference_hits, reference_asked = reference_right.get(document, (0, 0))
        if reference_asked != asked:
            raise ValueError(f"document {document}: {asked} questions in the {record['policy']} cell, "
                             f"{reference_asked} in the {reference['policy']} cell")
        pairs.append((right, reference_hits))
    return pairs


def kept_by_document(record: dict, reference: dict) -> list[tuple[int, int]] | None:
    """(the reference's right answers the record's are too, the reference's right answers) per
    document of a retrieval record and its reference's (their `right_questions`, written since
    2026-12-07, and `by_document`); None where either record lacks them."""
    if any(field not in item for field in ("right_questions", "by_document") for item in (record, reference)):
        return None
    both = set(map(tuple, record["right_questions"])) & set(map(tuple, reference["right_questions"]))
    kept = Counter(document for document, _ in both)
    documents = [document for document, _, _ in record["by_document"]]
    return [(kept[document], reference_right)
            for document, (_, reference_right) in zip(documents, paired_by_document(record, reference))]


def _full_of(records: list[dict], record: dict) -> list[dict]:
    """The full cache's record on a record's questions ([] where the run has none)."""
    return _select(records, task=record["task"], context_tokens=record["context_tokens"], split=record["split"],
                   mode=_reference_mode(records), policy="full")


def _share_with_interval(share: float, pairs: list[tuple[int, int]] | None) -> str:
    """A share, with its interval over documents where there are (right, reference's right)
    pairs to resample."""
    if pairs is None:
        return f"{share:.2f}"
    low, high = share_interval(pairs)
    return f"{share:.2f} [{low:.2f}, {high:.2f}]"


def _share_of_full(records: list[dict], record: dict) -> str:
    """The share, and its interval over documents where the records have their documents' counts."""
    full = _full_of(records, record)
    if not full or not full[0]["accuracy"]:
        return ""
    counted = record["policy"] != "full" and "by_document" in record and "by_document" in full[0]
    return _share_with_interval(record["accuracy"] / full[0]["accuracy"],
                                paired_by_document(record, full[0]) if counted else None)


def _kept_of_full(records: list[dict], record: dict) -> str:
    """Of the full cache's right answers on a record's questions, the share it answers right too
    ("" where the full cache answered none or the records do not name the questions)."""
    full = _full_of(records, record)
    pairs = kept_by_document(record, full[0]) if full else None
    if pairs is None or not hits(full[0]):
        return ""
    return _share_with_interval(sum(kept for kept, _ in pairs) / hits(full[0]),
                                None if record["policy"] == "full" else pairs)


def hits(record: dict) -> int:
    return round(record["accuracy"] * record["n_questions"])


def _rows(records: list[dict], config: dict) -> list[tuple[str, dict]]:
    """(label, selector) per table row: the references, each source x scored policy, per question."""
    sources = config.get("observe", ["tail"])
    scored = _scored_policies(records)
    positional = _positional_policies(records)
    # A positional policy's cells are the same under every source (the run records them under
    # each): one row, under the first source.
    rows = [("full", {"mode": _reference_mode(records), "policy": "full"})]
    rows += [(policy, {"mode": "compress_once", "observe": sources[0], "policy": policy}) for policy in positional]
    rows += [(f"{source} · {policy}", {"mode": "compress_once", "observe": source, "policy": policy})
             for source in sources for policy in scored]
    if "query_aware" in config["modes"]:
        rows += [(f"per question · {policy}", {"mode": "query_aware", "policy": policy})
                 for policy in scored + positional]
    return [(label, where) for label, where in rows if _select(records, **where)]


def _is_positional(policy: str) -> bool:
    """A policy (spec) that keeps tokens by position and reads no scores: streamingllm, with or
    without options. Names no longer registered (old runs' `none`) count as scored."""
    name = policy.split(":", 1)[0]
    return name != "full" and name in POLICIES and not POLICIES[name].needs_scores


def _positional_policies(records: list[dict]) -> list[str]:
    return list(dict.fromkeys(r["policy"] for r in records if _is_positional(r["policy"])))


def _scored_policies(records: list[dict]) -> list[str]:
    """The scored policies (specs included) of the records: the usual order, then the rest in
    order of appearance."""
    scored = list(dict.fromkeys(r["policy"] for r in records
                                if r["policy"] != "full" and not _is_positional(r["policy"])))
    return sorted(scored, key=lambda policy: (SCORED_ORDER.index(policy) if policy in SCORED_ORDER
                                              else len(SCORED_ORDER)))


def _splits(records: list[dict]) -> list[str]:
    present = {r["split"] for r in records}
    return [split for split in ("at_compression", "later") if split in present] or ["all"]


def _table(records, config, task, context, value) -> list[str]:
    splits = _splits(records)
    header = ["observe · policy"] + [f"{SPLIT_LABEL[split]} {ratio}" for split in splits
                                     for ratio in config["keep_ratios"]]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label, where in _rows(records, config):
        row = [label]
        for split in splits:
            for ratio in config["keep_ratios"]:
                found = _select(records, task=task, context_tokens=context, split=split,
                                keep_ratio=1.0 if where["policy"] == "full" else ratio, **where)
                row.append(value(found[0]) if found else "")
        if any(row[1:]):
            lines.append("| " + " | ".join(row) + " |")
    return lines


def _lava(records, context, split, ratio, **where) -> dict | None:
    found = _select(records, task="retrieval", context_tokens=context, split=split, keep_ratio=ratio, **where)
    return found[0] if found else None


def targets(records: list[dict], config: dict) -> list[str]:
    """Issue 7's targets on retrieval, each met or not, with the figures."""
    sources = [s for s in config.get("observe", []) if s != "tail"]
    if "tail" not in config.get("observe", []) or not sources or _splits(records) == ["all"]:
        return []
    lines = ["## Targets (issue 7), retrieval", ""]
    verdict = {True: "**met**", False: "**not met**"}
    for context in config["contexts"]:
        for ratio in [r for r in (0.2, 0.4) if r in config["keep_ratios"]]:
            def split_hits(split, **where):
                record = _lava(records, context, split, ratio if where.get("policy") != "full" else 1.0, **where)
                return (hits(record), record["n_questions"]) if record else None

            once = {"mode": "compress_once"}
            present = split_hits("at_compression", policy="lava", observe="branches", **once)
            per_question = split_hits("at_compression", policy="lava", mode="query_aware")
            if present and per_question:
                lines.append(f"- {context} tokens, keep {ratio}, questions present at compression: lava+branches "
                             f"{present[0]}/{present[1]} vs lava per question {per_question[0]}/{per_question[1]}: "
                             f"{verdict[present[0] >= per_question[0]]}")
            later = {source: split_hits("later", policy="lava", observe=source, **once) for source in sources}
            later = {source: value for source, value in later.items() if value}
            tail = split_hits("later", policy="lava", observe="tail", **once)
            streaming = split_hits("later", policy="streamingllm", observe=config["observe"][0], **once)
            if later and tail and streaming:
                best = max(later, key=lambda source: later[source][0])
                met = later[best][0] >= 2 * tail[0] and later[best][0] > streaming[0]
                lines.append(f"- {context} tokens, keep {ratio}, later questions: best source {best} "
                             f"{later[best][0]}/{later[best][1]} vs tail {tail[0]}/{tail[1]} (x2 = {2 * tail[0]}) "
                             f"and streamingllm {streaming[0]}/{streaming[1]}: {verdict[met]}")
            if ratio != 0.4:
                continue
            for split in ("at_compression", "later"):
                full = split_hits(split, policy="full", **once)
                scored = {source: split_hits(split, policy="lava", observe=source, **once) for source in sources}
                scored = {source: value for source, value in scored.items() if value}
                if not full or not scored:
                    continue
                best = max(scored, key=lambda source: scored[source][0])
                rivals = {policy: split_hits(split, policy=policy, observe=best, **once)
                          for policy in ("snapkv", "ada_snapkv")}
                rival_hits = {policy: value[0] if value else "-" for policy, value in rivals.items()}
                # A rival the run did not have is not beaten, nor unbeaten: no verdict.
                beats = "n/a (not run)" if not all(rivals.values()) else verdict[
                    all(scored[best][0] > value[0] for value in rivals.values())]
                lines.append(f"- stretch, {context} tokens, keep 0.4, {SPLIT_LABEL[split]}: best source {best} "
                             f"{scored[best][0]}/{scored[best][1]} vs 0.8 x full = {0.8 * full[0]:.1f} "
                             f"(full {full[0]}/{full[1]}): {verdict[scored[best][0] >= 0.8 * full[0]]}; "
                             f"lava beats snapkv {rival_hits['snapkv']} and ada_snapkv {rival_hits['ada_snapkv']} "
                             f"with {best}: {beats}")
    return lines + [""]


#: What a report reads from a run's quality_meta.json.
QUALITY_META_KEYS = ("command", "config")


def questions_planned(meta: dict) -> int:
    """The questions a run set out to answer: recorded since 2026-12-05, else each task's
    questions at every length (what `QualityBenchmark.run` plans)."""
    config = meta["config"]
    return meta.get("questions_planned", sum(config["questions"]) * len(config["tasks"]))


def cut_short(meta: dict) -> tuple[int, int] | None:
    """(questions answered, questions planned) of a run cut short (a `--partial` file), else None."""
    planned = questions_planned(meta)
    done = meta.get("questions_done", planned)
    return (done, planned) if done < planned else None


def markdown(records: list[dict], meta: dict, command: str, notes: str | None) -> str:
    records = normalise(records)
    config = meta["config"]
    sources = config.get("observe", ["tail"])
    lines = [
        "# Quality: compress once, answer many",
        "",
        f"Generated by `{command}`.",
        "",
        f"- Model: {meta['model']} ({meta['model_shape']['layers']} layers, {meta['model_shape']['q_heads']} query "
        f"heads, {meta['model_shape']['kv_heads']} KV heads, head dim {meta['model_shape']['head_dim']}), "
        f"{meta['dtype']}, reference runtime (HF transformers {meta['transformers']}, torch {meta['torch']})",
        f"- Machine: {meta['machine']}" + (f"; lava-sglang {meta['code']}" if meta.get("code") else ""),
        f"- Wall time: {meta['wall_seconds'] / 60:.1f} min; seed {config['seed']}; window {config['window']}"
        + "".join(f", {window} under {source}" for source, window in meta.get("kept_window", {}).items()
                  if window != config["window"]),
        "- Questions per task and document length: " + ", ".join(
            f"{q} at {c} tokens" for c, q in zip(config["contexts"], config["questions"]))
        + " (a column of one split, at compression or later, holds that split's share; each interval is taken "
          "over its own cell's questions)",
        f"- Retrieval: K in {{{', '.join(map(str, config.get('facts_per_document', [1, 4, 8])))}}} planted facts "
        "per document (cycled), one question per fact; correct = the greedy answer "
        f"({config['retrieval_answer_tokens']} tokens at most, stopped once it names a 7-digit number) names the "
        "code, not as part of a longer number (before 2026-12-06: the code anywhere in the answer, which stopped "
        "at its seventh digit). "
        "95% Wilson intervals over questions (the share's below: over documents).",
        f"- Fidelity: open questions; the full-cache greedy answer ({config['fidelity_answer_tokens']} tokens at "
        "most) is teacher-forced; top-1 = share of its tokens the compressed cache also ranks first; "
        "KL(full || compressed) per token, averaged per question. 95% " + FIDELITY_INTERVALS.get(
            meta.get("fidelity_interval"), "normal intervals over questions (a run before 2026-12-06)") + ".",
        "- Modes: `compress_once` compresses the document once and answers every question from that cache; "
        "`query_aware` (rows `per question`) appends the question before scoring and compresses per question.",
    ]
    if "compress_once" in config.get("modes", ["compress_once"]):
        lines.append(f"- Observation sources of compress_once (docs/observe.md): {', '.join(sources)}"
                     + (f"; branches combine windows by `{config['branch_combine']}`" if "branches" in sources
                        else "") + ".")
    if short := cut_short(meta):
        lines.append(f"- **Cut short:** {short[0]} of {short[1]} questions were "
                     "answered (a `--partial` file); each cell counts the questions it reached.")
    if _splits(records) != ["all"]:
        lines.append("- Splits: a document's first half of questions are `at compression` (their branches exist "
                     "when it is compressed; `branches` sees them), the rest `later`; the middle questions of "
                     "documents with an odd count go to each split in turn (in runs before 2026-12-06, all to "
                     "`at compression`). "
                     "`full` and `streamingllm` do not depend on the source.")
    seconds = meta.get("model_seconds", {})
    if seconds.get("prefill"):
        costs = [f"{name} +{value / seconds['prefill']:.2f}x ({value:.0f} s)" for name, value in seconds.items()
                 if name.split(":")[0] in ("branches", "reconstruct")]
        if costs:
            lines.append(f"- Extra model time over the document prefills ({seconds['prefill']:.0f} s): "
                         + "; ".join(costs) + ".")
    lines.append("")
    if notes:
        lines += ["## Reading the results", "", notes.strip(), ""]
    lines += targets(records, config)
    for task in config["tasks"]:
        metric, label = METRIC[task]
        for context in config["contexts"]:
            lines += [f"## {task}, {context}-token documents: {label}", ""]
            lines += _table(records, config, task, context, lambda record: _cell(record, metric))
            if task == "retrieval":
                lines += ["", "Accuracy as a share of the full cache's on the same questions (95% interval by a "
                          "bootstrap over documents, paired):", ""]
                lines += _table(records, config, task, context, lambda record: _share_of_full(records, record))
                if any("right_questions" in record for record in records):
                    lines += ["", "Of the full cache's right answers on the same questions, the share also answered "
                              "right (a compressed cache is right on some questions the full cache misses, so the "
                              "share above can pass this one):", ""]
                    lines += _table(records, config, task, context, lambda record: _kept_of_full(records, record))
            if task == "fidelity":
                lines += ["", "KL(full || compressed) per answer token (lower is better):", ""]
                lines += _table(records, config, task, context, lambda record: f"{record['kl']:.3f}")
            lines.append("")
    lines += ["Records: `quality.json`; plot: `quality.png`.", ""]
    return "\n".join(lines)


def plot(records: list[dict], config: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = normalise(records)
    single_source = len(config.get("observe", ["tail"])) == 1 and "query_aware" not in config["modes"]
    palette = plt.get_cmap("tab20").colors
    policy_colors = {policy: palette[index % len(palette)] for index, policy in enumerate(_scored_policies(records))}
    # Named sources keep their colours; variants (reconstruct:chunk_tokens=256) get their own.
    spare = iter(["tab:orange", "tab:brown", "tab:pink", "tab:olive", "tab:cyan"])
    source_colors = {source: SOURCE_COLOR.get(source) or next(spare, "tab:gray")
                     for source in config.get("observe", ["tail"])}
    source_colors["per question"] = SOURCE_COLOR["per question"]
    panels = [(task, split) for task in config["tasks"] for split in _splits(records)]
    contexts = config["contexts"]
    figure, axes = plt.subplots(len(contexts), len(panels), figsize=(4.4 * len(panels), 3.6 * len(contexts)),
                                squeeze=False, sharey=True)
    for row, context in enumerate(contexts):
        for column, (task, split) in enumerate(panels):
            axis = axes[row][column]
            metric, label = METRIC[task]
            for name, where in _rows(records, config):
                found = sorted(_select(records, task=task, context_tokens=context, split=split, **where),
                               key=lambda r: r["keep_ratio"])
                if not found:
                    continue
                if where["policy"] == "full":
                    axis.axhline(found[0][metric], color="black", linestyle="--", label="full cache")
                    continue
                if _is_positional(where["policy"]):
                    # Not the same cells per question: the question takes the recent window, and
                    # the ratio is of the longer prompt.
                    color = SOURCE_COLOR["per question"] if where["mode"] == "query_aware" else "gray"
                    marker, style = "x", ":"
                elif single_source:  # one source: a colour per policy, so variants can be told apart
                    marker, style = POLICY_MARKER.get(where["policy"], ("o", "-"))
                    color = policy_colors[where["policy"]]
                else:
                    source = "per question" if where["mode"] == "query_aware" else where["observe"]
                    color = source_colors.get(source, "tab:purple")
                    marker, style = POLICY_MARKER.get(where["policy"], ("P", "-."))
                ratios = [r["keep_ratio"] for r in found]
                values = [r[metric] for r in found]
                # max(0, ...): an interval of zero width can round to a hair inside its mean.
                errors = [[max(0.0, v - r["ci95"][0]) for v, r in zip(values, found)],
                          [max(0.0, r["ci95"][1] - v) for v, r in zip(values, found)]]
                axis.errorbar(ratios, values, yerr=errors if where["policy"] == "lava" else None, color=color,
                              linestyle=style, marker=marker, capsize=3, label=name, alpha=0.9)
            axis.set_title(f"{task}, {SPLIT_LABEL[split]}, {context} tokens", fontsize=9)
            axis.set_xlabel("keep ratio")
            axis.set_xticks(config["keep_ratios"])
            axis.set_ylim(-0.02, 1.02)
            if column == 0:
                axis.set_ylabel(label if len(config["tasks"]) == 1 else "accuracy / top-1")
            axis.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    # As many columns as the longest label lets fit across the figure (7-point text).
    label_inches = 0.06 * max(map(len, labels), default=1) + 0.5
    columns = max(1, min(6, len(labels), int(figure.get_figwidth() // label_inches)))
    figure.legend(handles, labels, fontsize=7, loc="lower center", ncol=columns, bbox_to_anchor=(0.5, 0.0))
    # Room below the axes for the legend: about 0.17 inch per legend row, plus a margin.
    legend_inches = 0.2 + 0.17 * math.ceil(len(labels) / columns)
    figure.set_figheight(figure.get_figheight() + legend_inches)  # the panels keep their height
    figure.tight_layout(rect=(0, legend_inches / figure.get_figheight(), 1, 1))
    figure.savefig(path, dpi=110)
    plt.close(figure)


def write_quality_report(result: dict, out_dir: Path, command: str, notes: str | None = None) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    records, meta = result["records"], result["meta"]
    paths = [out_dir / "quality.json", out_dir / "quality.md", out_dir / "quality.png"]
    replace_file(paths[0], json.dumps(records, indent=1) + "\n")
    replace_file(paths[1], markdown(records, meta, command, notes))
    plot(records, meta["config"], paths[2])
    return paths
