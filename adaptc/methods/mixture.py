"""Mixtures of LoRA experts: MoLoRA / MoV soft routing (Zadouri et al. 2023, arXiv:2309.05444),
top-k routing with more experts in higher layers (MoLA, Gao et al. 2024, arXiv:2402.08562),
and a Switch-style load-balancing loss (Fedus et al. 2021) as in LoRAMoE.

Per site, with E experts of rank r and router W_g [E, in]:

    p = softmax(W_g·x)                                  router probabilities [E]
    soft:  g = p;   top-k: g = softmax over the k largest logits, zero elsewhere
    y = W₀x + b + s·Σ_e g_e·B_e·A_e·dropout(x)          A: [E, r, in], B: [E, out, r] (zeros)
    balance = E·Σ_e f_e·P_e   with P_e = mean_tokens p_e, f_e = share of routed slots to e
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from adaptc.methods.lora import LoraConfig
from adaptc.methods.options import option


@dataclass(frozen=True)
class MixtureConfig:
    method: ClassVar[str] = "moe"
    adapts: ClassVar[tuple[str, ...]] = ()

    k: int = option(2, "experts each token uses (top-k routing)", low=1)
    experts: int | list[int] = option(4, "experts per site; a list gives per-layer-group counts "
                                      "from the first to the last layers (MoLA)", low=1)
    router: str = option("topk", "topk: sparse softmax over the k best; soft: all experts",
                         choices=("topk", "soft"))
    balance: float = option(0.01, "weight of the load-balancing loss", low=0)

    def check(self) -> list[tuple[str, str]]:
        fewest = min(self.experts) if isinstance(self.experts, list) else self.experts
        if isinstance(self.experts, list) and not self.experts:
            return [("experts", "experts list must not be empty")]
        if self.router == "topk" and self.k > fewest:
            return [("k", f"k={self.k} exceeds the number of experts ({fewest}); need 1 <= k <= experts")]
        return []

    def experts_at(self, layer: int | None, n_layers: int) -> int:
        """Experts for a site in `layer`: a list is spread over equal groups of consecutive layers."""
        if not isinstance(self.experts, list):
            return self.experts
        if layer is None:
            return self.experts[-1]
        return self.experts[min(len(self.experts) - 1, layer * len(self.experts) // max(n_layers, 1))]


class MixtureOfLora(nn.Module):
    """Routed sum of LoRA experts at one linear site; records `balance_loss` on each forward.

    Shapes: x [..., in] → [..., out]. `A` [E, r, in], `B` [E, out, r], `router` [E, in].
    """

    def __init__(self, lora: LoraConfig, mixture: MixtureConfig, experts: int, in_features: int,
                 out_features: int, device: torch.device | None = None,
                 dtype: torch.dtype | None = None):
        super().__init__()
        self.lora, self.mixture, self.experts = lora, mixture, experts
        self.scale = lora.scale
        self.top_k = experts if mixture.router == "soft" else mixture.k
        factory = {"device": device, "dtype": dtype}
        self.A = nn.Parameter(torch.empty(experts, lora.r, in_features, **factory))
        self.B = nn.Parameter(torch.zeros(experts, out_features, lora.r, **factory))
        self.router = nn.Parameter(torch.empty(experts, in_features, **factory))
        self.dropout = nn.Dropout(lora.dropout) if lora.dropout > 0 else nn.Identity()
        self.balance_loss: torch.Tensor | None = None
        if self.A.device.type != "meta":
            for e in range(experts):
                nn.init.kaiming_uniform_(self.A[e], a=math.sqrt(5))
            nn.init.kaiming_uniform_(self.router, a=math.sqrt(5))

    def gates(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token expert weights g [..., E] (zero off the top-k) and router probabilities p."""
        logits = nn.functional.linear(x, self.router).float()
        probs = logits.softmax(-1)
        if self.top_k == self.experts:
            return probs, probs
        top, idx = logits.topk(self.top_k, dim=-1)
        gates = torch.zeros_like(logits).scatter(-1, idx, top.softmax(-1))
        return gates, probs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gates, probs = self.gates(x)
        self.balance_loss = self._balance(gates, probs)
        low = torch.einsum("...i,eri->...er", self.dropout(x), self.A)
        low = low * gates.to(low.dtype).unsqueeze(-1)
        return torch.einsum("...er,eor->...o", low, self.B) * self.scale

    def _balance(self, gates: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        routed = (gates > 0).flatten(0, -2).float()
        share = routed.sum(0) / routed.sum().clamp_min(1)
        return self.experts * (share * probs.flatten(0, -2).mean(0)).sum()

    def adapter_parameters(self) -> dict[str, nn.Parameter]:
        return {"A": self.A, "B": self.B, "router": self.router}
