"""LoRA (Hu et al. 2021, arXiv:2106.09685) and rsLoRA scaling (Kalajdzievski 2023).

    y = W₀x + b + s·B·A·dropout(x),   s = α/r  (rsLoRA: α/√r)
    A: [r, in] Kaiming-uniform init,  B: [out, r] zeros, so the adapted model starts equal to the base.
    with `gate` (UniPELT): y = W₀x + b + G_L(x)·s·B·A·dropout(x), G_L from `methods.gate`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from adaptc.methods.gate import Gate
from adaptc.methods.options import option


@dataclass(frozen=True)
class LoraConfig:
    method: ClassVar[str] = "lora"
    adapts: ClassVar[tuple[str, ...]] = ("linear",)

    r: int = option(8, "rank of the update B·A", low=1)
    alpha: float = option(8.0, "scale numerator: the update is multiplied by alpha/r", low=0)
    dropout: float = option(0.0, "dropout on the adapter's input while training", low=0, high=1,
                            high_open=True)
    rslora: bool = option(False, "rank-stabilised scaling alpha/sqrt(r) instead of alpha/r")
    gate: bool = option(False, "UniPELT: scale the update by a learned per-example gate in (0, 1)")

    def check(self) -> list[tuple[str, str]]:
        return []

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.rslora else self.r)


class LoraAdapter(nn.Module):
    """The low-rank update s·B·A·dropout(x) of one linear site; the graph adds it to W₀x + b.

    Shapes: x [..., in] → [..., out]. `A` [r, in], `B` [out, r]; with `gate`, x is
    [B, S, in] and `gate` holds w [1, in], b [1].
    """

    def __init__(self, config: LoraConfig, in_features: int, out_features: int,
                 device: torch.device | None = None, dtype: torch.dtype | None = None):
        super().__init__()
        self.config = config
        self.scale = config.scale
        self.A = nn.Parameter(torch.empty(config.r, in_features, device=device, dtype=dtype))
        self.B = nn.Parameter(torch.zeros(out_features, config.r, device=device, dtype=dtype))
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.gate = Gate(in_features, device, dtype) if config.gate else None
        if self.A.device.type != "meta":
            nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        update = nn.functional.linear(nn.functional.linear(self.dropout(x), self.A), self.B) * self.scale
        return update if self.gate is None else update * self.gate(x)

    def adapter_parameters(self) -> dict[str, nn.Parameter]:
        gate = {} if self.gate is None else {"gate.weight": self.gate.weight,
                                             "gate.bias": self.gate.bias}
        return {"A": self.A, "B": self.B, **gate}

    def delta_weight(self) -> torch.Tensor:
        """ΔW = s·B·A in float32, shaped like an nn.Linear weight [out, in]."""
        if self.gate is not None:
            raise ValueError("a gated LoRA update depends on the input; it cannot be merged")
        return (self.B.float() @ self.A.float()) * self.scale
