"""(IA)³: infused adapter by inhibiting and amplifying inner activations (Liu et al. 2022,
arXiv:2205.05638), PEFT's `IA3Config`.

A learned vector rescales one activation of a linear layer elementwise:

    output (keys, values):       y = l ⊙ (W₀x + b)          l: [out], init 1
    feedforward (FFN down proj): y = W₀·(l ⊙ x) + b          l: [in],  init 1

so the adapted model starts equal to the base. `feedforward` scales the layer's input: on the
FFN's down projection that is the intermediate activation, the paper's l_ff (PEFT's
`feedforward_modules`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from adaptc.methods.options import option
from adaptc.methods.precision import wide


@dataclass(frozen=True)
class Ia3Config:
    method: ClassVar[str] = "ia3"
    adapts: ClassVar[tuple[str, ...]] = ("linear",)
    rewrites_layer: ClassVar[bool] = True  # E305: one such method per linear layer

    feedforward: bool = option(False, "scale the layer's input (the FFN intermediate activation "
                               "on a down projection) instead of its output")

    def check(self) -> list[tuple[str, str]]:
        return []


class Ia3Adapter(nn.Module):
    """x ↦ l ⊙ x over the last dimension: the layer's output [..., out] (l [out]) or, with
    `feedforward`, its input [..., in] (l [in])."""

    def __init__(self, config: Ia3Config, in_features: int, out_features: int,
                 device: torch.device | None = None, dtype: torch.dtype | None = None):
        super().__init__()
        self.config = config
        size = in_features if config.feedforward else out_features
        self.scale = nn.Parameter(torch.ones(size, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale

    def adapter_parameters(self) -> dict[str, nn.Parameter]:
        return {"scale": self.scale}

    def merged(self, weight: torch.Tensor, bias: torch.Tensor | None
               ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Output: (l[:, None]·W, l ⊙ b); feedforward: (W·l[None, :], b). `weight` [out, in]."""
        scale = wide(self.scale)
        if self.config.feedforward:
            return (wide(weight) * scale[None, :]).to(weight.dtype), bias
        folded = (wide(weight) * scale[:, None]).to(weight.dtype)
        return folded, None if bias is None else (wide(bias) * scale).to(bias.dtype)
