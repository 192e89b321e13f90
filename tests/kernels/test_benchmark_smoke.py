"""The kernel benchmarks' smoke mode runs, so the scripts cannot rot unnoticed."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPTS = Path(__file__).resolve().parents[2] / "kernels"


@pytest.mark.parametrize("script", ["bench_prefix_attention.py", "bench_compression.py", "tune_pool_attention.py"])
def test_smoke_mode_prints_machine_inputs_and_a_table(script):
    # The script sets TRITON_INTERPRET=1 itself when there is no GPU (its own process).
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    result = subprocess.run([sys.executable, str(SCRIPTS / script), "--smoke"], capture_output=True, text=True,
                            env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert any(line.startswith("machine: ") for line in lines)
    assert any(line.startswith("inputs: ") and "SMOKE" in line for line in lines)
    table = [line for line in lines if line.startswith("| ") and not line.startswith("| document")]
    assert table, result.stdout
    assert all("nan" not in line and "inf" not in line for line in table), result.stdout
    assert not any("failed:" in line for line in table), result.stdout  # the tuner's rows that did not run


def test_no_package_in_the_scripts_folder():
    # A top-level package named `kernels` would shadow the `kernels` distribution SGLang uses.
    assert not (SCRIPTS / "__init__.py").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present: the script would run the whole check")
def test_gpu_check_stops_with_the_reason_without_a_gpu():
    result = subprocess.run(["bash", str(SCRIPTS / "gpu_check.sh")], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHON": sys.executable})
    assert result.returncode == 2
    assert result.stdout.startswith("# kernels/gpu_check.sh, ") and "commit " in result.stdout
    assert "no CUDA device here" in result.stderr


def test_gpu_check_runs_its_steps_compiled_when_the_interpreter_flag_is_set(tmp_path):
    # Under TRITON_INTERPRET=1 the CUDA cases are skipped and pytest passes: a check run with the
    # CPU instructions' flag would report success having tested nothing on the GPU.
    fake_python = tmp_path / "python"  # a GPU machine's python that records each step's flag
    fake_python.write_text('#!/bin/sh\necho "step TRITON_INTERPRET=${TRITON_INTERPRET-unset}: $*"\n')
    fake_python.chmod(0o755)
    result = subprocess.run(["bash", str(SCRIPTS / "gpu_check.sh")], capture_output=True, text=True, timeout=60,
                            env={**os.environ, "PYTHON": str(fake_python), "TRITON_INTERPRET": "1"})
    assert result.returncode == 0, result.stderr
    steps = [line for line in result.stdout.splitlines() if line.startswith("step ") and ": -c " not in line]
    assert len(steps) == 4, result.stdout  # pytest and the three benchmarks
    assert all(line.startswith("step TRITON_INTERPRET=unset: ") for line in steps), result.stdout
