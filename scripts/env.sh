# Sourced by the README's commands. Creates the virtual environment when it is missing
# (4-6 minutes, 11 GB), reuses it when present, and puts it first on PATH.
#
# The environment lives outside the repository, keyed by the hash of requirements.lock,
# requirements-nodeps.txt and scripts/make_env.sh (which installs them), so every clone (CI
# included) with the same lock and set-up shares one, and a change to either makes a new one.
#   LAVA_SGLANG_CACHE  root of the caches (default ~/.cache/lava-sglang)
#   LAVA_SGLANG_PYTHON the Python 3.11 that creates it (default python3.11)
#   LAVA_SGLANG_VENV   use this existing environment instead of the keyed one: it is never
#                      created or removed here, only given this clone's editable install
# Sourced into the caller's shell, so it leaves the shell's options alone (strict mode only
# in its subshells and in make_env.sh, which does the set-up) and a failure returns an error
# instead of closing the shell.

if [ -z "${BASH_VERSION:-}" ]; then  # zsh, dash: no BASH_SOURCE, so the repository would be looked for elsewhere
    echo "lava-sglang: scripts/env.sh is for bash; run bash, then source it there" >&2
    return 2 2>/dev/null || exit 2
fi
# CDPATH= : an exported CDPATH would send a relative cd elsewhere, and make it print the folder.
REPO_ROOT=$(CDPATH= cd -- "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CACHE_ROOT=${LAVA_SGLANG_CACHE:-$HOME/.cache/lava-sglang}
if ! LOCK_KEY=$(set -o pipefail; cat "$REPO_ROOT/requirements.lock" "$REPO_ROOT/requirements-nodeps.txt" \
                "$REPO_ROOT/scripts/make_env.sh" | sha256sum | cut -c1-16); then
    echo "lava-sglang: cannot read $REPO_ROOT/requirements.lock, requirements-nodeps.txt or scripts/make_env.sh" >&2
    return 2 2>/dev/null || exit 2
fi
VENV=${LAVA_SGLANG_VENV:-$CACHE_ROOT/venv-py311-$LOCK_KEY}
# Absolute, so that PATH still finds the environment after the README's scripts cd to the repository.
case $CACHE_ROOT in /*) ;; *) CACHE_ROOT=$PWD/$CACHE_ROOT ;; esac
case $VENV in /*) ;; *) VENV=$PWD/$VENV ;; esac
PYTHON_FOR_VENV=${LAVA_SGLANG_PYTHON:-python3.11}

if [ -n "${LAVA_SGLANG_VENV:-}" ] && [ ! -x "$VENV/bin/python" ]; then
    echo "lava-sglang: LAVA_SGLANG_VENV=$VENV has no bin/python; unset it to use the keyed environment" >&2
    return 2 2>/dev/null || exit 2
fi
# Every variable make_env.sh reads is passed: a shell variable set without export would not reach it
# (LAVA_SGLANG_VENV=/my/venv on a line of its own: make_env.sh would remake that environment).
if ! mkdir -p "$CACHE_ROOT" || ! VENV="$VENV" REPO_ROOT="$REPO_ROOT" PYTHON_FOR_VENV="$PYTHON_FOR_VENV" \
        LAVA_SGLANG_VENV="${LAVA_SGLANG_VENV:-}" bash "$REPO_ROOT/scripts/make_env.sh" 9>"$CACHE_ROOT/.venv.lock"; then
    echo "lava-sglang: setting up the environment in $VENV failed (see above)" >&2
    return 1 2>/dev/null || exit 1
fi

export PATH="$VENV/bin:$PATH"
# Clones share the environment, whose editable install points at the last clone set up:
# this clone's code comes first for this shell and every process it starts.
export PYTHONPATH="$REPO_ROOT${PYTHONPATH:+:$PYTHONPATH}"
export LAVA_SGLANG_CACHE="$CACHE_ROOT"
