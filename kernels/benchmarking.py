"""What the kernel benchmarks share: the smoke-mode switch, the machine description, timing
and the HBM peak. A helper of the scripts in this folder (imported by them as a sibling
module); not part of the lava_sglang package.
"""

from __future__ import annotations

import os
import platform
import statistics
import time

import torch

# Datasheet peak HBM bandwidth in GB/s by device name (torch.cuda.get_device_name). A name not
# listed gives no "% of peak" column unless --peak-gbps is given.
PEAK_HBM_GBPS = {
    "NVIDIA H100 80GB HBM3": 3350.0,  # H100 SXM
    "NVIDIA H100 PCIe": 2000.0,
    "NVIDIA H100 NVL": 3900.0,
    "NVIDIA H200": 4800.0,
    "NVIDIA A100-SXM4-80GB": 2039.0,
    "NVIDIA A100-SXM4-40GB": 1555.0,
    "NVIDIA A100 80GB PCIe": 1935.0,
}


def choose_device(smoke: bool) -> torch.device:
    """The GPU; in smoke mode without one, the CPU under Triton's interpreter.

    Call before anything imports triton: the interpreter flag is read then.
    """
    if torch.cuda.is_available():
        return torch.device("cuda")
    if not smoke:
        raise SystemExit("this benchmark needs a CUDA GPU; on the CPU run it with --smoke "
                         "(tiny shapes under TRITON_INTERPRET=1)")
    os.environ["TRITON_INTERPRET"] = "1"
    return torch.device("cpu")


def describe_machine(device: torch.device) -> list[str]:
    import triton

    lines = [f"python {platform.python_version()}, torch {torch.__version__}, triton {triton.__version__}"]
    try:
        import flashinfer

        lines[0] += f", flashinfer {flashinfer.__version__}"
    except ImportError:
        pass
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        lines.append(f"GPU {props.name}, {props.total_memory / 2**30:.0f} GiB, {props.multi_processor_count} SMs, "
                     f"CUDA {torch.version.cuda}")
    else:
        lines.append(f"CPU only ({platform.processor() or platform.machine()}, {os.cpu_count()} cores): "
                     f"Triton kernels under TRITON_INTERPRET=1; timings say nothing about GPU speed")
    return lines


def peak_gbps(device: torch.device, override: float | None) -> tuple[float | None, str]:
    """Peak HBM bandwidth and where the number comes from."""
    if override is not None:
        return override, "--peak-gbps"
    if device.type != "cuda":
        return None, "no GPU"
    name = torch.cuda.get_device_name(device)
    if name in PEAK_HBM_GBPS:
        return PEAK_HBM_GBPS[name], f"datasheet value for {name}"
    return None, f"unknown for {name!r}: pass --peak-gbps"


def time_ms(fn, device: torch.device) -> float:
    """Median time of fn in milliseconds: triton's do_bench on the GPU (L2 flushed between
    runs), wall time of a few runs after a warm-up on the CPU."""
    if device.type == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=25, rep=100)
    fn()
    runs = []
    for _ in range(3):
        start = time.perf_counter()
        fn()
        runs.append((time.perf_counter() - start) * 1e3)
    return statistics.median(runs)


def graph_replay(fn, device: torch.device):
    """fn captured in a CUDA graph (after a warm-up that compiles its kernels), as a callable
    that replays it; None off the GPU. Both sides of a comparison are timed this way when
    host overhead is not what is measured."""
    if device.type != "cuda":
        return None
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay
