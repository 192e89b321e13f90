#!/usr/bin/env bash
# NVIDIA kvpress's KVzipPress on the project's retrieval benchmark (scripts/kvpress_head_to_head.py).
# kvpress 0.5.5 wants transformers < 5.3, the project pins a later one: kvpress, that
# transformers and the tokenizers it accepts go into a folder of their own (once, in the
# cache), put in front of the project's environment for this run only. Needs PyPI.
# Arguments go to the Python script (--context, --questions, --keep, --chunk, --out).
set -euo pipefail
source "$(dirname "$0")/env.sh"
OVERLAY="$CACHE_ROOT/kvpress-0.5.5-overlay"
if [ ! -f "$OVERLAY/.complete" ]; then  # marked complete only after pip succeeds (set -e)
    rm -rf "$OVERLAY"
    echo "Installing kvpress 0.5.5 and its transformers into $OVERLAY (once)..."
    python -m pip install --no-input --no-deps --target "$OVERLAY" \
        kvpress==0.5.5 transformers==5.2.0 tokenizers==0.22.2 cachetools==5.5.2 fire==0.6.0 termcolor==3.1.0
    touch "$OVERLAY/.complete"
fi
cd "$REPO_ROOT"
PYTHONPATH="$OVERLAY${PYTHONPATH:+:$PYTHONPATH}" exec python scripts/kvpress_head_to_head.py "$@"
