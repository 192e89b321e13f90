#!/usr/bin/env bash
# Every GPU test and benchmark of the kernels, in one call, on a CUDA machine that has torch
# and Triton (SGLang and FlashInfer optional: what needs them is skipped with the reason, or
# the benchmark compares against torch's SDPA instead of FlashInfer, and says so).
# From the repository root:  bash kernels/gpu_check.sh
# Paste what it prints into kernels/RESULTS.md with the date and commit it prints first.
# Each step has its own time limit so that the whole stays under the lent machine's 10 minutes a call.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
python=${PYTHON:-python3}  # PYTHON: another interpreter
commit=$(git rev-parse --short HEAD 2>/dev/null || echo "unknown (no git here)")
# A copied working tree can differ from its HEAD (the lent machine's copy did): say so.
if [ -n "$(git status --porcelain 2>/dev/null)" ]; then
    commit="$commit + uncommitted changes"
fi
echo "# kernels/gpu_check.sh, $(date -u '+%Y-%m-%d %H:%M UTC'), commit $commit"
if ! "$python" -c "import torch, triton" 2>/dev/null; then
    echo "gpu_check: $python cannot import torch and triton" >&2
    exit 2
fi
if ! "$python" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check: no CUDA device here; on the CPU the kernel tests run under ./scripts/test.sh tests/kernels" >&2
    exit 2
fi
# Under Triton's interpreter the CUDA cases are skipped and pytest still passes: compile here.
if [ -n "${TRITON_INTERPRET:-}" ]; then
    echo "gpu_check: TRITON_INTERPRET=$TRITON_INTERPRET unset, so that the kernels run compiled on the GPU"
    unset TRITON_INTERPRET
fi
status=0
step() {  # step SECONDS COMMAND...: run it, report a failure or a timeout, go on
    local limit=$1
    shift
    echo
    echo "## $*"
    timeout "$limit" "$@"
    local code=$?
    if [ "$code" -ne 0 ]; then
        echo "gpu_check: '$*' exited with $code$([ "$code" -eq 124 ] && echo " (over its ${limit} s limit)")"
        status=1
    fi
}
step 200 "$python" -m pytest -q -rs -p no:cacheprovider tests/kernels
step 150 "$python" kernels/bench_prefix_attention.py
step 100 "$python" kernels/bench_compression.py
step 120 "$python" kernels/tune_pool_attention.py
exit $status
