"""Mixtures of experts over the spec's LoRA and (IA)³ sites: MoLoRA and MoV soft routing
(Zadouri et al. 2023, arXiv:2309.05444: LoRA experts; (IA)³ vectors), top-k routing with
more experts in higher layers (MoLA, Gao et al. 2024, arXiv:2402.08562), and a Switch-style
load-balancing loss (Fedus et al. 2021); or LoRAMoE's dense routing over two groups of
experts with its localized balancing constraint (`LoraMoeConfig`).

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
    balance: float = option(0.01, "weight of the load-balancing loss", low=0,
                           training=True)

    def check(self) -> list[tuple[str, str]]:
        if isinstance(self.experts, list) and not self.experts:
            return [("experts", "experts list must not be empty")]
        fewest = min(self.experts) if isinstance(self.experts, list) else self.experts
        if self.router == "topk" and self.k > fewest:
            return [("k", f"k={self.k} exceeds the number of experts ({fewest}); need 1 <= k <= experts")]
        return []

    def balance_term(self, gates: torch.Tensor, probs: torch.Tensor,
                     sample_types: torch.Tensor | None = None) -> torch.Tensor:
        """Switch's load-balancing loss E·Σ_e f_e·P_e of one site's last routing."""
        routed = (gates > 0).flatten(0, -2).float()
        share = routed.sum(0) / routed.sum().clamp_min(1)
        return gates.shape[-1] * (share * probs.flatten(0, -2).mean(0)).sum()

    def experts_at(self, layer: int | None, n_layers: int) -> int:
        """Experts for a site in `layer` of a stack `n_layers` deep: a list is spread over equal
        groups of consecutive layers (of each stack: an encoder's and a decoder's apart)."""
        if not isinstance(self.experts, list):
            return self.experts
        if layer is None:
            return self.experts[-1]
        return self.experts[min(len(self.experts) - 1, layer * len(self.experts) // max(n_layers, 1))]


@dataclass(frozen=True)
class LoraMoeConfig:
    """LoRAMoE (Dou et al. 2024, arXiv:2312.09979): LoRA experts under a dense softmax router,
    in two groups — the first `knowledge` experts for world-knowledge data, the others for
    the downstream tasks — held apart by the localized balancing constraint (`balance_term`)."""

    method: ClassVar[str] = "loramoe"
    router: ClassVar[str] = "soft"

    experts: int = option(6, "LoRA experts per site", low=2)
    knowledge: int = option(0, "experts of the world-knowledge group (the first ones); "
                            "0: half of them", low=0, training=True)
    delta: float = option(0.1, "imbalance δ between the groups: importance of an expert of "
                          "the sample's own type counts 1 + δ, of the other type 1 - δ",
                          low=0, high=1, high_open=True, training=True)
    balance: float = option(0.1, "weight of the localized balancing loss", low=0,
                            training=True)

    @property
    def k(self) -> int:
        return self.experts

    def check(self) -> list[tuple[str, str]]:
        if self.knowledge >= self.experts:
            return [("knowledge", f"knowledge={self.knowledge} leaves no task experts "
                                  f"(experts={self.experts}); need knowledge < experts")]
        return []

    def experts_at(self, layer: int | None, n_layers: int) -> int:
        return self.experts

    def balance_term(self, gates: torch.Tensor, probs: torch.Tensor,
                     sample_types: torch.Tensor | None = None) -> torch.Tensor:
        """The localized balancing constraint of one site's last routing: Q [B, E], each
        example's router weights summed over its positions; Z = I ⊙ Q with I = 1 + δ where
        the expert's group is the example's type (`sample_types` [B]: 1 world knowledge, 0
        task) and 1 - δ elsewhere; the loss is Z's squared coefficient of variation,
        var(Z) / mean(Z)² (unbiased variance, as in the LoRAMoE code)."""
        if sample_types is None:
            raise ValueError("loramoe's balancing loss needs the type of each example: "
                             "balance_loss(model, sample_types=...) with 1 for world-knowledge "
                             "data and 0 for task data, one per batch row")
        importance = gates.sum(-2)  # [B, E]
        types = torch.as_tensor(sample_types, device=gates.device).reshape(-1)
        if gates.dim() != 3 or types.numel() != importance.shape[0]:
            raise ValueError(f"sample_types has {types.numel()} entries for a batch of "
                             f"{importance.shape[0] if gates.dim() == 3 else '?'} examples")
        if not ((types == 0) | (types == 1)).all():
            raise ValueError(f"sample_types holds {types.tolist()}: each example's type is 1 "
                             "(world knowledge) or 0 (task)")
        group = self.knowledge or self.experts // 2
        knows = torch.arange(self.experts, device=gates.device) < group
        matched = knows[None, :] == (types == 1)[:, None]
        weighted = importance * torch.where(matched, 1 + self.delta, 1 - self.delta)
        return weighted.var() / (weighted.mean() ** 2 + 1e-10)


class Routed(nn.Module):
    """What the mixtures share: per-token expert weights from a router `router` [E, in], and
    the last forward's routing (`routing`: gates, probabilities), from which
    `adapters.balance_loss()` computes the mixture kind's balancing loss."""

    def __init__(self, mixture: MixtureConfig | LoraMoeConfig, experts: int, in_features: int,
                 device: torch.device | None = None, dtype: torch.dtype | None = None):
        super().__init__()
        self.mixture, self.experts = mixture, experts
        self.top_k = experts if mixture.router == "soft" else mixture.k
        self.router = nn.Parameter(torch.empty(experts, in_features, device=device, dtype=dtype))
        self.routing: tuple[torch.Tensor, torch.Tensor] | None = None
        if self.router.device.type != "meta":
            nn.init.kaiming_uniform_(self.router, a=math.sqrt(5))

    def gates(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token expert weights g [..., E] (zero off the top-k) and router probabilities p,
        in float32 or wider (a float64 model routes in float64)."""
        logits = nn.functional.linear(x, self.router)
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # float64 stays
        probs = logits.softmax(-1)
        if self.top_k == self.experts:
            return probs, probs
        top, idx = logits.topk(self.top_k, dim=-1)
        gates = torch.zeros_like(logits).scatter(-1, idx, top.softmax(-1))
        return gates, probs

    def routed(self, x: torch.Tensor, sequence: torch.Tensor | None = None) -> torch.Tensor:
        """The gates for `x`, recorded (with the probabilities) for the balancing loss; where
        x is `sequence` [B, S, in] flattened to [B·S, in] (GPT-2's Conv1D), recorded as
        [B, S, E], so that LoRAMoE's balancing finds each example's positions."""
        gates, probs = self.gates(x)
        if sequence is None:
            self.routing = gates, probs
        else:
            rows = (*sequence.shape[:-1], gates.shape[-1])
            self.routing = gates.reshape(rows), probs.reshape(rows)
        return gates

    def balance_loss(self, sample_types: torch.Tensor | None = None) -> torch.Tensor | None:
        """The weighted balancing loss of the last forward (None before one)."""
        if self.routing is None:
            return None
        return self.mixture.balance * self.mixture.balance_term(*self.routing, sample_types)


class MixtureOfLora(Routed):
    """Routed sum of LoRA experts at one linear site; records its routing on each forward.

    Shapes: x [..., in] → [..., out]. `A` [E, r, in], `B` [E, out, r], `router` [E, in].
    `sequence`: the [B, S, in] tensor x was flattened from, if it was (`Routed.routed`).
    """

    fast_parameters: ClassVar[tuple[str, ...]] = ("B",)  # LoRA+: each expert's B, as LoRA's

    def __init__(self, lora: LoraConfig, mixture: MixtureConfig | LoraMoeConfig, experts: int,
                 in_features: int, out_features: int, device: torch.device | None = None,
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

    def forward(self, x: torch.Tensor, sequence: torch.Tensor | None = None) -> torch.Tensor:
        gates = self.routed(x, sequence)
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

    forward(values, x=None, sequence=None): `values` the tensor scaled (the output, or the
    input x itself), `x` the router's input when it differs, `sequence` the [B, S, in] tensor
    x was flattened from, if it was (`Routed.routed`)."""

    def __init__(self, ia3: Ia3Config, mixture: MixtureConfig | LoraMoeConfig, experts: int,
                 in_features: int, out_features: int, device: torch.device | None = None,
                 dtype: torch.dtype | None = None):
        super().__init__(mixture, experts, in_features, device, dtype)
        self.ia3 = ia3
        size = in_features if ia3.feedforward else out_features
        self.vectors = nn.Parameter(torch.ones(experts, size, device=device, dtype=dtype))

    def forward(self, values: torch.Tensor, x: torch.Tensor | None = None,
                sequence: torch.Tensor | None = None) -> torch.Tensor:
        gates = self.routed(values if x is None else x, sequence)
        return values * (gates.to(values.dtype) @ self.vectors)

    def adapter_parameters(self) -> dict[str, nn.Parameter]:
        return {"vectors": self.vectors, "router": self.router}
