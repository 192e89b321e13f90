"""Helpers shared by the kernel tests."""

import torch


def bf16_rounding(device) -> float:
    """Largest relative error of one fp32 -> bf16 conversion in a kernel: Triton's
    interpreter truncates (2^-7, bf16 has 8 significant bits), GPUs round to nearest (2^-8)."""
    return 2.0 ** -7 if torch.device(device).type == "cpu" else 2.0 ** -8
