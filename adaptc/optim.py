"""Optimizer helpers for compiled modules.

LoRA+ (Hayou et al. 2024, arXiv:2402.12354): B's learning rate is a fixed multiple of A's,
η_B = ratio·η_A (the paper suggests ratio ≈ 16). Adapter modules name their "fast" tensors
in a `fast_parameters` attribute (LoRA: B; DoRA: B and the magnitude; VeRA: λ_d, λ_b; a
`train` statement: its 1-D tensors, as PEFT's `create_loraplus_optimizer` groups 1-D tensors
with B); all other trainable adapter tensors keep the base learning rate.
"""
from __future__ import annotations

from torch import nn

from adaptc.adapters import adapter_modules
from adaptc.errors import AdaptcError


def loraplus_param_groups(module: nn.Module, lr: float, ratio: float = 16.0) -> list[dict]:
    """Two optimizer parameter groups over the module's trainable adapter tensors:
    `{"params": [...], "lr": lr}` and `{"params": [B, ...], "lr": ratio * lr}`.

        opt = torch.optim.AdamW(adaptc.loraplus_param_groups(gm, lr=2e-4, ratio=16))
    """
    if lr <= 0 or ratio <= 0:
        raise AdaptcError(f"loraplus_param_groups needs lr > 0 and ratio > 0, got lr={lr}, "
                          f"ratio={ratio}")
    slow, fast = [], []
    for adapter in adapter_modules(module).values():
        quick = getattr(adapter, "fast_parameters", ())
        for name, param in adapter.adapter_parameters().items():
            if param.requires_grad:
                (fast if name in quick else slow).append(param)
    if not slow and not fast:
        raise AdaptcError("loraplus_param_groups: the module has no trainable adapter tensors")
    groups = [{"params": slow, "lr": lr}, {"params": fast, "lr": lr * ratio}]
    return [g for g in groups if g["params"]]
