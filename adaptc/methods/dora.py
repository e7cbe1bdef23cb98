"""DoRA: weight-decomposed low-rank adaptation (Liu et al. 2024, arXiv:2402.09353), the
`dora` flag of a `lora` statement (PEFT's `use_dora=True`).

    W' = W₀ + s·B·A                        the LoRA-updated weight [out, in]
    y  = m ⊙ (W'·x) / ‖W'‖_row + b          m: trained magnitude [out], init ‖W₀‖_row

‖W'‖_row (the L2 norm of each output row) is treated as a constant: detached from the
gradient, as in §4.3 of the paper and PEFT. The graph keeps the base linear and adds

    Δ = (m/‖W'‖ − 1)·(W₀·x') + (m/‖W'‖)·s·B·A·x'      x' = dropout(x)

where W₀·x' is the base output minus its bias when dropout is off (eval, or dropout=0), and
recomputed from x' otherwise (PEFT does the same).
"""
from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from adaptc.methods.lora import LoraAdapter, LoraConfig
from adaptc.methods.precision import wide


class DoraAdapter(LoraAdapter):
    """LoRA's A [r, in] and B [out, r] plus the magnitude m [out]; called from the graph as
    `dora(x, weight, bias, base)` with the layer's weight (as stored: [in, out] when
    `transposed`, GPT-2 Conv1D), its bias (or None) and its output base = W₀x + b.
    """

    fast_parameters: ClassVar[tuple[str, ...]] = ("B", "magnitude")  # PEFT's LoRA+ groups

    def __init__(self, config: LoraConfig, in_features: int, out_features: int,
                 transposed: bool = False, device: torch.device | None = None,
                 dtype: torch.dtype | None = None):
        super().__init__(config, in_features, out_features, device=device, dtype=dtype)
        self.transposed = transposed
        self.magnitude = nn.Parameter(torch.ones(out_features, device=device, dtype=dtype))

    def init_magnitude(self, weight: torch.Tensor) -> None:
        """m = ‖W₀ + s·B·A‖_row for the layer weight `weight` [out, in] (‖W₀‖ when B = 0)."""
        with torch.no_grad():
            self.magnitude.copy_(self.row_norm(weight))

    def row_norm(self, weight: torch.Tensor) -> torch.Tensor:
        """‖W + s·B·A‖ per output row, detached; `weight` in [out, in] layout."""
        lora = (self.B @ self.A).detach()
        return torch.linalg.norm(weight + self.scale * lora, dim=1).to(weight.dtype).detach()

    def forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                base: torch.Tensor) -> torch.Tensor:
        dense = weight.t() if self.transposed else weight
        factor = self.magnitude / self.row_norm(dense)
        dropped = self.dropout(x)
        if isinstance(self.dropout, nn.Identity) or not self.training:
            plain = base if bias is None else base - bias
        else:
            plain = nn.functional.linear(dropped, dense)
        lora = nn.functional.linear(nn.functional.linear(dropped, self.A), self.B)
        return (factor - 1) * plain + factor * lora * self.scale

    def adapter_parameters(self) -> dict[str, nn.Parameter]:
        return {**super().adapter_parameters(), "magnitude": self.magnitude}

    def merged(self, weight: torch.Tensor, bias: torch.Tensor | None
               ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(m/‖W'‖ ⊙ W', b) with W' = W + s·B·A, for `weight` [out, in]; float32, cast once."""
        full = wide(weight) + self.delta_weight()
        factor = wide(self.magnitude) / torch.linalg.norm(full, dim=1)
        return (factor[:, None] * full).to(weight.dtype), bias
