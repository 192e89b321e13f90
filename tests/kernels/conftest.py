"""Kernel tests: under Triton's interpreter on the CPU when no CUDA device is present,
compiled on the GPU when one is.

Triton reads TRITON_INTERPRET when it defines a kernel, and its own library functions
(tl.zeros, tl.max, ...) are defined when `triton` is first imported: the flag must be set
before that. It is set here, which is early enough when this folder runs on its own
(`pytest tests/kernels`). In a run of the whole suite, test modules collected before this
folder may already have imported triton (transformers does, through torch._dynamo); then
the interpreted tests are skipped with that reason, and setting the flag at the top of
tests/conftest.py makes them run.
"""

import os
import sys

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
_TRITON_IMPORTED_FIRST = "triton" in sys.modules and not os.environ.get("TRITON_INTERPRET")
if not HAS_CUDA:
    os.environ["TRITON_INTERPRET"] = "1"

import triton  # noqa: E402  (after the flag, see above)

INTERPRETED = triton.knobs.runtime.interpret

_CPU_SKIP = "a CUDA device is present: the kernels run compiled on it, not interpreted on CPU tensors"
_CUDA_SKIP = ("no CUDA device: the kernels are tested on the CPU under TRITON_INTERPRET=1" if not HAS_CUDA
              else "TRITON_INTERPRET=1 is set: the kernels are interpreted, so they take CPU tensors")
_LATE_FLAG_SKIP = ("triton was imported before tests/kernels/conftest.py could set TRITON_INTERPRET=1, so "
                   "Triton's interpreter cannot run; run `pytest tests/kernels`, or set the flag at the top "
                   "of tests/conftest.py")


@pytest.fixture(params=["cpu", "cuda"])
def device(request) -> torch.device:
    """Where the kernels run: the CPU under the interpreter, or the GPU (the other is skipped)."""
    if request.param == "cpu":
        if not INTERPRETED:
            pytest.skip(_CPU_SKIP)
        if _TRITON_IMPORTED_FIRST:
            pytest.skip(_LATE_FLAG_SKIP)
    elif not HAS_CUDA or INTERPRETED:
        pytest.skip(_CUDA_SKIP)
    return torch.device(request.param)


@pytest.fixture
def cuda_only() -> torch.device:
    """The GPU, for tests that only make sense there (skipped with the reason otherwise)."""
    if not HAS_CUDA or INTERPRETED:
        pytest.skip(_CUDA_SKIP)
    return torch.device("cuda")
