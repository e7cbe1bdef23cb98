"""Mixtures of experts over the spec's LoRA and (IA)³ sites: MoLoRA and MoV soft routing
(Zadouri et al. 2023, arXiv:2309.05444: LoRA experts; (IA)³ vectors), top-k routing with
more experts in higher layers (MoLA, Gao et al. 2024, arXiv:2402.08562), and a Switch-style
load-balancing loss (Fedus et al. 2021).

Per site, with E experts and router W_g [E, in]:

    p = softmax(W_g·x)                                  router probabilities [E]
    soft:  g = p;   top-k: g = softmax over the k largest logits, zero elsewhere
    LoRA:  y = W₀x + b + s·Σ_e g_e·B_e·A_e·dropout(x)   A: [E, r, in], B: [E, out, r] (zeros)
    IA3:   y = (W₀x + b) ⊙ Σ_e g_e·l_e                 l: [E, out] (ones); feedforward:
           y = W₀((Σ_e g_e·l_e) ⊙ x) + b               l: [E, in]
    balance = E·Σ_e f_e·P_e   with P_e = mean_tokens p_e, f_e = share of routed slots to e
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from adaptc.methods.ia3 import Ia3Config
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


class Routed(nn.Module):
    """What the mixtures share: per-token expert weights from a router `router` [E, in], and
    the load-balancing loss of the last forward (`balance_loss`, read by `balance_loss()`)."""

    def __init__(self, mixture: MixtureConfig, experts: int, in_features: int,
                 device: torch.device | None = None, dtype: torch.dtype | None = None):
        super().__init__()
        self.mixture, self.experts = mixture, experts
        self.top_k = experts if mixture.router == "soft" else mixture.k
        self.router = nn.Parameter(torch.empty(experts, in_features, device=device, dtype=dtype))
        self.balance_loss: torch.Tensor | None = None
        if self.router.device.type != "meta":
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

    def routed(self, x: torch.Tensor) -> torch.Tensor:
        """The gates for `x`, recording the balance loss they incur."""
        gates, probs = self.gates(x)
        routed = (gates > 0).flatten(0, -2).float()
        share = routed.sum(0) / routed.sum().clamp_min(1)
        self.balance_loss = self.experts * (share * probs.flatten(0, -2).mean(0)).sum()
        return gates


class MixtureOfLora(Routed):
    """Routed sum of LoRA experts at one linear site; records `balance_loss` on each forward.

    Shapes: x [..., in] → [..., out]. `A` [E, r, in], `B` [E, out, r], `router` [E, in].
    """

    def __init__(self, lora: LoraConfig, mixture: MixtureConfig, experts: int, in_features: int,
                 out_features: int, device: torch.device | None = None,
                 dtype: torch.dtype | None = None):
        super().__init__(mixture, experts, in_features, device, dtype)
        self.lora = lora
        self.scale = lora.scale
        factory = {"device": device, "dtype": dtype}
        self.A = nn.Parameter(torch.empty(experts, lora.r, in_features, **factory))
        self.B = nn.Parameter(torch.zeros(experts, out_features, lora.r, **factory))
        self.dropout = nn.Dropout(lora.dropout) if lora.dropout > 0 else nn.Identity()
        if self.A.device.type != "meta":
            for e in range(experts):
                nn.init.kaiming_uniform_(self.A[e], a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gates = self.routed(x)
        low = torch.einsum("...i,eri->...er", self.dropout(x), self.A)
        low = low * gates.to(low.dtype).unsqueeze(-1)
        return torch.einsum("...er,eor->...o", low, self.B) * self.scale

    def adapter_parameters(self) -> dict[str, nn.Parameter]:
        return {"A": self.A, "B": self.B, "router": self.router}


class MixtureOfVectors(Routed):
    """MoV: a routed mix of (IA)³ vectors at one linear site. Per token, l(x) = Σ_e g_e(x)·l_e
    scales what the site's `ia3` statement scales: the output, y ⊙ l(x) (`vectors` [E, out]),
    or with `feedforward` the input, W₀(l(x) ⊙ x) + b (`vectors` [E, in]). The router reads
    the layer's input x. Vectors start at 1, so the adapted model starts equal to the base.

    forward(values, x=None): `values` the tensor scaled (the output, or the input x itself),
    `x` the router's input when it differs."""

    def __init__(self, ia3: Ia3Config, mixture: MixtureConfig, experts: int, in_features: int,
                 out_features: int, device: torch.device | None = None,
                 dtype: torch.dtype | None = None):
        super().__init__(mixture, experts, in_features, device, dtype)
        self.ia3 = ia3
        size = in_features if ia3.feedforward else out_features
        self.vectors = nn.Parameter(torch.ones(experts, size, device=device, dtype=dtype))

    def forward(self, values: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
        gates = self.routed(values if x is None else x)
        return values * (gates.to(values.dtype) @ self.vectors)

    def adapter_parameters(self) -> dict[str, nn.Parameter]:
        return {"vectors": self.vectors, "router": self.router}
