"""Right answers of `bench quality` retrieval runs pooled over several runs (sets of
documents, lengths): per observation source, policy and keep ratio, the questions answered
right, and the full cache's on the same questions.

    python scripts/pool_quality.py docs/results/reuse/4k docs/results/reuse/4k_seed1 docs/results/reuse/4k_seed2

Each argument is a run's folder (its quality.json) or the file itself. A cell is pooled over
every (run, document length) that has it, and compared with the full cache's count over the
same (run, length).
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path


def retrieval_counts(records: list[dict]) -> dict[tuple, tuple[int, int]]:
    """(context, observe, policy, keep ratio) -> (right, questions), over all questions of a run."""
    return {(record["context_tokens"], record["observe"], record["policy"], record["keep_ratio"]):
            (round(record["accuracy"] * record["n_questions"]), record["n_questions"])
            for record in records if record["task"] == "retrieval" and record["split"] == "all"}


def pooled(runs: list[list[dict]]) -> dict[tuple, tuple[int, int, int]]:
    """(observe, policy, keep ratio) -> (right, questions, the full cache's right on them)."""
    totals = defaultdict(lambda: [0, 0, 0])
    for records in runs:
        counts = retrieval_counts(records)
        for (context, observe, policy, keep), (right, questions) in counts.items():
            if policy == "full":
                continue
            full_right, full_questions = counts[(context, observe, "full", 1.0)]
            if full_questions != questions:
                raise ValueError(f"{policy} at {context} tokens answered {questions} questions, the full cache "
                                 f"{full_questions}")
            cell = totals[(observe, policy, keep)]
            cell[0] += right
            cell[1] += questions
            cell[2] += full_right
    return {key: tuple(cell) for key, cell in totals.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="a bench quality output folder, or its quality.json")
    args = parser.parse_args()
    runs = []
    for path in args.runs:
        file = path / "quality.json" if path.is_dir() else path
        if not file.is_file():
            parser.error(f"{path}: no quality.json there")
        runs.append(json.loads(file.read_text()))
    print(f"runs: {', '.join(map(str, args.runs))}")
    print()
    print("| observe | policy | keep | right | questions | full cache right | x full |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for (observe, policy, keep), (right, questions, full_right) in sorted(pooled(runs).items()):
        share = f"{right / full_right:.2f}" if full_right else "n/a"
        print(f"| {observe} | {policy} | {keep:g} | {right} | {questions} | {full_right} | {share} |")


if __name__ == "__main__":
    main()
