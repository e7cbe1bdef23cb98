"""LoRA (Hu et al. 2021, arXiv:2106.09685) and its options: rsLoRA scaling (Kalajdzievski
2023, arXiv:2312.03732), PiSSA initialisation (Meng et al. 2024, arXiv:2404.02948), LoRA-FA
(Zhang et al. 2023, arXiv:2308.03303, A frozen) and DoRA (Liu et al. 2024, arXiv:2402.09353,
see `methods/dora.py`); LoRA+ (Hayou et al. 2024, arXiv:2402.12354) is an optimizer helper.

    y = W₀x + b + s·B·A·dropout(x),   s = α/r  (rsLoRA: α/√r)
    A: [r, in],  B: [out, r]
    with `gate` (UniPELT): y = W₀x + b + G_L(x)·s·B·A·dropout(x), G_L from `methods.gate`.

Initialisations (`init`):
    kaiming   A Kaiming-uniform (a=√5), B = 0: the adapted model starts equal to the base
              (PEFT's default, `init_lora_weights=True`).
    gaussian  A ~ N(0, 1/r²) (std 1/r), B = 0 (PEFT's `init_lora_weights="gaussian"`).
    pissa     W = U·S·Vᵀ;  A = √(S_r/s)·V_rᵀ,  B = U_r·√(S_r/s);  the linear layer then reads the
              residual W_res = W − s·B·A (a new frozen parameter; the user's W is untouched),
              so W_res + s·B·A = W and the adapted model starts equal to the base.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from adaptc.methods.gate import Gate, gate_bias
from adaptc.methods.options import option
from adaptc.methods.precision import wide

INITS = ("kaiming", "gaussian", "pissa")


@dataclass(frozen=True)
class LoraConfig:
    method: ClassVar[str] = "lora"
    adapts: ClassVar[tuple[str, ...]] = ("linear",)
    adapts_experts: ClassVar[bool] = True  # a target naming a 3-D expert stack: ExpertLora
    rewrites_layer: ClassVar[bool] = True  # E305: one such method per linear layer

    r: int = option(8, "rank of the update B·A", low=1)
    alpha: float = option(8.0, "scale numerator: the update is multiplied by alpha/r", low=0)
    dropout: float = option(0.0, "dropout on the adapter's input while training", low=0, high=1,
                            high_open=True, training=True)
    rslora: bool = option(False, "rank-stabilised scaling alpha/sqrt(r) instead of alpha/r")
    init: str = option("kaiming", "kaiming: A Kaiming-uniform, B zero; gaussian: A ~ N(0, 1/r²), "
                       "B zero; pissa: A, B from the top-r singular vectors of W, the layer keeps "
                       "the residual", choices=INITS)
    freeze_a: bool = option(False, "LoRA-FA: A stays at its initial value, only B trains")
    dora: bool = option(False, "DoRA: a trained magnitude times the normalised direction W + s·B·A")
    gate: bool = option(False, "UniPELT: scale the update by a learned per-example gate in (0, 1)")

    def check(self) -> list[tuple[str, str]]:
        if self.init == "pissa" and self.alpha == 0:
            why = "init=pissa needs alpha > 0 (the singular values are divided by alpha/r)"
            return [("alpha", why)]
        if self.dora and self.gate:
            return [("gate", "gate does not combine with dora: UniPELT's gate scales a LoRA "
                             "update, DoRA rescales the whole layer (its gate got no gradient "
                             "and did nothing)")]
        return []

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.rslora else self.r)


class LoraAdapter(nn.Module):
    """The low-rank update s·B·A·dropout(x) of one linear site; the graph adds it to W₀x + b.

    Shapes: x [..., in] → [..., out]. `A` [r, in], `B` [out, r]. With `freeze_a` A is a
    frozen parameter: `adapter_parameters()` returns only B, and `frozen_state()` returns A
    so saved adapters still restore the module. With `gate`, x is [B, S, in] (or [B, in],
    one row per example as BERT's pooler reads: each row's own gate) and `gate` holds
    w [1, in], b [1]; where the layer reads its input flattened to [B·S, in] (GPT-2's
    Conv1D), the graph passes the [B, S, in] tensor as `sequence` for the gate to average.
    """

    fast_parameters: ClassVar[tuple[str, ...]] = ("B",)  # LoRA+: these get ratio × lr

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
            init_a(self.A, config)

    def forward(self, x: torch.Tensor, sequence: torch.Tensor | None = None) -> torch.Tensor:
        update = nn.functional.linear(nn.functional.linear(self.dropout(x), self.A), self.B) * self.scale
        if self.gate is None:
            return update
        if sequence is None:
            return update * self.gate(x)
        return update * self.gate(sequence).expand(*sequence.shape[:-1], 1).reshape(-1, 1)

    def adapter_parameters(self) -> dict[str, nn.Parameter]:
        gate = {} if self.gate is None else {"gate.weight": self.gate.weight,
                                             "gate.bias": self.gate.bias}
        low_rank = {"B": self.B} if self.config.freeze_a else {"A": self.A, "B": self.B}
        return {**low_rank, **gate}

    @property
    def undecayed_parameters(self) -> tuple[str, ...]:
        return gate_bias(self.gate)

    def frozen_state(self) -> dict[str, torch.Tensor]:
        """Tensors that do not train but are needed to restore the adapter (LoRA-FA's A)."""
        return {"A": self.A} if self.config.freeze_a else {}

    def delta_weight(self) -> torch.Tensor:
        """ΔW = s·B·A in float32 or wider (`wide`), shaped like an nn.Linear weight [out, in]."""
        if self.gate is not None:
            raise ValueError("a gated LoRA update depends on the input; it cannot be merged")
        return (wide(self.B) @ wide(self.A)) * self.scale

    def merged(self, weight: torch.Tensor, bias: torch.Tensor | None
               ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(W + s·B·A, b): `weight` is the [out, in] weight the layer reads in the graph
        (the PiSSA residual when init=pissa); folded in float32 or wider, cast back once."""
        return (wide(weight) + self.delta_weight()).to(weight.dtype), bias

    def init_pissa(self, weight: torch.Tensor) -> torch.Tensor:
        """Set A, B from the top-r singular triplets of `weight` [out, in]; return the
        residual W − s·B·A in the weight's dtype (the caller makes it the layer's weight)."""
        with torch.no_grad():
            A, B, residual = pissa_factors(weight, self.config.r, self.scale)
            self.A.copy_(A)
            self.B.copy_(B)
        return residual


class ExpertLora(nn.Module):
    """LoRA on a mixture-of-experts weight stack (PEFT's `target_parameters`): each expert's
    matrix gets its own low-rank update, and the graph reads W₀ + ΔW wherever it read W₀.

    W₀: [E, d₁, d₂] (Mixtral's `experts.gate_up_proj` [E, 2I, H], `down_proj` [E, H, I]);
    ΔW[e] = s·B[e]·A[e],  A: [E, r, d₂],  B: [E, d₁, r] (zero: the model starts as the base).
    The update does not depend on the input, so there is no dropout, gate, DoRA or PiSSA.
    """

    fast_parameters: ClassVar[tuple[str, ...]] = ("B",)  # LoRA+: these get ratio × lr

    def __init__(self, config: LoraConfig, shape: tuple[int, int, int],
                 device: torch.device | None = None, dtype: torch.dtype | None = None,
                 transposed: bool = False, position: int = 0):
        super().__init__()
        experts, rows, cols = shape
        self.config = config
        self.transposed = transposed  # the stack is [E, in, out] (PEFT lays such out otherwise)
        self.position = position  # its index among its module's own parameters (PEFT nesting)
        self.scale = config.scale
        self.A = nn.Parameter(torch.empty(experts, config.r, cols, device=device, dtype=dtype))
        self.B = nn.Parameter(torch.zeros(experts, rows, config.r, device=device, dtype=dtype))
        if self.A.device.type != "meta":
            for matrix in self.A:
                init_a(matrix, config)

    def forward(self) -> torch.Tensor:
        return (self.B @ self.A) * self.scale

    def adapter_parameters(self) -> dict[str, nn.Parameter]:
        return {"B": self.B} if self.config.freeze_a else {"A": self.A, "B": self.B}

    def frozen_state(self) -> dict[str, torch.Tensor]:
        return {"A": self.A} if self.config.freeze_a else {}

    def delta_weight(self) -> torch.Tensor:
        """ΔW = s·B·A in float32 or wider (`wide`), shaped like the stack [E, d₁, d₂]."""
        return (wide(self.B) @ wide(self.A)) * self.scale


def init_a(A: torch.Tensor, config: LoraConfig) -> None:
    """A's initial values for the kaiming and gaussian inits (pissa overwrites them later)."""
    if config.init == "gaussian":
        nn.init.normal_(A, std=1 / config.r)
    else:
        nn.init.kaiming_uniform_(A, a=math.sqrt(5))


def pissa_factors(weight: torch.Tensor, r: int, scale: float
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PiSSA: W = U·diag(S)·Vh (SVD in float32, or float64 for a float64 model); A = diag(√(S_r/s))·Vh_r [r, in],
    B = U_r·diag(√(S_r/s)) [out, r]; residual W − s·B·A. Same formula as PEFT's
    `init_lora_weights="pissa"`; singular vectors are unique up to a joint sign flip of
    (U_i, Vh_i), so A and B may differ from PEFT's by row/column signs while B·A agrees."""
    if weight.device.type == "meta":
        out, inp = weight.shape
        return (torch.empty(r, inp, device="meta", dtype=weight.dtype),
                torch.empty(out, r, device="meta", dtype=weight.dtype), torch.empty_like(weight))
    full = wide(weight.detach())
    U, S, Vh = torch.linalg.svd(full, full_matrices=False)
    root = torch.sqrt(S[:r] / scale)
    A = root[:, None] * Vh[:r]
    B = U[:, :r] * root[None, :]
    residual = full - scale * (B @ A)
    return A.to(weight.dtype), B.to(weight.dtype), residual.to(weight.dtype)
