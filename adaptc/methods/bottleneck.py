"""Bottleneck adapters: Houlsby et al. 2019 (arXiv:1902.00751, sequential) and He et al. 2022
(arXiv:2110.04366, parallel).

    sequential: h = f(x);  y = h + U·act(D·h + b_D) + b_U
    parallel:   y = f(x) + U·act(D·x + b_D) + b_U
    D: [bottleneck, d_in_of_adapter], U: [d_out, bottleneck]; U and b_U start at zero
    so the adapted model starts equal to the base.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from adaptc.methods.gate import Gate, gate_bias
from adaptc.methods.options import option

ACTIVATIONS = {"relu": nn.functional.relu, "gelu": nn.functional.gelu, "silu": nn.functional.silu,
               "tanh": torch.tanh}


@dataclass(frozen=True)
class AdapterConfig:
    method: ClassVar[str] = "adapter"
    adapts: ClassVar[tuple[str, ...]] = ("linear", "module")

    bottleneck: int = option(64, "width of the down-projection", low=1)
    activation: str = option("relu", "nonlinearity between down and up projection",
                             choices=tuple(ACTIVATIONS))
    placement: str = option("sequential", "sequential: after the module on its output; "
                            "parallel: beside it, fed the module's input",
                            choices=("sequential", "parallel"))
    scale: float = option(1.0, "multiplier s of the adapter's output (MAM adapter: 4)", low=0)
    gate: bool = option(False, "UniPELT: scale the adapter's output by a learned per-example "
                        "gate in (0, 1)")

    def check(self) -> list[tuple[str, str]]:
        return []


class BottleneckAdapter(nn.Module):
    """s·(U·act(D·x + b_D) + b_U), times G_A(x) with `gate`; the graph adds it to the module
    output (residual).

    Shapes: x [..., d_in] → [..., d_out]. `down` [bottleneck, d_in], `up` [d_out, bottleneck];
    with `gate`, x is [B, S, d_in] and `gate` holds w [1, d_in], b [1].
    """

    def __init__(self, config: AdapterConfig, d_in: int, d_out: int,
                 device: torch.device | None = None, dtype: torch.dtype | None = None):
        super().__init__()
        self.config = config
        factory = {"device": device, "dtype": dtype}
        self.down = nn.Parameter(torch.empty(config.bottleneck, d_in, **factory))
        self.down_bias = nn.Parameter(torch.zeros(config.bottleneck, **factory))
        self.up = nn.Parameter(torch.zeros(d_out, config.bottleneck, **factory))
        self.up_bias = nn.Parameter(torch.zeros(d_out, **factory))
        self.gate = Gate(d_in, device, dtype) if config.gate else None
        if self.down.device.type != "meta":
            nn.init.kaiming_uniform_(self.down, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = ACTIVATIONS[self.config.activation](nn.functional.linear(x, self.down, self.down_bias))
        out = nn.functional.linear(hidden, self.up, self.up_bias)
        if self.config.scale != 1.0:
            out = out * self.config.scale
        return out if self.gate is None else out * self.gate(x)

    def adapter_parameters(self) -> dict[str, nn.Parameter]:
        return dict(self.named_parameters())

    @property
    def undecayed_parameters(self) -> tuple[str, ...]:
        """Weight decay spares the biases (the gate's too), as PEFT's and the HF Trainer's
        groups spare biases; their learning rate stays the base one (no LoRA+ counterpart)."""
        return ("down_bias", "up_bias", *gate_bias(self.gate))
