"""Optimizer helpers for compiled modules.

LoRA+ (Hayou et al. 2024, arXiv:2402.12354): B's learning rate is a fixed multiple of A's,
η_B = ratio·η_A (the paper suggests ratio ≈ 16). Adapter modules name their "fast" tensors
in a `fast_parameters` attribute (LoRA: B; DoRA: B and the magnitude; VeRA: λ_d, λ_b; a
`train` statement: its 1-D tensors, as PEFT's `create_loraplus_optimizer` groups 1-D tensors
with B, and the biases of prefix and P-tuning encoders); all other trainable adapter tensors
keep the base learning rate. Those that take no weight decay (biases, and the nn.LayerNorm
tensors of a `train` statement, as in PEFT's groups) are named in `undecayed_parameters`.
"""
from __future__ import annotations

from torch import nn

from adaptc.adapters import adapter_modules
from adaptc.errors import AdaptcError


def loraplus_param_groups(module: nn.Module, lr: float, ratio: float = 16.0,
                          weight_decay: float = 0.0) -> list[dict]:
    """PEFT's `create_loraplus_optimizer` groups over the module's trainable adapter tensors,
    in its order, empty ones left out: the slow tensors (A, ...) `{"lr": lr, "weight_decay":
    weight_decay}`, the fast ones (B, ...) `{"lr": ratio * lr, "weight_decay": weight_decay}`,
    the fast ones that take no decay `{"lr": ratio * lr, "weight_decay": 0.0}`, then the slow
    ones that take none (biases of bottleneck adapters and gates, which PEFT lacks). Every
    group sets its decay, so the optimizer's own default (AdamW's 0.01) applies to none.
    (PEFT's group for LoRA on embedding layers, `loraplus_lr_embedding`, has no counterpart:
    adaptc's LoRA adapts linear layers and expert stacks.)

        opt = torch.optim.AdamW(adaptc.loraplus_param_groups(gm, lr=2e-4, ratio=16))
    """
    if lr <= 0 or ratio <= 0 or weight_decay < 0:
        raise AdaptcError(f"loraplus_param_groups needs lr > 0, ratio > 0 and weight_decay "
                          f">= 0, got lr={lr}, ratio={ratio}, weight_decay={weight_decay}")
    settings = {(False, True): (lr, weight_decay), (True, True): (lr * ratio, weight_decay),
                (True, False): (lr * ratio, 0.0), (False, False): (lr, 0.0)}
    groups = {key: {"params": [], "lr": rate, "weight_decay": decay}
              for key, (rate, decay) in settings.items()}
    for adapter in adapter_modules(module).values():
        fast = getattr(adapter, "fast_parameters", ())
        undecayed = getattr(adapter, "undecayed_parameters", ())
        for name, param in adapter.adapter_parameters().items():
            if param.requires_grad:
                groups[name in fast, name not in undecayed]["params"].append(param)
    if not any(g["params"] for g in groups.values()):
        raise AdaptcError("loraplus_param_groups: the module has no trainable adapter tensors")
    return [g for g in groups.values() if g["params"]]
