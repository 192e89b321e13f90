"""Right answers of `bench quality` retrieval runs pooled over several runs (sets of
documents, lengths): per mode, observation source, policy and keep ratio, the questions
answered right, and the full cache's on the same questions.

    python scripts/pool_quality.py docs/results/reuse/4k docs/results/reuse/4k_seed1 docs/results/reuse/4k_seed2
    python scripts/pool_quality.py --context 1024 RUN RUN ...   (one length of runs that have several)

Each argument is a run's folder (its quality.json and quality_meta.json) or its quality.json,
with the meta file beside it. A run cut short is refused, and so are two runs with the same
pooled cell (mode, source, policy, keep ratio; the full cache's and `--against`'s cells are
only compared with) at a length with the same seed: whatever the facts per
document, their documents are drawn from one random stream and may share questions (two
patterns that give the same documents, [8] and [8, 8], share them all; [1, 4, 8] and
[1, 8, 4] the first document's), which pooled would count twice. A cell is pooled over every
(run, document length) that has it, and compared with the full cache's count over the same
(run, length, mode), with a 95% interval of that share: a bootstrap over the pooled documents,
each document's right answers paired with the full cache's on its questions
(`stats.share_interval`; runs written before 2026-12-06 have no per-document counts, and a
cell with one of them has no interval; where every document has the same share, every
resample has it too, and the interval, of zero width, is marked so). A policy is pooled by
its name: runs made when its defaults differed are pooled as one policy. The share is a ratio
of right answers, and a compressed cache is right on some questions the full cache misses: the
last column is the share of the reference's right answers the cell answers right too, from
the questions each record names (`right_questions`, since 2026-12-07), with its 95% interval
by the same bootstrap over documents; a run whose records lack them adds the most it can be
(per document, the fewer of the two counts), and the column then says "at most", without an
interval.

    python scripts/pool_quality.py --facts 8 RUN RUN ...   (the documents with 8 planted facts only)

`--facts K` restricts every cell to the documents with K planted facts (one question each),
from each record's per-document counts: where the questions a compressed copy loses are.

    python scripts/pool_quality.py --against kvzip RUN RUN ...

compares each cell with another policy's at the same keep ratio instead of the full cache's
(the same questions, the same source, the same interval over documents): how far lava is from
kvzip, with its uncertainty. Cells of a mode and source the other policy did not run at a
length are left out (kvzip runs compress_once with reconstruct only); one it ran at other keep
ratios only is refused.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from lava_sglang.bench.report import cut_short, hits, kept_by_document, normalise, paired_by_document
from lava_sglang.bench.stats import share_interval


def retrieval_records(records: list[dict]) -> dict[tuple, dict]:
    """(context, mode, observe, policy, keep ratio) -> the record over all questions of a run."""
    return {(record["context_tokens"], record["mode"], record["observe"], record["policy"], record["keep_ratio"]):
            record for record in records if record["task"] == "retrieval" and record["split"] == "all"}


def cells_pooled(meta: dict, records: list[dict], against: str) -> set[tuple]:
    """(seed, context, mode, observe, policy, keep ratio) of every retrieval cell of a run that
    is pooled (not the full cache's or `against`'s, which are only compared with): at a length,
    the seed starts the random stream its documents are drawn from
    (`quality.benchmark_documents`)."""
    return {(meta["config"]["seed"], *cell) for cell in retrieval_records(records)
            if cell[3] not in ("full", against)}


def read_meta(file: Path) -> dict | None:
    """A quality_meta.json's object, None where the file holds something else."""
    try:
        meta = json.loads(file.read_text())
    except ValueError:
        return None
    return meta if isinstance(meta, dict) and isinstance(meta.get("config"), dict) else None


def read_records(file: Path) -> list[dict]:
    """A quality.json's records, those of runs before sources and splits existed normalised
    (`report.normalise`); a ValueError where the file holds no list of records."""
    records = json.loads(file.read_text())
    if not isinstance(records, list) or not all(isinstance(record, dict) and "policy" in record
                                                for record in records):
        raise ValueError(f"{file} does not hold a list of bench quality records")
    return normalise(records)


@dataclass
class Pooled:
    """One cell pooled: right answers, questions, the reference's right answers on them (the
    full cache's, or another policy's), (right, reference's right) per document, None where
    a run's records lack their documents' counts (runs before 2026-12-06), and the reference's
    right answers the cell's are too, per document as (kept, the reference's right): counted
    where the records name the questions answered right (since 2026-12-07), bounded by each
    document's counts where they do not (`kept_is_bound`), None where a run's records have
    neither."""
    right: int = 0
    questions: int = 0
    reference_right: int = 0
    by_document: list[tuple[int, int]] | None = field(default_factory=list)
    kept_by_document: list[tuple[int, int]] | None = field(default_factory=list)
    kept_is_bound: bool = False

    def interval(self) -> tuple[float, float] | None:
        return None if self.by_document is None else share_interval(self.by_document)

    @property
    def kept(self) -> int | None:
        return None if self.kept_by_document is None else sum(kept for kept, _ in self.kept_by_document)

    def kept_interval(self) -> tuple[float, float] | None:
        """The interval of the share kept, over documents as the share's; None where it is a bound."""
        return None if self.kept_by_document is None or self.kept_is_bound else share_interval(self.kept_by_document)


def with_facts(record: dict, facts: int) -> dict:
    """A retrieval record (over all its questions) restricted to its documents of `facts`
    planted facts: one question is asked per fact, so those with as many questions. A
    ValueError where the record lacks its documents' counts (runs before 2026-12-06)."""
    if "by_document" not in record:
        raise ValueError(f"the {record['policy']} cell at {record['context_tokens']} tokens has no per-document "
                         "counts (a run before 2026-12-06): its documents' facts are unknown")
    rows = [row for row in record["by_document"] if row[2] == facts]
    documents = {document for document, _, _ in rows}
    asked = sum(row[2] for row in rows)
    restricted = {**record, "by_document": rows, "n_questions": asked,
                  "accuracy": sum(row[1] for row in rows) / asked if asked else 0.0}
    if "right_questions" in record:
        restricted["right_questions"] = [pair for pair in record["right_questions"] if pair[0] in documents]
    return restricted


def pooled(runs: list[list[dict]], context: int | None = None, against: str = "full",
           facts: int | None = None) -> dict[tuple, Pooled]:
    """(mode, observe, policy, keep ratio) -> the cell pooled over every run and length (with
    `context`, that length only; with `facts`, the documents of that many planted facts only),
    against the full cache's cell on the same questions or, with `against`, that policy's at
    the same keep ratio; a document is one of the bootstrap's clusters in each run and length.
    A cell whose mode and source `against` did not run at that length is left out; one without
    its reference cell otherwise is refused."""
    totals: dict[tuple, Pooled] = defaultdict(Pooled)
    reference_name = "the full cache" if against == "full" else against
    for records in runs:
        cells = retrieval_records(records)
        reference_ran = {(length, mode, observe) for length, mode, observe, policy, _ in cells if policy == against}
        for (length, mode, observe, policy, keep), record in cells.items():
            if policy in ("full", against) or context not in (None, length):
                continue
            if against != "full" and (length, mode, observe) not in reference_ran:
                continue
            reference_key = (length, mode, observe, against, 1.0 if against == "full" else keep)
            if reference_key not in cells:
                raise ValueError(f"{policy} at keep {keep:g} ({mode}, {observe}, {length} tokens) has no cell of "
                                 f"{reference_name} to compare with in its run")
            reference = cells[reference_key]
            if reference["n_questions"] != record["n_questions"]:
                raise ValueError(f"{policy} at {length} tokens answered {record['n_questions']} questions, "
                                 f"{reference_name} {reference['n_questions']}")
            if facts is not None:
                record, reference = with_facts(record, facts), with_facts(reference, facts)
                if not record["n_questions"]:
                    continue
            cell = totals[(mode, observe, policy, keep)]
            cell.right += hits(record)
            cell.questions += record["n_questions"]
            cell.reference_right += hits(reference)
            pairs = paired_by_document(record, reference) if "by_document" in record and "by_document" in reference \
                else None
            cell.by_document = None if cell.by_document is None or pairs is None else cell.by_document + pairs
            kept = kept_by_document(record, reference)
            if kept is None and pairs is not None:
                kept = [(min(right, reference_right), reference_right) for right, reference_right in pairs]
                cell.kept_is_bound = True
            cell.kept_by_document = None if cell.kept_by_document is None or kept is None \
                else cell.kept_by_document + kept
    return dict(totals)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="a bench quality output folder, or its quality.json")
    parser.add_argument("--context", type=int, help="pool the documents of this length (tokens) only (default: "
                        "every length)")
    parser.add_argument("--facts", type=int, metavar="K", help="pool the documents with K planted facts only "
                        "(one question each; runs since 2026-12-06; default: every document)")
    parser.add_argument("--against", default="full", metavar="POLICY",
                        help="compare each cell with this policy's at the same keep ratio, e.g. kvzip (default: the "
                        "full cache)")
    args = parser.parse_args()
    runs, asked_by = [], {}
    for path in args.runs:
        file = path / "quality.json" if path.is_dir() else path
        if not file.is_file():
            parser.error(f"{path}: no quality.json there")
        meta_file = file.with_name("quality_meta.json")
        if not meta_file.is_file():
            parser.error(f"{path}: no quality_meta.json beside its quality.json: the questions it asked are unknown")
        meta = read_meta(meta_file)
        if meta is None:
            parser.error(f"{meta_file} does not hold a bench quality run's meta (a JSON object with its config)")
        if short := cut_short(meta):
            parser.error(f"{path}: a run cut short ({short[0]} of {short[1]} questions): its cells "
                         "hold other questions than a whole run's")
        try:
            records = read_records(file)
        except ValueError as error:
            parser.error(str(error))
        for asked in sorted(cells_pooled(meta, records, args.against), key=str):
            if asked in asked_by:
                seed, context, mode, observe, policy, keep = asked
                parser.error(f"{asked_by[asked]} and {path} both have {mode} {observe} {policy} at keep {keep:g} at "
                             f"{context} tokens with seed {seed}: their documents may share questions, which "
                             "pooled would count twice")
            asked_by[asked] = path
        runs.append(records)
    try:
        cells = pooled(runs, args.context, args.against, args.facts)
    except ValueError as error:
        parser.error(str(error))
    if not cells:
        where = ("" if args.context is None else f" at {args.context} tokens") + (
            "" if args.facts is None else f" on documents of {args.facts} facts")
        against = "" if args.against == "full" else f" with a cell of {args.against} to compare with"
        parser.error(f"no retrieval cell{where}{against} in these runs")
    print(f"runs: {', '.join(map(str, args.runs))}; documents of "
          f"{'every length' if args.context is None else f'{args.context} tokens'}"
          f"{'' if args.facts is None else f', {args.facts} planted facts'}")
    print()
    reference = "full cache" if args.against == "full" else args.against
    print(f"| mode | observe | policy | keep | right | questions | {reference} right | x {args.against} | "
          "95% interval | of its right answers kept |")
    print("|---|---|---|---:|---:|---:|---:|---:|---|---:|")
    for (mode, observe, policy, keep), cell in sorted(cells.items()):
        share, shown, kept = "n/a", "n/a", "n/a"
        if cell.reference_right:
            share = f"{cell.right / cell.reference_right:.2f}"
            if cell.kept is not None:
                kept = ("at most " if cell.kept_is_bound else "") + f"{cell.kept / cell.reference_right:.2f}"
                if (kept_interval := cell.kept_interval()) is not None:
                    kept += f" ({kept_interval[0]:.2f}-{kept_interval[1]:.2f})"
            interval = cell.interval()
            shown = "n/a (runs without per-document counts)" if interval is None else \
                f"{interval[0]:.2f}-{interval[1]:.2f}" + (" (every document the same share)"
                                                          if interval[0] == interval[1] else "")
        print(f"| {mode} | {observe} | {policy} | {keep:g} | {cell.right} | {cell.questions} | {cell.reference_right} "
              f"| {share} | {shown} | {kept} |")


if __name__ == "__main__":
    main()
