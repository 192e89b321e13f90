"""Run the real SGLang server on a CPU-only machine (development and CI only).

SGLang's CPU engine (`SGLANG_USE_CPU_ENGINE=1 --device cpu --attention-backend torch_native`)
needs a few ops from the CPU build of `sgl_kernel`, which is not on PyPI. The `sgl_kernel`
directory next to this file is a pure-PyTorch stand-in for just those ops. `cpu_engine_env`
gives a server subprocess an environment that selects the CPU engine where no CUDA device is
present, and puts the stand-in first on its path only where, in addition, the real
`sgl_kernel` cannot load. Nothing here changes the current process.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
from pathlib import Path

STAND_IN_PARENT = Path(__file__).resolve().parent  # holds the stand-in `sgl_kernel` package


def _without_stand_in(pythonpath: str) -> str:
    return os.pathsep.join(p for p in pythonpath.split(os.pathsep) if p and Path(p).resolve() != STAND_IN_PARENT)


@functools.cache
def real_sgl_kernel_loads() -> bool:
    """Whether `import sgl_kernel` succeeds in a fresh interpreter (one that cannot see the stand-in)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = _without_stand_in(env.get("PYTHONPATH", ""))
    env.pop("TRITON_INTERPRET", None)
    probe = subprocess.run([sys.executable, "-P", "-c", "import sgl_kernel"], env=env, capture_output=True, timeout=300)
    return probe.returncode == 0


def cpu_thread_binding(ranks: int, cores: int) -> str:
    """SGLANG_CPU_OMP_THREADS_BIND for `ranks` scheduler processes on `cores` cores: SGLang's
    CPU engine binds each rank's OpenMP threads to a core list and, unset, allows one rank per
    NUMA node. Each rank gets its own contiguous cores (the cores // ranks remainder stays free,
    so that ranks are alike); with more ranks than cores, ranks share."""
    if ranks <= cores:
        size = cores // ranks
        return "|".join(f"{rank * size}-{rank * size + size - 1}" if size > 1 else str(rank * size)
                        for rank in range(ranks))
    return "|".join(str(rank % cores) for rank in range(ranks))


def cpu_engine_env(env: dict[str, str]) -> dict[str, str]:
    """A copy of `env` for an SGLang server subprocess.

    With no CUDA device, SGLANG_USE_CPU_ENGINE=1 selects SGLang's CPU engine, and where the
    real `sgl_kernel` cannot load either, the stand-in's parent directory goes first on
    PYTHONPATH. TRITON_INTERPRET is always removed: the test suite sets it for Triton's
    interpreter, and a server must not inherit it.
    """
    import torch

    env = dict(env)
    env.pop("TRITON_INTERPRET", None)
    if not torch.cuda.is_available():
        env["SGLANG_USE_CPU_ENGINE"] = "1"
        if not real_sgl_kernel_loads():
            rest = _without_stand_in(env.get("PYTHONPATH", ""))
            env["PYTHONPATH"] = os.pathsep.join(p for p in (str(STAND_IN_PARENT), rest) if p)
    return env
