"""UniPELT's gate (Mao et al. 2022, arXiv:2110.07577): each submodule's contribution is scaled
by a learned per-example gate computed from that submodule's own input.

    G(x) = mean_t σ(w·x_t + b) ∈ (0, 1)      x [B, S, F], w [1, F], b [1]  →  G [B, 1, 1]

The mean over the sequence (padding included) follows the UniPELT code; the paper writes
G = σ(W_G x). LoRA: h + G_L·s·B·A·x (the gate reads the linear input); adapter:
h + G_A·adapter(h) (reads the adapter input); prefix: P'_K = G_P·P_K, P'_V = G_P·P_V (reads
the attention block's input).
"""
from __future__ import annotations

import math

import torch
from torch import nn


class Gate(nn.Module):
    """G(x) = mean over the sequence of σ(w·x + b): [B, S, F] → [B, 1, 1]; a [B, F] input
    (one row per example, BERT's pooler) → [B, 1], each row's own σ(w·x + b)."""

    def __init__(self, features: int, device: torch.device | None = None,
                 dtype: torch.dtype | None = None):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(1, features, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(1, device=device, dtype=dtype))
        if self.weight.device.type != "meta":  # nn.Linear's init, as the UniPELT code
            nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
            nn.init.uniform_(self.bias, -1 / math.sqrt(features), 1 / math.sqrt(features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(nn.functional.linear(x, self.weight, self.bias)).mean(1, keepdim=True)


def gate_bias(gate: Gate | None) -> tuple[str, ...]:
    """The gate's bias as its adapter names it, for weight decay to spare, as PEFT's and the
    HF Trainer's groups spare every bias; none without a gate."""
    return () if gate is None else ("gate.bias",)
