"""VeRA: vector-based random matrix adaptation (Kopiczko et al. 2024, arXiv:2310.11454),
PEFT's `VeraConfig`.

One pair of frozen random matrices is shared by every adapted layer; each layer trains only
two scaling vectors:

    y = W₀x + b + λ_b ⊙ (B·(λ_d ⊙ (A·dropout(x))))
    A: [r, in_max], B: [out_max, r]  shared, frozen; a layer uses A[:, :in] and B[:out, :]
    λ_d: [r] init `d_init` (0.1),  λ_b: [out] init 0, so the adapted model starts at the base

A and B are regenerated from `seed` (Kaiming-uniform, gain √2, drawn A then B from one CPU
generator: PEFT's `projection_prng_key` gives the same matrices), so saved adapters hold only
λ_d and λ_b. in_max and out_max are the largest dimensions over the sites sharing a pair
(all `vera` sites with the same r and seed), as PEFT sizes them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from adaptc.methods.options import option
from adaptc.methods.precision import wide


@dataclass(frozen=True)
class VeraConfig:
    method: ClassVar[str] = "vera"
    adapts: ClassVar[tuple[str, ...]] = ("linear",)
    rewrites_layer: ClassVar[bool] = True  # E305: one such method per linear layer
    rank_bound: ClassVar[bool] = False  # the random projections may be wider than the layer

    r: int = option(256, "rank of the shared random projections A and B", low=1)
    d_init: float = option(0.1, "initial value of every entry of λ_d", training=True)
    seed: int = option(0, "seed that regenerates the shared A and B (PEFT's projection_prng_key)",
                       low=0, high=2 ** 64 - 1)  # what torch.Generator.manual_seed takes
    dropout: float = option(0.0, "dropout on the adapter's input while training", low=0, high=1,
                            high_open=True, training=True)

    def check(self) -> list[tuple[str, str]]:
        return []


def shared_projections(r: int, in_max: int, out_max: int, seed: int,
                       device: torch.device | None = None, dtype: torch.dtype | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """A [r, in_max] then B [out_max, r] from one generator seeded with `seed`: uniform in
    ±√3·√2/√fan_in (Kaiming-uniform with gain √2, fan_in = the second dimension)."""
    if torch.device(device or "cpu").type == "meta":
        return (torch.empty(r, in_max, device="meta", dtype=dtype),
                torch.empty(out_max, r, device="meta", dtype=dtype))
    gen = torch.Generator(device="cpu").manual_seed(seed)
    out = []
    for shape in ((r, in_max), (out_max, r)):
        bound = math.sqrt(3.0) * math.sqrt(2) / math.sqrt(shape[1])
        out.append(torch.empty(shape).uniform_(-bound, bound, generator=gen)
                   .to(device=device, dtype=dtype))
    return out[0], out[1]


class VeraProjections(nn.Module):
    """The frozen shared pair, stored once in the graph module as buffers `A` and `B`."""

    def __init__(self, r: int, in_max: int, out_max: int, seed: int,
                 device: torch.device | None = None, dtype: torch.dtype | None = None):
        super().__init__()
        self.r, self.seed = r, seed
        A, B = shared_projections(r, in_max, out_max, seed, device, dtype)
        self.register_buffer("A", A)
        self.register_buffer("B", B)


class VeraAdapter(nn.Module):
    """λ_b ⊙ (B[:out]·(λ_d ⊙ (A[:, :in]·dropout(x)))); called from the graph as
    `vera(x, A, B)` with the shared projections. Shapes: x [..., in] → [..., out]."""

    # LoRA+: both vectors get ratio × lr, as PEFT's `create_loraplus_optimizer` gives 1-D tensors
    fast_parameters: ClassVar[tuple[str, ...]] = ("lambda_d", "lambda_b")

    def __init__(self, config: VeraConfig, in_features: int, out_features: int,
                 device: torch.device | None = None, dtype: torch.dtype | None = None):
        super().__init__()
        self.config = config
        self.in_features, self.out_features = in_features, out_features
        self.lambda_d = nn.Parameter(torch.full((config.r,), config.d_init, device=device,
                                                dtype=dtype))
        self.lambda_b = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype))
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self._projections: tuple[VeraProjections, ...] = ()

    def forward(self, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
        low = nn.functional.linear(self.dropout(x), A[:, :self.in_features])
        return self.lambda_b * nn.functional.linear(self.lambda_d * low, B[:self.out_features])

    def adapter_parameters(self) -> dict[str, nn.Parameter]:
        return {"lambda_d": self.lambda_d, "lambda_b": self.lambda_b}

    def share(self, projections: VeraProjections) -> None:
        """Remember the shared pair for `merged` (in a tuple: it is registered once, at the
        graph module's root, not as a submodule of every adapter)."""
        self._projections = (projections,)

    def delta_weight(self) -> torch.Tensor:
        """ΔW = diag(λ_b)·B[:out]·diag(λ_d)·A[:, :in] in float32 or wider (`wide`), [out, in]."""
        (shared,) = self._projections
        a = wide(shared.A[:, :self.in_features]) * wide(self.lambda_d)[:, None]
        b = wide(shared.B[:self.out_features]) * wide(self.lambda_b)[:, None]
        return b @ a

    def merged(self, weight: torch.Tensor, bias: torch.Tensor | None
               ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(W + ΔW, b) for `weight` [out, in]; float32, cast back once."""
        return (wide(weight) + self.delta_weight()).to(weight.dtype), bias
