"""The precision merges compute in: float32, or the tensor's own dtype where that is wider.

    W' = (wide(W₀) + ΔW).to(W₀.dtype)      bf16/fp16 → float32;  float32 stays;  float64 stays

Upcasting half-precision weights keeps the sum from rounding twice; never downcasting keeps
a float64 model's merged weights exact to float64 (a float32 detour rounds W₀ itself).
"""
from __future__ import annotations

import torch


def wide(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` in float32, or unchanged when its dtype is already float32 or wider."""
    return tensor.to(torch.promote_types(tensor.dtype, torch.float32))
