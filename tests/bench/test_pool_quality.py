"""scripts/pool_quality.py on hand-made records: counts pooled over runs and lengths, each
cell against the full cache's count on the same questions."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "pool_quality.py"
spec = importlib.util.spec_from_file_location("pool_quality", SCRIPT)
pool_quality = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = pool_quality  # its dataclass looks its module up there
spec.loader.exec_module(pool_quality)


def record(context, policy, keep, right, questions, observe="reconstruct", split="all", task="retrieval",
           mode="compress_once"):
    return {"task": task, "context_tokens": context, "mode": mode, "observe": observe, "split": split,
            "policy": policy, "keep_ratio": keep, "n_questions": questions, "accuracy": right / questions}


def test_cells_are_pooled_over_runs_and_lengths_against_the_full_cache_on_the_same_questions():
    first = [record(1024, "full", 1.0, 30, 80), record(1024, "lava", 0.2, 24, 80),
             record(1024, "lava", 0.2, 9, 40, split="later"),  # a split's cell is not counted again
             record(1024, "lava", 0.2, 5, 40, task="fidelity"),
             record(2048, "full", 1.0, 28, 80), record(2048, "lava", 0.2, 21, 80)]
    second = [record(4096, "full", 1.0, 13, 40), record(4096, "lava", 0.2, 11, 40),
              record(4096, "full", 1.0, 13, 40, observe="reconstruct:view=chunk"),
              record(4096, "lava", 0.2, 10, 40, observe="reconstruct:view=chunk"),
              # the query-aware mode's cells, under the same source: pooled apart, against its own full cache
              record(4096, "full", 1.0, 7, 20, mode="query_aware"),
              record(4096, "lava", 0.2, 6, 20, mode="query_aware")]
    cells = pool_quality.pooled([first, second])
    assert {key: (cell.right, cell.questions, cell.reference_right) for key, cell in cells.items()} == {
        ("compress_once", "reconstruct", "lava", 0.2): (56, 200, 71),
        ("compress_once", "reconstruct:view=chunk", "lava", 0.2): (10, 40, 13),
        ("query_aware", "reconstruct", "lava", 0.2): (6, 20, 7),
    }
    assert all(cell.interval() is None for cell in cells.values())  # no per-document counts in these records
    by_length = pool_quality.pooled([first, second], context=2048)
    assert {key: (cell.right, cell.questions, cell.reference_right) for key, cell in by_length.items()} == {
        ("compress_once", "reconstruct", "lava", 0.2): (21, 80, 28)}


def test_a_cell_on_other_questions_than_the_full_caches_is_refused():
    with pytest.raises(ValueError, match="answered 40 questions, the full cache 80"):
        pool_quality.pooled([[record(1024, "full", 1.0, 30, 80), record(1024, "lava", 0.2, 10, 40)]])


def write_run(folder: Path, records: list[dict], seed: int = 0, facts=(1, 4, 8), **meta) -> Path:
    folder.mkdir()
    (folder / "quality.json").write_text(json.dumps(records))
    config = {"seed": seed, "facts_per_document": list(facts), "questions": [80], "tasks": ["retrieval"]}
    (folder / "quality_meta.json").write_text(json.dumps({"config": config, **meta}))
    return folder


def run_main(monkeypatch, *folders: Path) -> None:
    monkeypatch.setattr(sys, "argv", ["pool_quality.py", *map(str, folders)])
    pool_quality.main()


def test_a_run_cut_short_is_refused(tmp_path, capsys, monkeypatch):
    short = write_run(tmp_path / "short", [record(1024, "full", 1.0, 30, 80)], questions_done=40)
    with pytest.raises(SystemExit):
        run_main(monkeypatch, short)  # an older meta: the planned count from its config
    assert "a run cut short (40 of 80 questions)" in capsys.readouterr().err


def test_one_cell_on_the_same_questions_in_two_runs_is_not_pooled(tmp_path, capsys, monkeypatch):
    records = [record(1024, "full", 1.0, 30, 80), record(1024, "lava", 0.2, 24, 80)]
    first = write_run(tmp_path / "first", records)
    other_seed = write_run(tmp_path / "other_seed", records, seed=1)
    # The same questions under another source: cells of their own, each against its run's full cache.
    other_source = write_run(tmp_path / "other_source", [record(1024, "full", 1.0, 30, 80, observe="tail"),
                                                         record(1024, "lava", 0.2, 20, 80, observe="tail")])
    # Other facts per document, the same seed: drawn from one random stream, the documents share questions.
    other_facts = write_run(tmp_path / "other_facts", records, facts=[8])
    for twice in ((first, first / "quality.json"), (first, other_seed, first), (first, other_facts)):
        with pytest.raises(SystemExit):
            run_main(monkeypatch, *twice)
        assert ("both have compress_once reconstruct lava at keep 0.2 at 1024 tokens with seed 0: their documents "
                "may share questions") in capsys.readouterr().err
    # Their full caches' cells are only compared with, never pooled: another policy on the same
    # documents pools apart, each run's cells against its own full cache.
    kvzip = write_run(tmp_path / "kvzip", [record(1024, "full", 1.0, 30, 80), record(1024, "kvzip", 0.2, 22, 80)])
    run_main(monkeypatch, first, kvzip)
    out = capsys.readouterr().out
    assert "| lava | 0.2 | 24 | 80 | 30 | 0.80 |" in out and "| kvzip | 0.2 | 22 | 80 | 30 | 0.73 |" in out
    run_main(monkeypatch, first, other_seed, other_source)
    out = capsys.readouterr().out
    assert "| compress_once | reconstruct | lava | 0.2 | 48 | 160 | 60 | 0.80 | n/a (runs without per-document" in out
    assert "| compress_once | tail | lava | 0.2 | 20 | 80 | 30 | 0.67 | n/a" in out


def test_a_run_without_its_meta_is_refused(tmp_path, capsys, monkeypatch):
    (tmp_path / "quality.json").write_text(json.dumps([record(1024, "full", 1.0, 30, 80)]))
    with pytest.raises(SystemExit):
        run_main(monkeypatch, tmp_path)
    assert "no quality_meta.json" in capsys.readouterr().err


def test_files_that_hold_no_run_are_refused_and_older_records_read(tmp_path, capsys, monkeypatch):
    run = write_run(tmp_path / "run", [record(1024, "full", 1.0, 30, 80), record(1024, "lava", 0.2, 24, 80)])
    for given, message in ((run / "quality_meta.json", "does not hold a list of bench quality records"),
                           (write_run(tmp_path / "partial", {"records": [], "meta": {}}),
                            "does not hold a list of bench quality records")):
        with pytest.raises(SystemExit):
            run_main(monkeypatch, given)
        assert message in capsys.readouterr().err
    (run / "quality_meta.json").write_text("[]")
    with pytest.raises(SystemExit):
        run_main(monkeypatch, run)
    assert "does not hold a bench quality run's meta" in capsys.readouterr().err
    # Records written before sources and splits existed: the tail's, over all questions.
    older = [{key: value for key, value in cell.items() if key not in ("observe", "split")}
             for cell in (record(1024, "full", 1.0, 30, 80), record(1024, "lava", 0.2, 6, 80))]
    run_main(monkeypatch, write_run(tmp_path / "older", older))
    assert "| compress_once | tail | lava | 0.2 | 6 | 80 | 30 | 0.20 |" in capsys.readouterr().out


def with_documents(cell: dict, right_per_document: list[int], asked: int) -> dict:
    return {**cell, "by_document": [[document, right, asked] for document, right in enumerate(right_per_document)]}


def test_the_pooled_share_is_resampled_over_every_runs_documents(tmp_path, capsys, monkeypatch):
    # Two runs of 4 documents of 2 questions: the full cache right on every question, lava on
    # one of each document's two in the first run and on both or none in the second.
    first = [with_documents(record(1024, "full", 1.0, 8, 8), [2] * 4, 2),
             with_documents(record(1024, "lava", 0.2, 4, 8), [1] * 4, 2)]
    second = [with_documents(record(2048, "full", 1.0, 8, 8), [2] * 4, 2),
              with_documents(record(2048, "lava", 0.2, 4, 8), [2, 0, 2, 0], 2)]
    (cell,) = pool_quality.pooled([first, second]).values()
    assert (cell.right, cell.reference_right) == (8, 16)
    assert cell.by_document == [(1, 2)] * 4 + [(2, 2), (0, 2), (2, 2), (0, 2)]  # 8 documents, not 4
    low, high = cell.interval()
    assert low < 0.5 < high
    assert pool_quality.pooled([first]).popitem()[1].interval() == (0.5, 0.5)
    # A run without the counts leaves the pooled cell without an interval.
    older = [record(4096, "full", 1.0, 8, 8), record(4096, "lava", 0.2, 4, 8)]
    assert pool_quality.pooled([first, older]).popitem()[1].interval() is None
    folders = write_run(tmp_path / "first", first), write_run(tmp_path / "second", second)
    run_main(monkeypatch, *folders)
    assert f"| compress_once | reconstruct | lava | 0.2 | 8 | 16 | 16 | 0.50 | {low:.2f}-{high:.2f} |" in (
        capsys.readouterr().out)
    run_main(monkeypatch, "--context", "1024", *folders)
    out = capsys.readouterr().out
    assert "documents of 1024 tokens" in out
    assert "| 0.2 | 4 | 8 | 8 | 0.50 | 0.50-0.50 (every document the same share) |" in out
    with pytest.raises(SystemExit):
        run_main(monkeypatch, "--context", "4096", *folders)
    assert "no retrieval cell at 4096 tokens" in capsys.readouterr().err


def test_against_another_policy_each_cell_is_paired_with_its_cell_at_the_same_keep_ratio(tmp_path, capsys,
                                                                                        monkeypatch):
    # 3 documents of 4 questions; kvzip right on 2 of each at keep 0.2 and 1 at keep 0.1.
    run = [with_documents(record(2048, "full", 1.0, 12, 12), [4] * 3, 4),
           with_documents(record(2048, "kvzip", 0.2, 6, 12), [2] * 3, 4),
           with_documents(record(2048, "lava", 0.2, 9, 12), [3] * 3, 4),
           with_documents(record(2048, "kvzip", 0.1, 3, 12), [1] * 3, 4),
           with_documents(record(2048, "lava", 0.1, 6, 12), [2, 2, 2], 4)]
    cells = pool_quality.pooled([run], against="kvzip")
    assert {key: (cell.right, cell.reference_right, cell.interval()) for key, cell in cells.items()} == {
        ("compress_once", "reconstruct", "lava", 0.2): (9, 6, (1.5, 1.5)),
        ("compress_once", "reconstruct", "lava", 0.1): (6, 3, (2.0, 2.0)),
    }
    # A run with lava at a ratio kvzip did not run is refused, not compared with another ratio;
    # a mode or source kvzip never runs is left out.
    with pytest.raises(ValueError, match="lava at keep 0.4 .* has no cell of kvzip"):
        pool_quality.pooled([run + [record(2048, "lava", 0.4, 10, 12)]], against="kvzip")
    other_cells = [record(2048, "full", 1.0, 12, 12, mode="query_aware"), record(2048, "lava", 0.2, 8, 12,
                                                                                mode="query_aware"),
                   record(2048, "full", 1.0, 12, 12, observe="tail"), record(2048, "lava", 0.2, 1, 12, observe="tail")]
    assert pool_quality.pooled([run + other_cells], against="kvzip").keys() == cells.keys()
    run_main(monkeypatch, "--against", "kvzip", write_run(tmp_path / "run", run))
    out = capsys.readouterr().out
    assert "| right | questions | kvzip right | x kvzip |" in out
    assert ("| compress_once | reconstruct | lava | 0.2 | 9 | 12 | 6 | 1.50 | 1.50-1.50 (every document the same "
            "share) |") in out
    assert "| compress_once | reconstruct | kvzip |" not in out  # the reference, not a row
    with pytest.raises(SystemExit):
        run_main(monkeypatch, "--against", "snapkv", tmp_path / "run")
    assert "no retrieval cell with a cell of snapkv to compare with in these runs" in capsys.readouterr().err


def test_the_full_caches_right_answers_kept_are_bounded_by_each_documents_counts(tmp_path, capsys, monkeypatch):
    # Right on more questions than the full cache (1.50x), but on its first document only one of
    # the full cache's two and on the second none of them: at most 1 of its 2 right answers kept.
    run = [with_documents(record(1024, "full", 1.0, 2, 4), [2, 0], 2),
           with_documents(record(1024, "lava", 0.2, 3, 4), [1, 2], 2)]
    (cell,) = pool_quality.pooled([run]).values()
    assert (cell.right, cell.reference_right, cell.kept, cell.kept_is_bound) == (3, 2, 1, True)
    run_main(monkeypatch, write_run(tmp_path / "run", run))
    (row,) = [line for line in capsys.readouterr().out.splitlines() if "| lava |" in line]
    assert row.startswith("| compress_once | reconstruct | lava | 0.2 | 3 | 4 | 2 | 1.50 |")
    assert row.endswith("| at most 0.50 |")  # these records do not say which questions were right


def test_the_full_caches_right_answers_kept_are_counted_where_the_records_name_the_questions(
        tmp_path, capsys, monkeypatch):
    # Each document's counts allow 2 of the full cache's 2 right answers kept, but on the first
    # document lava is right on the question the full cache missed: 1 of them is.
    full = {**with_documents(record(1024, "full", 1.0, 2, 4), [1, 1], 2), "right_questions": [[0, 0], [1, 0]]}
    lava = {**with_documents(record(1024, "lava", 0.2, 3, 4), [1, 2], 2),
            "right_questions": [[0, 1], [1, 0], [1, 1]]}
    (cell,) = pool_quality.pooled([[full, lava]]).values()
    assert (cell.kept, cell.kept_is_bound) == (1, False)  # the counts alone would allow 2
    run_main(monkeypatch, write_run(tmp_path / "named", [full, lava]))
    (row,) = [line for line in capsys.readouterr().out.splitlines() if "| lava |" in line]
    assert row.startswith("| compress_once | reconstruct | lava | 0.2 | 3 | 4 | 2 | 1.50 |")
    assert row.endswith("| 0.50 (0.00-1.00) |")  # kept 0 of 1 and 1 of 1: resampled over the two documents
    assert cell.kept_by_document == [(0, 1), (1, 1)]
    # Pooled with a run whose records do not name them: that run's bound is added to the count.
    older = [with_documents(record(2048, "full", 1.0, 2, 2), [2], 2),
             with_documents(record(2048, "lava", 0.2, 1, 2), [1], 2)]
    (cell,) = pool_quality.pooled([[full, lava], older]).values()
    assert (cell.kept, cell.kept_is_bound) == (2, True)
    run_main(monkeypatch, tmp_path / "named", write_run(tmp_path / "older", older, seed=1))
    (row,) = [line for line in capsys.readouterr().out.splitlines() if "| lava |" in line]
    assert row.endswith("| at most 0.50 |")  # 2 of the full cache's 4 right answers, at most: no interval of a bound
    # Two runs whose questions are numbered alike: each run's against its own full cache's (1 and
    # 2 kept), not the pairs of both runs in one set (2).
    second_lava = {**lava, "right_questions": [[0, 0], [1, 0], [1, 1]]}
    (cell,) = pool_quality.pooled([[full, lava], [full, second_lava]]).values()
    assert (cell.kept, cell.reference_right) == (3, 4)
    # Against another policy: its named questions are the reference.
    kvzip = {**lava, "policy": "kvzip", "right_questions": [[0, 1], [1, 1]]}
    (cell,) = pool_quality.pooled([[full, lava, kvzip]], against="kvzip").values()
    assert (cell.right, cell.reference_right, cell.kept) == (3, 3, 2)


def test_facts_restricts_every_cell_to_the_documents_with_that_many_questions(tmp_path, capsys, monkeypatch):
    # Documents of 1, 4 and 4 facts (one question each): with --facts 4, the last two only.
    full = {**record(1024, "full", 1.0, 6, 9), "by_document": [[0, 1, 1], [1, 3, 4], [2, 2, 4]],
            "right_questions": [[0, 0], [1, 0], [1, 1], [1, 2], [2, 0], [2, 1]]}
    lava = {**record(1024, "lava", 0.2, 3, 9), "by_document": [[0, 1, 1], [1, 1, 4], [2, 1, 4]],
            "right_questions": [[0, 0], [1, 3], [2, 1]]}
    (cell,) = pool_quality.pooled([[full, lava]], facts=4).values()
    assert (cell.right, cell.questions, cell.reference_right, cell.kept) == (2, 8, 5, 1)
    assert cell.by_document == [(1, 3), (1, 2)] and cell.kept_by_document == [(0, 3), (1, 2)]
    assert not pool_quality.pooled([[full, lava]], facts=8)  # no document of 8 facts
    run_main(monkeypatch, "--facts", "1", write_run(tmp_path / "run", [full, lava]))
    out = capsys.readouterr().out
    assert "1 planted facts" in out and "| compress_once | reconstruct | lava | 0.2 | 1 | 1 | 1 | 1.00 |" in out
    with pytest.raises(SystemExit):
        run_main(monkeypatch, "--facts", "8", tmp_path / "run")
    assert "no retrieval cell on documents of 8 facts in these runs" in capsys.readouterr().err
    older = write_run(tmp_path / "older", [record(1024, "full", 1.0, 6, 9), record(1024, "lava", 0.2, 3, 9)], seed=1)
    with pytest.raises(SystemExit):
        run_main(monkeypatch, "--facts", "4", older)
    assert "the lava cell at 1024 tokens has no per-document counts" in capsys.readouterr().err
