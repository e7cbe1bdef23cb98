"""`quantize`: store frozen base weights in 4-bit NormalFloat (NF4) with double quantisation
(QLoRA, Dettmers et al. 2023, arXiv:2305.14314) and dequantise them in the graph. With a
`lora` statement on the same layers this is QLoRA: `*_proj: quantize` + `*_proj: lora r=8`.

NF4 code q (16 values): the 2^4 quantiles of N(0, 1), built asymmetrically so 0 is exact,

    q⁺ = Φ⁻¹(linspace(δ, ½, 9)[:-1]),  q⁻ = −Φ⁻¹(linspace(δ, ½, 8)[:-1]),  δ = 0.9677083,
    q = sort(q⁺ ∪ {0} ∪ q⁻) / max|·|                           (bitsandbytes' table)

Quantisation of W (flattened in storage order, blocks of `block` = 64 values):

    c_b = max|W_b|,   i = argmin_k |W/c_b − q_k|   (4-bit index, two per byte)

Double quantisation of the block constants c (blocks of `double_block` = 256):

    μ = mean(c),  d_g = max|c_g − μ|,  j = argmin_k |(c − μ)/d_g − m_k|   (uint8)

with m bitsandbytes' signed dynamic 8-bit map (`dynamic_map`: ± 10^(e−6)·mantissa, 2^e
mantissas per exponent e = 0..6, and 0, 1), so a weight costs 4 + 8/64 + 32/(64·256) ≈
4.127 bits instead of 4.5 (float32 constants) or 16/32. Dequantisation: W ≈ q[i]·(m_j·d_g + μ).
The map's precision is relative, as the paper's FP8: a linear int8 code had an absolute step
of d_g/127, so one outlier weight put every other block of its group up to half its scale
off (or negative: the block's sign flipped).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn
from torch.nn import functional as F

from adaptc.methods.options import option

OFFSET = 0.9677083


def nf4_code() -> torch.Tensor:
    """The 16 NF4 values in ascending order (float32), computed from normal quantiles."""
    def ppf(p: torch.Tensor) -> torch.Tensor:
        return math.sqrt(2) * torch.erfinv(2 * p - 1)

    positive = ppf(torch.linspace(OFFSET, 0.5, 9, dtype=torch.float64)[:-1])
    negative = -ppf(torch.linspace(OFFSET, 0.5, 8, dtype=torch.float64)[:-1])
    values = torch.cat([positive, torch.zeros(1, dtype=torch.float64), negative]).sort().values
    return (values / values.abs().max()).float()


@dataclass(frozen=True)
class QuantizeConfig:
    method: ClassVar[str] = "quantize"
    adapts: ClassVar[tuple[str, ...]] = ("linear",)

    format: str = option("nf4", "storage format of the frozen weight", choices=("nf4",))
    block: int = option(64, "values per NF4 block (one absmax constant each)", low=2)
    double: bool = option(True, "quantise the block constants again (8-bit, QLoRA's double "
                          "quantisation)")
    double_block: int = option(256, "block constants per second-level block", low=2)

    def check(self) -> list[tuple[str, str]]:
        if self.block % 2:
            return [("block", f"block={self.block} must be even (two 4-bit codes per byte)")]
        return []


def dynamic_map() -> torch.Tensor:
    """The 256 values of bitsandbytes' signed dynamic map (`create_dynamic_map()`), ascending:
    for e = 0..6, 2^e midpoints of linspace(0.1, 1, 2^e + 1) times ±10^(e−6); and 0, 1."""
    values = [0.0, 1.0]
    for e in range(7):
        bounds = torch.linspace(0.1, 1, 2 ** e + 1, dtype=torch.float64)
        means = (bounds[:-1] + bounds[1:]) / 2 * 10.0 ** (e - 6)
        values += means.tolist() + (-means).tolist()
    return torch.tensor(sorted(values)).float()


def quantize_nf4(weight: torch.Tensor, config: QuantizeConfig) -> dict[str, torch.Tensor]:
    """NF4 codes and (double-quantised) block constants of `weight`; see the module doc."""
    flat = weight.detach().float().reshape(-1)
    pad = (-flat.numel()) % config.block
    blocks = torch.cat([flat, flat.new_zeros(pad)]).view(-1, config.block)
    absmax = blocks.abs().amax(dim=1)
    scaled = blocks / absmax.clamp_min(torch.finfo(torch.float32).tiny)[:, None]
    index = nearest(scaled, nf4_code().to(flat.device)).to(torch.uint8).view(-1)
    state = {"packed": (index[0::2] << 4) | index[1::2]}
    if not config.double:
        return {**state, "absmax": absmax}
    mean = absmax.mean()
    width = group_width(absmax.numel(), config)
    pad2 = (-absmax.numel()) % width
    groups = torch.cat([absmax - mean, absmax.new_zeros(pad2)]).view(-1, width)
    scale = groups.abs().amax(dim=1).clamp_min(torch.finfo(torch.float32).tiny)
    quantized = nearest(groups / scale[:, None], dynamic_map().to(flat.device))
    quantized = quantized.to(torch.uint8).view(-1)
    # clone: absmax_q owns its bytes, so saved programs do not carry the padded storage
    return {**state, "absmax_q": quantized[:absmax.numel()].clone(), "absmax_scale": scale,
            "absmax_mean": mean.reshape(1)}


def nearest(values: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Index of the nearest of the ascending `levels` for each value, by the midpoints between
    them (as bitsandbytes' kernels): a distance to every level cost 33× the weight's bytes (2 GB
    for a 4096² float32 weight)."""
    return torch.bucketize(values, (levels[1:] + levels[:-1]) / 2)


def group_width(constants: int, config: QuantizeConfig) -> int:
    """Block constants per second-level group as laid out: `double_block`, or all of them
    when there are fewer. The same groups and scales (the zeros a wider group is padded with
    change no max), without padding up to `double_block` (1e8: 400 MB per layer and forward)."""
    return min(config.double_block, constants)


class Nf4Weight(nn.Module):
    """A frozen weight stored as NF4 buffers; `forward()` (no inputs) returns the dequantised
    weight in its original shape and dtype, so the graph reads `linear(x, <site>.nf4(), b)`.

    Buffers: `packed` uint8 [n/2], and `absmax` float32 [n/block] or, with double
    quantisation, `absmax_q` uint8 [n/block] (indices into `dynamic_map`), `absmax_scale`
    float32 [n/block/double_block], `absmax_mean` float32 [1]; `code` (the 16 NF4 values) and
    `levels` (the dynamic map) are non-persistent buffers.
    """

    def __init__(self, weight: torch.Tensor, config: QuantizeConfig):
        super().__init__()
        self.config = config
        self.shape, self.dtype = tuple(weight.shape), weight.dtype
        if weight.device.type == "meta":
            state = meta_state(weight.numel(), config)
        else:
            state = quantize_nf4(weight, config)
        for name, tensor in state.items():
            self.register_buffer(name, tensor)
        self.register_buffer("code", nf4_code().to(weight.device), persistent=False)
        self.register_buffer("levels", dynamic_map().to(weight.device), persistent=False)

    def absmax_values(self) -> torch.Tensor:
        if not self.config.double:
            return self.absmax
        groups = self.levels[self.absmax_q.long()]
        width = group_width(groups.numel(), self.config)
        pad = (-groups.numel()) % width
        groups = torch.cat([groups, groups.new_zeros(pad)]).view(-1, width)
        values = (groups * self.absmax_scale[:, None]).reshape(-1)
        return values[:self.absmax_q.numel()] + self.absmax_mean

    def forward(self) -> torch.Tensor:
        index = torch.stack([self.packed >> 4, self.packed & 15], dim=1).reshape(-1).long()
        blocks = self.code[index].view(-1, self.config.block) * self.absmax_values()[:, None]
        numel = math.prod(self.shape)
        return blocks.reshape(-1)[:numel].view(self.shape).to(self.dtype)

    def stored_bytes(self) -> int:
        return sum(b.numel() * b.element_size() for n, b in self.named_buffers()
                   if n not in ("code", "levels"))


class Nf4Linear(torch.autograd.Function):
    """`linear(x, weight(), bias)` on an `Nf4Weight` that keeps no dense weight for backward:
    the input gradient dequantises the weight again (as bitsandbytes' `MatMul4Bit`), so a
    training step holds one layer's dense weight at a time instead of every layer's. The
    frozen weight gets no gradient; `x` and `bias` do when they need one. `transposed`: the
    weight is stored [in, out] (GPT-2's Conv1D, `addmm(b, x, W)`)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: Nf4Weight, bias: torch.Tensor | None,
                transposed: bool):
        ctx.weight, ctx.transposed, ctx.x_dtype = weight, transposed, x.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        return F.linear(x, dense(weight, transposed), bias)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        # under autocast the output (and grad) may be 16-bit while the weight is not
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = (grad @ dense(ctx.weight, ctx.transposed).to(grad.dtype)).to(ctx.x_dtype)
        if ctx.needs_input_grad[2]:
            grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0).to(ctx.bias_dtype)
        return grad_x, None, grad_bias, None


def dense(weight: Nf4Weight, transposed: bool) -> torch.Tensor:
    """The dequantised weight in nn.Linear's [out, in] layout."""
    return weight().t() if transposed else weight()


def nf4_linear(x: torch.Tensor, weight: Nf4Weight, bias: torch.Tensor | None = None,
               transposed: bool = False) -> torch.Tensor:
    """The graph's call for a linear layer on an NF4 weight in train mode; see `Nf4Linear`."""
    return Nf4Linear.apply(x, weight, bias, transposed)


def meta_state(numel: int, config: QuantizeConfig) -> dict[str, torch.Tensor]:
    """Buffers of the right shapes and dtypes on `meta` (for counting full-size models)."""
    blocks = -(-numel // config.block)
    state = {"packed": torch.empty(blocks * config.block // 2, dtype=torch.uint8, device="meta")}
    if not config.double:
        return {**state, "absmax": torch.empty(blocks, device="meta")}
    groups = -(-blocks // config.double_block)
    return {**state, "absmax_q": torch.empty(blocks, dtype=torch.uint8, device="meta"),
            "absmax_scale": torch.empty(groups, device="meta"),
            "absmax_mean": torch.empty(1, device="meta")}
