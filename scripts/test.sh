#!/usr/bin/env bash
# The README's test command: sets up the environment if needed, then runs the test suite.
# Extra arguments go to pytest (e.g. scripts/test.sh tests/policy -x).
set -euo pipefail
source "$(dirname "$0")/env.sh"
cd "$REPO_ROOT"
exec python -m pytest "${@:-tests}"
