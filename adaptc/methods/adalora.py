"""AdaLoRA: adaptive budget allocation for parameter-efficient fine-tuning (Zhang et al. 2023,
arXiv:2303.10512), PEFT's `AdaLoraConfig`.

The update has SVD form, and a rank budget is moved between layers during training:

    y = W₀x + b + (α/(r₀ + 1e-5))·P·(Λ ⊙ (Q·dropout(x)))
    Q ("A"): [r₀, in],  Λ ("E"): [r₀, 1],  P ("B"): [out, r₀]       r₀ = init_r
    Q, P ~ N(0, 0.02²), Λ = 0, so the adapted model starts equal to the base;
    α = alpha (or r₀ when alpha = 0); the divisor r₀ stays fixed as triplets are pruned.

    orthogonality regulariser  R = mean over Q and P of ‖QQᵀ − I‖_F, ‖PᵀP − I‖_F,
    added to the loss as orth_reg · R (`adaptc.orth_loss`).

Importance of a triplet i (P[:, i], Λ_i, Q[i]): with s(w) = Ī(w)·Ū(w), where Ī is an EMA
(beta1) of |w·∂L/∂w| and Ū an EMA (beta2) of |I − Ī|, score_i = s(Λ_i) + mean_j s(Q[i, j])
+ mean_j s(P[j, i]). The budget (total kept triplets) falls from Σ r₀ to target_r·sites
along a cubic schedule between steps tinit and total_step − tfinal; every delta_t steps the
lowest-scoring triplets beyond the budget get Λ_i = 0, and in the last tfinal steps the final
mask is re-applied after every step (an allocator created on loaded adapters, to resume
training, re-applies theirs: Λ_i = 0). `AdaLoraAllocator.step(global_step)` does this, called
after `loss.backward()` and the optimizer step, before `zero_grad()` (PEFT's
`update_and_allocate`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from adaptc.errors import AdaptcError
from adaptc.methods.options import option
from adaptc.methods.precision import wide

SCHEDULE = ("target_r", "tinit", "tfinal", "delta_t", "beta1", "beta2", "orth_reg", "total_step")


@dataclass(frozen=True)
class AdaLoraConfig:
    method: ClassVar[str] = "adalora"
    adapts: ClassVar[tuple[str, ...]] = ("linear",)
    rewrites_layer: ClassVar[bool] = True  # E305: one such method per linear layer

    init_r: int = option(12, "initial rank of every site (the number of triplets)", low=1)
    target_r: int = option(8, "average rank per site once the budget schedule ends", low=0)
    alpha: float = option(8.0, "scale numerator: the update is multiplied by alpha/init_r "
                          "(0: by 1)", low=0)
    dropout: float = option(0.0, "dropout on the adapter's input while training", low=0, high=1,
                            high_open=True, training=True)
    total_step: int = option(0, "total training steps (required, > 0)", low=0,
                            training=True)
    tinit: int = option(0, "warm-up steps before any pruning", low=0, training=True)
    tfinal: int = option(0, "final steps with the rank pattern fixed", low=0,
                        training=True)
    delta_t: int = option(1, "steps between two budget allocations", low=1,
                         training=True)
    beta1: float = option(0.85, "EMA factor of the sensitivity", low=0, high=1, high_open=True,
                          training=True)
    beta2: float = option(0.85, "EMA factor of the uncertainty", low=0, high=1, high_open=True,
                          training=True)
    orth_reg: float = option(0.5, "weight of the orthogonality regulariser", low=0,
                             training=True)

    def check(self) -> list[tuple[str, str]]:
        if self.total_step <= 0:
            return [("total_step", "adalora needs total_step > 0 (the length of training)")]
        if self.tinit >= self.total_step - self.tfinal:
            return [("tinit", f"tinit={self.tinit} leaves no budgeting phase before step "
                              f"total_step - tfinal = {self.total_step - self.tfinal}")]
        if self.target_r > self.init_r:
            return [("target_r", f"target_r={self.target_r} exceeds init_r={self.init_r}")]
        return []

    @property
    def scale(self) -> float:
        return (self.alpha if self.alpha > 0 else float(self.init_r)) / (self.init_r + 1e-5)

    def schedule(self) -> tuple:
        return tuple(getattr(self, key) for key in SCHEDULE)


class AdaLoraAdapter(nn.Module):
    """SVD-form update (α/r₀)·P·(Λ ⊙ Q·dropout(x)) of one linear site.

    Shapes: x [..., in] → [..., out]. `A` (Q) [r₀, in], `E` (Λ) [r₀, 1], `B` (P) [out, r₀];
    `ranknum` is the frozen divisor r₀ (a parameter, as in PEFT, so the totals agree).
    """

    fast_parameters: ClassVar[tuple[str, ...]] = ("B",)

    def __init__(self, config: AdaLoraConfig, in_features: int, out_features: int,
                 device: torch.device | None = None, dtype: torch.dtype | None = None):
        super().__init__()
        self.config = config
        factory = {"device": device, "dtype": dtype}
        self.A = nn.Parameter(torch.empty(config.init_r, in_features, **factory))
        self.E = nn.Parameter(torch.zeros(config.init_r, 1, **factory))
        self.B = nn.Parameter(torch.empty(out_features, config.init_r, **factory))
        self.ranknum = nn.Parameter(torch.full((1,), float(config.init_r), **factory),
                                    requires_grad=False)
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        if self.A.device.type != "meta":
            nn.init.normal_(self.A, std=0.02)
            nn.init.normal_(self.B, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        low = nn.functional.linear(self.dropout(x), self.A * self.E)
        return nn.functional.linear(low, self.B) * self.config.scale

    def adapter_parameters(self) -> dict[str, nn.Parameter]:
        return {"A": self.A, "E": self.E, "B": self.B}

    def orthogonality(self) -> torch.Tensor:
        """‖QQᵀ − I‖_F + ‖PᵀP − I‖_F (the two terms of PEFT's regulariser for this site)."""
        eye = torch.eye(self.A.shape[0], device=self.A.device, dtype=self.A.dtype)
        return (torch.linalg.norm(self.A @ self.A.T - eye) +
                torch.linalg.norm(self.B.T @ self.B - eye))

    def delta_weight(self) -> torch.Tensor:
        """ΔW = (α/r₀)·P·diag(Λ)·Q in float32 or wider (`wide`), [out, in]."""
        return (wide(self.B) @ (wide(self.A) * wide(self.E))) * self.config.scale

    def merged(self, weight: torch.Tensor, bias: torch.Tensor | None
               ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(W + ΔW, b) for `weight` [out, in]; pruned triplets (Λ_i = 0) add nothing."""
        return (wide(weight) + self.delta_weight()).to(weight.dtype), bias


def adalora_adapters(module: nn.Module) -> dict[str, AdaLoraAdapter]:
    return {name: m for name, m in module.named_modules() if isinstance(m, AdaLoraAdapter)}


def orth_loss(module: nn.Module) -> torch.Tensor:
    """Σ over groups of AdaLoRA sites sharing a schedule of orth_reg × the mean of the
    per-matrix terms (PEFT's `orth_reg_weight · regu_loss`); 0 without AdaLoRA."""
    groups: dict[tuple, list[AdaLoraAdapter]] = {}
    for adapter in adalora_adapters(module).values():
        groups.setdefault(adapter.config.schedule(), []).append(adapter)
    terms = [group[0].config.orth_reg * torch.stack([a.orthogonality() for a in group]).sum()
             / (2 * len(group)) for group in groups.values()]
    return torch.stack(terms).sum() if terms else torch.zeros(())


class AdaLoraAllocator:
    """The rank-budget schedule over a compiled module's AdaLoRA sites (one budget per group
    of sites sharing the schedule keys). Call `step(global_step)` after backward and the
    optimizer step, before zero_grad, every training step."""

    def __init__(self, module: nn.Module):
        adapters = adalora_adapters(module)
        if not adapters:
            raise AdaptcError("AdaLoraAllocator: the module has no adalora sites")
        self.groups: dict[tuple, _Budget] = {}
        for name, adapter in adapters.items():
            key = adapter.config.schedule()
            self.groups.setdefault(key, _Budget(adapter.config)).sites[name] = adapter
        for budget in self.groups.values():
            budget.resume()

    def step(self, global_step: int) -> dict[str, int]:
        """Update importance, prune to the budget when due; returns the kept rank per site."""
        kept = {}
        for budget in self.groups.values():
            kept.update(budget.step(global_step))
        return kept


class _Budget:
    """PEFT's RankAllocator for one group of sites (same names for the same quantities)."""

    def __init__(self, config: AdaLoraConfig):
        self.config = config
        self.sites: dict[str, AdaLoraAdapter] = {}
        self.ipt: dict[tuple[str, str], torch.Tensor] = {}
        self.exp_avg_ipt: dict[tuple[str, str], torch.Tensor] = {}
        self.exp_avg_unc: dict[tuple[str, str], torch.Tensor] = {}
        self.masks: dict[str, torch.Tensor] = {}

    def resume(self) -> None:
        """Adapters that have trained (some Λ_i ≠ 0; loaded to resume training) bring their
        rank pattern: the triplets with Λ_i = 0 were pruned, and the final phase re-applies
        that mask (a new allocator has no final allocation of its own to re-apply)."""
        kept = {name: a.E.detach().view(-1) != 0 for name, a in self.sites.items()}
        if any(mask.any() for mask in kept.values()):
            self.masks = kept

    @property
    def init_bgt(self) -> int:
        return sum(a.A.shape[0] for a in self.sites.values())

    def budget_schedule(self, step: int) -> tuple[int, bool]:
        c = self.config
        target = c.target_r * len(self.sites)
        if step <= c.tinit:
            return self.init_bgt, False
        if step > c.total_step - c.tfinal:
            return target, True
        mul = 1 - (step - c.tinit) / (c.total_step - c.tfinal - c.tinit)
        return int((self.init_bgt - target) * mul ** 3 + target), step % c.delta_t == 0

    def step(self, step: int) -> dict[str, int]:
        end = self.config.total_step - self.config.tfinal
        if step < end:
            self.update_ipt()
            budget, due = self.budget_schedule(step)
            if due:
                self.mask_to_budget(budget)
        elif step == end:  # the final allocation (PEFT: no importance update at this step)
            self.mask_to_budget(self.budget_schedule(step)[0])
            self.ipt, self.exp_avg_ipt, self.exp_avg_unc = {}, {}, {}
        elif self.masks:
            self.apply_masks()
        return {name: int((a.E != 0).sum()) for name, a in self.sites.items()}

    def update_ipt(self) -> None:
        b1, b2 = self.config.beta1, self.config.beta2
        with torch.no_grad():
            for name, adapter in self.sites.items():
                for part, p in adapter.adapter_parameters().items():
                    if p.grad is None:
                        continue
                    key = (name, part)
                    self.ipt[key] = (p * p.grad).abs().detach()
                    avg = self.exp_avg_ipt.get(key, torch.zeros_like(p))
                    unc = self.exp_avg_unc.get(key, torch.zeros_like(p))
                    self.exp_avg_ipt[key] = b1 * avg + (1 - b1) * self.ipt[key]
                    self.exp_avg_unc[key] = b2 * unc + (1 - b2) * (self.ipt[key] -
                                                                  self.exp_avg_ipt[key]).abs()

    def score(self, name: str, part: str) -> torch.Tensor:
        key = (name, part)
        if key not in self.exp_avg_ipt:
            raise AdaptcError("AdaLoraAllocator.step: no gradients seen yet; call it after "
                              "loss.backward()")
        return self.exp_avg_ipt[key] * self.exp_avg_unc[key]

    def mask_to_budget(self, budget: int) -> None:
        triplets = {}
        for name in self.sites:
            from_a = self.score(name, "A").mean(dim=1)
            from_b = self.score(name, "B").mean(dim=0)
            triplets[name] = self.score(name, "E").view(-1) + from_a + from_b
        scores = torch.cat(list(triplets.values()))
        if self.init_bgt - budget <= 0:
            return
        threshold = torch.kthvalue(scores, k=self.init_bgt - budget)[0].item()
        self.masks = {name: score > threshold for name, score in triplets.items()}
        self.apply_masks()

    def apply_masks(self) -> None:
        with torch.no_grad():
            for name, keep in self.masks.items():
                self.sites[name].E.masked_fill_(~keep.view(-1, 1), 0.0)
