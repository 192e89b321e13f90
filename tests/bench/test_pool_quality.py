"""scripts/pool_quality.py on hand-made records: counts pooled over runs and lengths, each
cell against the full cache's count on the same questions."""

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "pool_quality.py"
spec = importlib.util.spec_from_file_location("pool_quality", SCRIPT)
pool_quality = importlib.util.module_from_spec(spec)
spec.loader.exec_module(pool_quality)


def record(context, policy, keep, right, questions, observe="reconstruct", split="all", task="retrieval"):
    return {"task": task, "context_tokens": context, "mode": "compress_once", "observe": observe, "split": split,
            "policy": policy, "keep_ratio": keep, "n_questions": questions, "accuracy": right / questions}


def test_cells_are_pooled_over_runs_and_lengths_against_the_full_cache_on_the_same_questions():
    first = [record(1024, "full", 1.0, 30, 80), record(1024, "lava", 0.2, 24, 80),
             record(1024, "lava", 0.2, 9, 40, split="later"),  # a split's cell is not counted again
             record(1024, "lava", 0.2, 5, 40, task="fidelity"),
             record(2048, "full", 1.0, 28, 80), record(2048, "lava", 0.2, 21, 80)]
    second = [record(4096, "full", 1.0, 13, 40), record(4096, "lava", 0.2, 11, 40),
              record(4096, "full", 1.0, 13, 40, observe="reconstruct:view=chunk"),
              record(4096, "lava", 0.2, 10, 40, observe="reconstruct:view=chunk")]
    assert pool_quality.pooled([first, second]) == {
        ("reconstruct", "lava", 0.2): (56, 200, 71),
        ("reconstruct:view=chunk", "lava", 0.2): (10, 40, 13),
    }


def test_a_cell_on_other_questions_than_the_full_caches_is_refused():
    with pytest.raises(ValueError, match="answered 40 questions, the full cache 80"):
        pool_quality.pooled([[record(1024, "full", 1.0, 30, 80), record(1024, "lava", 0.2, 10, 40)]])
