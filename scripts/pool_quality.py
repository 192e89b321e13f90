"""Right answers of `bench quality` retrieval runs pooled over several runs (sets of
documents, lengths): per mode, observation source, policy and keep ratio, the questions
answered right, and the full cache's on the same questions.

    python scripts/pool_quality.py docs/results/reuse/4k docs/results/reuse/4k_seed1 docs/results/reuse/4k_seed2

Each argument is a run's folder (its quality.json and quality_meta.json) or its quality.json,
with the meta file beside it. A run cut short is refused, and so are two runs with the same
cell (mode, source, policy, keep ratio) on the same questions (the same seed and facts per
document at a length): pooled, each question would count twice. A cell is pooled over every
(run, document length) that has it, and compared with the full cache's count over the same
(run, length, mode). A policy is pooled by its name: runs made when its defaults differed are
pooled as one policy.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

from lava_sglang.bench.report import questions_planned


def retrieval_counts(records: list[dict]) -> dict[tuple, tuple[int, int]]:
    """(context, mode, observe, policy, keep ratio) -> (right, questions), over all questions of a run."""
    return {(record["context_tokens"], record["mode"], record["observe"], record["policy"], record["keep_ratio"]):
            (round(record["accuracy"] * record["n_questions"]), record["n_questions"])
            for record in records if record["task"] == "retrieval" and record["split"] == "all"}


def cells_asked(meta: dict, records: list[dict]) -> set[tuple]:
    """(seed, facts per document, context, mode, observe, policy, keep ratio) of every retrieval
    cell of a run: the seed and the facts decide the questions at a length
    (`quality.benchmark_documents` builds the documents from them)."""
    config = meta["config"]
    return {(config["seed"], tuple(config["facts_per_document"]), *cell) for cell in retrieval_counts(records)}


def pooled(runs: list[list[dict]]) -> dict[tuple, tuple[int, int, int]]:
    """(mode, observe, policy, keep ratio) -> (right, questions, the full cache's right on them)."""
    totals = defaultdict(lambda: [0, 0, 0])
    for records in runs:
        counts = retrieval_counts(records)
        for (context, mode, observe, policy, keep), (right, questions) in counts.items():
            if policy == "full":
                continue
            full_right, full_questions = counts[(context, mode, observe, "full", 1.0)]
            if full_questions != questions:
                raise ValueError(f"{policy} at {context} tokens answered {questions} questions, the full cache "
                                 f"{full_questions}")
            cell = totals[(mode, observe, policy, keep)]
            cell[0] += right
            cell[1] += questions
            cell[2] += full_right
    return {key: tuple(cell) for key, cell in totals.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="a bench quality output folder, or its quality.json")
    args = parser.parse_args()
    runs, asked_by = [], {}
    for path in args.runs:
        file = path / "quality.json" if path.is_dir() else path
        if not file.is_file():
            parser.error(f"{path}: no quality.json there")
        meta_file = file.with_name("quality_meta.json")
        if not meta_file.is_file():
            parser.error(f"{path}: no quality_meta.json beside its quality.json: the questions it asked are unknown")
        meta = json.loads(meta_file.read_text())
        planned = questions_planned(meta)
        if meta.get("questions_done", planned) < planned:
            parser.error(f"{path}: a run cut short ({meta['questions_done']} of {planned} questions): its cells "
                         "hold other questions than a whole run's")
        records = json.loads(file.read_text())
        for asked in sorted(cells_asked(meta, records), key=str):
            if asked in asked_by:
                seed, facts, context, mode, observe, policy, keep = asked
                parser.error(f"{asked_by[asked]} and {path} both have {mode} {observe} {policy} at keep {keep:g} on "
                             f"the same questions at {context} tokens (seed {seed}, facts per document "
                             f"{list(facts)}): pooled, each would count twice")
            asked_by[asked] = path
        runs.append(records)
    print(f"runs: {', '.join(map(str, args.runs))}")
    print()
    print("| mode | observe | policy | keep | right | questions | full cache right | x full |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    for (mode, observe, policy, keep), (right, questions, full_right) in sorted(pooled(runs).items()):
        share = f"{right / full_right:.2f}" if full_right else "n/a"
        print(f"| {mode} | {observe} | {policy} | {keep:g} | {right} | {questions} | {full_right} | {share} |")


if __name__ == "__main__":
    main()
