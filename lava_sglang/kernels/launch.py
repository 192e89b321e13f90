"""What every kernel needs: input checks that raise clear ValueErrors, block sizes, how many
programs fill the device, and the one matrix product all kernels use."""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
INDEX_DTYPES = (torch.int32, torch.int64)
# Warps per program of the kernels that hold [64, d] K/V tiles: for d = 128 in bf16 on sm_90,
# ptxas reports register spills with 4 warps and none with 8 (untimed). `PoolPrefixAttention`
# has its own options, timed on an H200: 4 warps over 128-key tiles ran fastest there.
TILE_NUM_WARPS = 8


def check_tensor(name: str, tensor: object, dims: int, dtypes: tuple[torch.dtype, ...]) -> torch.Tensor:
    if not isinstance(tensor, torch.Tensor):
        raise ValueError(f"{name} must be a tensor, got {type(tensor).__name__}")
    if tensor.dim() != dims:
        raise ValueError(f"{name} must be {dims}-D, got shape {list(tensor.shape)}")
    if tensor.dtype not in dtypes:
        raise ValueError(f"{name} must have dtype in {[str(d) for d in dtypes]}, got {tensor.dtype}")
    if not tensor.dtype.is_floating_point and not tensor.is_contiguous():  # the kernels read indices by offset
        raise ValueError(f"{name} must be contiguous, got strides {tensor.stride()} for shape {list(tensor.shape)}")
    return tensor


def check_rows_contiguous(name: str, tensor: torch.Tensor) -> None:
    """Kernels index rows through strides but read each head-dim row as one contiguous run."""
    if tensor.stride(-1) != 1:
        raise ValueError(f"{name} must be contiguous in its last dimension, got strides {tensor.stride()}")


def check_same_device(**tensors: torch.Tensor) -> torch.device:
    devices = {name: tensor.device for name, tensor in tensors.items()}
    if len(set(devices.values())) != 1:
        raise ValueError(f"tensors must be on one device, got {devices}")
    return next(iter(devices.values()))


def check_triton_device(device: torch.device) -> None:
    """Compiled Triton kernels take CUDA tensors; the interpreter (tests on the CPU) takes any."""
    if device.type != "cuda" and not triton.knobs.runtime.interpret:
        raise ValueError(f"Triton kernels need CUDA tensors, got {device}; on the CPU set TRITON_INTERPRET=1 "
                         "before the first lava_sglang.kernels kernel module is imported")


def check_index_range(name: str, indices: torch.Tensor, upper: int) -> None:
    """All of `indices` in [0, upper). Synchronises with the device (call it once per plan)."""
    if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= upper):
        raise ValueError(f"{name} must lie in [0, {upper}), got values in "
                         f"[{int(indices.min())}, {int(indices.max())}]")


# CUDA's grid: up to 2^31 - 1 programs along x, 65,535 along y and z.
GRID_LIMITS = (2**31 - 1, 65535, 65535)


def checked_grid(*dims: int) -> tuple[int, ...]:
    """`dims` as a launch grid, or a ValueError where one exceeds CUDA's limit (the launch would
    fail with a CUDA error that names no input)."""
    for axis, size, limit in zip("xyz", dims, GRID_LIMITS):
        if size > limit:
            raise ValueError(f"the input needs {size} programs along the grid's {axis} axis, beyond CUDA's {limit}: "
                             f"too large for one launch (grid {list(dims)})")
    return dims


def block_size(length: int, minimum: int = 16) -> int:
    """Power-of-two block covering `length`, at least `minimum` (tl.dot needs 16 on GPUs)."""
    return max(minimum, triton.next_power_of_2(max(length, 1)))


@functools.lru_cache(maxsize=None)
def _multiprocessors(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def multiprocessors(device: torch.device) -> int:
    """The device's SMs; 1 off CUDA, where the interpreter runs programs one after another."""
    if device.type != "cuda":
        return 1
    return _multiprocessors(device.index if device.index is not None else torch.cuda.current_device())


def programs_to_fill(device: torch.device) -> int:
    """Programs a launch should have for the device to be busy (a few waves of SMs; one
    program under the CPU interpreter)."""
    return 4 * multiprocessors(device) if device.type == "cuda" else 1


def split_size(lengths_sum: int, longest: int, programs: int, block: int, max_splits: int = 64) -> int:
    """Keys per split (a multiple of `block`) so that splitting every sequence into chunks of
    that size gives about `programs` programs in all; never smaller than one block, and no
    sequence in more than `max_splits` chunks (past that, merging the chunks costs more than
    the extra parallelism gains)."""
    per_program = -(-max(lengths_sum, 1) // max(programs, 1))
    chunk = max(min(per_program, longest), -(-longest // max_splits), block)
    return -(-chunk // block) * block


# Triton 3.8's interpreter multiplies bf16/fp16 operands of tl.dot as their raw bit patterns
# (it only converts fp8). Upcasting them there gives what the GPU computes: products of two
# 16-bit floats are exact in fp32, and the GPU accumulates them in fp32. Read when the kernel
# modules are imported, which is also when Triton decides whether to interpret them.
_UPCAST_DOT_OPERANDS = tl.constexpr(triton.knobs.runtime.interpret)


@triton.jit
def dot(a, b):
    """a @ b with an fp32 accumulator; fp32 operands in full precision (IEEE, not TF32)."""
    if _UPCAST_DOT_OPERANDS:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, input_precision="ieee")
