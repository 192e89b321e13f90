"""The checkpoint's conversion on first use: one at a time, whole or not at all."""

from __future__ import annotations

import threading
import time

import pytest

from lava_sglang import model


@pytest.fixture
def conversions(monkeypatch, tmp_path):
    """A stand-in conversion (slow enough for a second caller to arrive meanwhile) that
    records each run; the GGUF source is a file in tmp_path."""
    runs = []

    def convert(gguf, out_dir):
        runs.append(out_dir)
        time.sleep(0.3)
        (out_dir / "config.json").write_text("{}")

    monkeypatch.setattr(model, "gguf_path", lambda: tmp_path / "model.gguf")
    monkeypatch.setattr(model, "_convert", convert)
    return runs


def test_two_first_runs_convert_once_and_both_get_the_checkpoint(conversions, tmp_path):
    paths = []
    callers = [threading.Thread(target=lambda: paths.append(model.smollm2_path(tmp_path / "models")))
               for _ in range(2)]
    for caller in callers:
        caller.start()
    for caller in callers:
        caller.join()
    assert len(conversions) == 1
    assert paths == [model.smollm2_location(tmp_path / "models")] * 2
    assert (paths[0] / "config.json").is_file()


def test_a_killed_conversions_staging_folder_is_removed_by_the_next(conversions, tmp_path):
    models = tmp_path / "models"
    stale = models / f".{model.CHECKPOINT_NAME}-killed"
    stale.mkdir(parents=True)
    (stale / "model.safetensors").write_text("half a model")
    target = model.smollm2_path(models)
    assert not stale.exists()
    assert sorted(path.name for path in models.iterdir() if not path.name.endswith(".lock")) == [target.name]


def test_a_folder_in_the_checkpoints_place_is_refused(conversions, tmp_path):
    (model.smollm2_location(tmp_path / "models")).mkdir(parents=True)
    with pytest.raises(FileExistsError, match="holds no converted checkpoint"):
        model.smollm2_path(tmp_path / "models")
    assert conversions == []
