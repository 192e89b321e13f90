#!/usr/bin/env bash
# The README's main command: sets up the environment if needed, then runs the demo.
# Extra arguments go to `lava-sglang demo` (see `lava-sglang demo --help`).
set -euo pipefail
source "$(dirname "$0")/env.sh"
cd "$REPO_ROOT"
exec lava-sglang demo "$@"
