"""Fused bottleneck adapter (Houlsby / parallel adapters) for inference.

    y = residual + s·g·(U·act(D·x + b_D) + b_U) (+ skip)

    x [..., d_in], residual [..., d_out], D `down` [bottleneck, d_in], b_D `down_bias`
    [bottleneck], U `up` [d_out, bottleneck], b_U `up_bias` [d_out];
    act ∈ relu | gelu (exact, erf) | silu | tanh. Accumulation in float32; y has x's dtype and
    residual's shape. `scale` s is the adapter's output multiplier (MAM adapter: 4); `gate` g
    (optional, broadcasting to [..., 1]: UniPELT's per-example gate [B, 1, 1]) scales each
    token's update. `skip` (optional, residual's shape) is the transformer block's residual
    stream when the adapter's output only feeds `stream + ·` (`fold_stream_adds`): adding it in
    the epilogue saves that add's pass over the output (two reads and a write) and rounds the
    sum once.

Eager math: `adaptc.methods.bottleneck.BottleneckAdapter.forward`, plus the graph's residual add.

Kernels: when the bottleneck fits in registers (≤ MAX_FUSED_BOTTLENECK = 128), one kernel does
it all: a program takes BLOCK_T tokens, computes their hidden activations h [BLOCK_T, bottleneck]
once, then walks the output features tile by tile (h·Uᵀ + b_U + residual). Keeping the walk over
d_out inside the program means the down-projection is never recomputed and h never touches
memory. With few tokens (decoding) ⌈T / BLOCK_T⌉ programs would leave most of the GPU idle
while one program walks all of d_out, so the programs of a token block share its d_out tiles
(`column_splits`: enough programs for two per multiprocessor, or one, or no split: the
autotuner picks), each redoing the block's down-projection, which at a few tokens is a small
read of D and at thousands a large one (every program reads all of D). Wider bottlenecks take two launches of a generic linear kernel whose epilogues are
constexpr flags: act(x·Dᵀ + b_D) into a hidden buffer in x's dtype, then hidden·Uᵀ + b_U +
residual.
"""
import torch
import triton
import triton.language as tl
from torch.nn import functional as F

from adaptc.backends.triton import (cdiv, check_input, check_tensor, column_splits, define_op,
                                    dot, dot_block, dot_precision, interpreting, launch,
                                    upcast_dot, use_triton)

ACTIVATIONS = ("relu", "gelu", "silu", "tanh")
MAX_FUSED_BOTTLENECK = 128
_OP = "bottleneck_adapter"


# --------------------------------------------------------------------------- autotune configs

def _fused_configs() -> list[triton.Config]:
    """Tiles for the fused kernel: tokens per program, d_in step, d_out step, and the programs
    per multiprocessor its grid aims for (`column_splits`)."""
    if interpreting():
        return [triton.Config({"BLOCK_T": 16, "BLOCK_K": 32, "BLOCK_N": 32, "PROGRAMS_PER_SM": 2})]
    tiles = [(16, 64, 64), (16, 64, 128), (32, 64, 64), (32, 64, 128), (64, 32, 64), (64, 64, 128)]
    configs = [triton.Config({"BLOCK_T": t, "BLOCK_K": k, "BLOCK_N": n, "PROGRAMS_PER_SM": 2},
                             num_warps=w, num_stages=s)
               for t, k, n in tiles for w, s in ((4, 3), (8, 2))
               if (t, k, n, w) != (64, 64, 128, 4)]  # with the skip tile it spills on sm_80 fp16
    # Fewer, taller programs for many tokens: every program of a split token block reads all of
    # D (256 KiB at 2048 × 64 in bf16) from L2, so at 4096 tokens two programs per
    # multiprocessor read D 128-256 times over, more bytes than x, residual, skip and y together.
    configs += [triton.Config({"BLOCK_T": t, "BLOCK_K": 64, "BLOCK_N": n, "PROGRAMS_PER_SM": p},
                              num_warps=8, num_stages=2)
                for t, n, p in ((32, 128, 1), (64, 128, 1), (64, 128, 0), (128, 64, 1),
                                (128, 64, 0))]
    return configs


def _linear_configs() -> list[triton.Config]:
    """Tiles for the unfused linear kernel: rows, columns and reduction step per program."""
    if interpreting():
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32})]
    tiles = [(m, n, k, w) for m, n, k in ((32, 64, 32), (64, 64, 32), (64, 128, 32),
                                          (128, 64, 32)) for w in (4, 8)]
    tiles.append((128, 128, 64, 8))  # not with 4 warps: it spills on sm_80 (triton 3.6)
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=3)
            for m, n, k, w in tiles]


# --------------------------------------------------------------------------- kernels

@triton.jit
def _activate(h, ACTIVATION: tl.constexpr):
    """act(h) on a float32 block; "identity" passes it through."""
    if ACTIVATION == "relu":
        h = tl.maximum(h, 0.0)
    elif ACTIVATION == "gelu":
        h = 0.5 * h * (1.0 + tl.erf(h * 0.7071067811865476))
    elif ACTIVATION == "silu":
        h = h * tl.sigmoid(h)
    elif ACTIVATION == "tanh":
        h = 2.0 * tl.sigmoid(2.0 * h) - 1.0
    return h


@triton.autotune(configs=_fused_configs(), key=["D_IN", "D_OUT", "BOTTLENECK"])
@triton.jit
def _bottleneck_fused_kernel(
    x_ptr, res_ptr, skip_ptr, gate_ptr, down_ptr, down_bias_ptr, up_ptr, up_bias_ptr, out_ptr,
    T, D_IN, D_OUT, BOTTLENECK, scale,
    stride_xt, stride_xk, stride_rt, stride_rn, stride_st, stride_sn,
    ACTIVATION: tl.constexpr, HAS_SKIP: tl.constexpr, HAS_GATE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr, BLOCK_B: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
    PROGRAMS_PER_SM: tl.constexpr,
):
    """One program: BLOCK_T tokens × the d_out tiles j ≡ program_id(1) (mod num_programs(1));
    h stays in registers. PROGRAMS_PER_SM is the grid's (a config choice the autotuner times)."""
    # ---- this program's tokens and the (padded) bottleneck columns
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    row_mask = rows < T
    hid = tl.arange(0, BLOCK_B)
    hid_mask = hid < BOTTLENECK

    # ---- down-projection: acc = x · Dᵀ, float32 accumulator
    acc = tl.zeros((BLOCK_T, BLOCK_B), dtype=tl.float32)
    for k0 in range(0, D_IN, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_mask = ks < D_IN
        x = tl.load(x_ptr + rows[:, None] * stride_xt + ks[None, :] * stride_xk,
                    mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        down_t = tl.load(down_ptr + hid[None, :] * D_IN + ks[:, None],
                         mask=hid_mask[None, :] & k_mask[:, None], other=0.0)
        acc = dot(x, down_t, acc, DOT_PRECISION, UPCAST_DOT)

    # ---- bias + activation (padded columns stay act(0) = 0), rounded like the eager hidden state
    acc += tl.load(down_bias_ptr + hid, mask=hid_mask, other=0.0).to(tl.float32)[None, :]
    h = _activate(acc, ACTIVATION).to(up_ptr.dtype.element_ty)
    if HAS_GATE:  # one float32 factor per token: scale times its gate
        factor = tl.load(gate_ptr + rows, mask=row_mask, other=0.0) * scale

    # ---- up-projection + bias, scaled, + residual (+ skip), this program's d_out tiles in turn
    for n0 in range(tl.program_id(1) * BLOCK_N, D_OUT, tl.num_programs(1) * BLOCK_N):
        outs = n0 + tl.arange(0, BLOCK_N)
        out_mask = outs < D_OUT
        tile_mask = row_mask[:, None] & out_mask[None, :]
        up_t = tl.load(up_ptr + outs[None, :] * BOTTLENECK + hid[:, None],
                       mask=out_mask[None, :] & hid_mask[:, None], other=0.0)
        y = dot(h, up_t, None, DOT_PRECISION, UPCAST_DOT)
        y += tl.load(up_bias_ptr + outs, mask=out_mask, other=0.0).to(tl.float32)[None, :]
        if HAS_GATE:
            y = y * factor[:, None]
        else:
            y = y * scale
        y += tl.load(res_ptr + rows[:, None] * stride_rt + outs[None, :] * stride_rn,
                     mask=tile_mask, other=0.0).to(tl.float32)
        if HAS_SKIP:
            y += tl.load(skip_ptr + rows[:, None] * stride_st + outs[None, :] * stride_sn,
                         mask=tile_mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + rows[:, None] * D_OUT + outs[None, :],
                 y.to(out_ptr.dtype.element_ty), mask=tile_mask)


@triton.autotune(configs=_linear_configs(), key=["N", "K"])
@triton.jit
def _linear_kernel(
    a_ptr, w_ptr, bias_ptr, gate_ptr, res_ptr, skip_ptr, out_ptr,
    M, N, K, scale,
    stride_am, stride_ak, stride_rm, stride_rn, stride_sm, stride_sn,
    ACTIVATION: tl.constexpr, HAS_GATE: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    HAS_SKIP: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """out[M, N] = scale·act(a · wᵀ + bias) (times gate[m] when HAS_GATE, + residual when
    HAS_RESIDUAL, + skip when HAS_SKIP); w [N, K] row-major."""
    # ---- this program's output tile
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < M
    col_mask = cols < N
    tile_mask = row_mask[:, None] & col_mask[None, :]

    # ---- a · wᵀ, float32 accumulator
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_mask = ks < K
        a = tl.load(a_ptr + rows[:, None] * stride_am + ks[None, :] * stride_ak,
                    mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        w_t = tl.load(w_ptr + cols[None, :] * K + ks[:, None],
                      mask=col_mask[None, :] & k_mask[:, None], other=0.0)
        acc = dot(a, w_t, acc, DOT_PRECISION, UPCAST_DOT)

    # ---- epilogue: bias, activation, scale (and gate), optional residual and skip
    acc += tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    acc = _activate(acc, ACTIVATION) * scale
    if HAS_GATE:
        acc = acc * tl.load(gate_ptr + rows, mask=row_mask, other=0.0)[:, None]
    if HAS_RESIDUAL:
        acc += tl.load(res_ptr + rows[:, None] * stride_rm + cols[None, :] * stride_rn,
                       mask=tile_mask, other=0.0).to(tl.float32)
    if HAS_SKIP:
        acc += tl.load(skip_ptr + rows[:, None] * stride_sm + cols[None, :] * stride_sn,
                       mask=tile_mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + rows[:, None] * N + cols[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=tile_mask)


# --------------------------------------------------------------------------- reference and launcher

def bottleneck_adapter_reference(x: torch.Tensor, residual: torch.Tensor, down: torch.Tensor,
                                 down_bias: torch.Tensor, up: torch.Tensor, up_bias: torch.Tensor,
                                 activation: str, skip: torch.Tensor | None = None,
                                 scale: float = 1.0, gate: torch.Tensor | None = None
                                 ) -> torch.Tensor:
    """The op in plain PyTorch, float32 throughout, cast to x's dtype at the end."""
    act = {"relu": torch.relu, "gelu": F.gelu, "silu": F.silu, "tanh": torch.tanh}[activation]
    hidden = act(F.linear(x.float(), down.float(), down_bias.float()))
    update = F.linear(hidden, up.float(), up_bias.float()) * scale
    out = residual.float() + (update if gate is None else update * gate.float())
    return (out if skip is None else out + skip.float()).to(x.dtype)


def check_bottleneck_inputs(x: torch.Tensor, residual: torch.Tensor, down: torch.Tensor,
                            down_bias: torch.Tensor, up: torch.Tensor, up_bias: torch.Tensor,
                            activation: str, skip: torch.Tensor | None = None,
                            gate: torch.Tensor | None = None) -> None:
    """Raise ValueError/TypeError naming the first tensor whose shape, dtype or device is off."""
    check_input(_OP, x)
    if activation not in ACTIVATIONS:
        raise ValueError(f"{_OP}: unknown activation {activation!r}; "
                         f"expected one of {', '.join(ACTIVATIONS)}")
    if down.dim() != 2 or up.dim() != 2:
        raise ValueError(f"{_OP}: `down` and `up` must be 2-d, "
                         f"got shapes {tuple(down.shape)} and {tuple(up.shape)}")
    bottleneck, d_out = down.shape[0], up.shape[0]
    check_tensor(_OP, "down", down, x, (bottleneck, x.shape[-1]))
    check_tensor(_OP, "down_bias", down_bias, x, (bottleneck,))
    check_tensor(_OP, "up", up, x, (d_out, bottleneck))
    check_tensor(_OP, "up_bias", up_bias, x, (d_out,))
    check_tensor(_OP, "residual", residual, x, (*x.shape[:-1], d_out))
    if skip is not None:
        check_tensor(_OP, "skip", skip, x, (*x.shape[:-1], d_out))
    if gate is not None:
        per_token = (*x.shape[:-1], 1)
        check_tensor(_OP, "gate", gate, x, tuple(gate.shape))
        if gate.dim() != len(per_token) or any(g not in (1, t)
                                                for g, t in zip(gate.shape, per_token)):
            raise ValueError(f"{_OP}: `gate` has shape {tuple(gate.shape)}, expected one that "
                             f"broadcasts to {per_token} (one factor per token)")


def bottleneck_adapter_triton(x: torch.Tensor, residual: torch.Tensor, down: torch.Tensor,
                              down_bias: torch.Tensor, up: torch.Tensor, up_bias: torch.Tensor,
                              activation: str, skip: torch.Tensor | None = None,
                              scale: float = 1.0, gate: torch.Tensor | None = None,
                              splits: int | None = None) -> torch.Tensor:
    """Check the inputs, allocate y and run the kernels (fused when the bottleneck ≤ 128;
    `splits` fixes its programs per token block, None: `column_splits`)."""
    check_bottleneck_inputs(x, residual, down, down_bias, up, up_bias, activation, skip, gate)
    d_out, bottleneck = up.shape
    x2, res2 = x.reshape(-1, x.shape[-1]), residual.reshape(-1, d_out)
    skip2 = None if skip is None else skip.reshape(-1, d_out)
    out = torch.empty(residual.shape, dtype=x.dtype, device=x.device)
    if x2.shape[0] == 0:
        return out
    # the kernels read one float32 factor per token row
    gate1 = None if gate is None else gate.float().expand(*x.shape[:-1], 1).reshape(-1).contiguous()
    weights = (down.contiguous(), down_bias.contiguous(), up.contiguous(), up_bias.contiguous())
    if bottleneck <= MAX_FUSED_BOTTLENECK:
        _launch_fused(x2, res2, skip2, gate1, *weights, out.view(-1, d_out), activation,
                      float(scale), splits)
    else:
        _launch_unfused(x2, res2, skip2, gate1, *weights, out.view(-1, d_out), activation,
                        float(scale))
    return out


def strides(t: torch.Tensor | None) -> tuple[int, int]:
    """A 2-d operand's strides; (0, 0) for an absent one (its epilogue flag is off)."""
    return (0, 0) if t is None else (t.stride(0), t.stride(1))


def _launch_fused(x: torch.Tensor, res: torch.Tensor, skip: torch.Tensor | None,
                  gate: torch.Tensor | None, down: torch.Tensor, down_bias: torch.Tensor,
                  up: torch.Tensor, up_bias: torch.Tensor, out: torch.Tensor, activation: str,
                  scale: float, splits: int | None) -> None:
    (tokens, d_in), (d_out, bottleneck) = x.shape, up.shape

    def grid(meta):
        blocks = cdiv(tokens, meta["BLOCK_T"])
        return blocks, splits or column_splits(blocks, cdiv(d_out, meta["BLOCK_N"]), x.device,
                                               meta["PROGRAMS_PER_SM"])

    launch(_bottleneck_fused_kernel, (d_in, d_out, bottleneck, x.dtype), tokens, grid,
           x, res, skip, gate, down, down_bias, up, up_bias, out, tokens, d_in, d_out,
           bottleneck, scale, *strides(x), *strides(res), *strides(skip),
           ACTIVATION=activation, HAS_SKIP=skip is not None, HAS_GATE=gate is not None,
           DOT_PRECISION=dot_precision(), UPCAST_DOT=upcast_dot(x),
           BLOCK_B=dot_block(bottleneck))


def _launch_unfused(x: torch.Tensor, res: torch.Tensor, skip: torch.Tensor | None,
                    gate: torch.Tensor | None, down: torch.Tensor, down_bias: torch.Tensor,
                    up: torch.Tensor, up_bias: torch.Tensor, out: torch.Tensor,
                    activation: str, scale: float) -> None:
    hidden = torch.empty((x.shape[0], down.shape[0]), dtype=x.dtype, device=x.device)
    _launch_linear(x, down, down_bias, None, None, None, hidden, activation, 1.0)
    _launch_linear(hidden, up, up_bias, gate, res, skip, out, "identity", scale)


def _launch_linear(a: torch.Tensor, w: torch.Tensor, bias: torch.Tensor,
                   gate: torch.Tensor | None, res: torch.Tensor | None,
                   skip: torch.Tensor | None, out: torch.Tensor, activation: str,
                   scale: float) -> None:
    """out = scale·act(a·wᵀ + bias) (·gate) (+ res) (+ skip); None drops that epilogue term."""
    (m, k), n = a.shape, w.shape[0]
    launch(_linear_kernel, (n, k, res is None, a.dtype), m,
           lambda meta: (cdiv(m, meta["BLOCK_M"]), cdiv(n, meta["BLOCK_N"])),
           a, w, bias, gate, res, skip, out, m, n, k, scale, *strides(a), *strides(res),
           *strides(skip), ACTIVATION=activation, HAS_GATE=gate is not None,
           HAS_RESIDUAL=res is not None, HAS_SKIP=skip is not None,
           DOT_PRECISION=dot_precision(), UPCAST_DOT=upcast_dot(a))


# --------------------------------------------------------------------------- the op

def bottleneck_adapter(x: torch.Tensor, residual: torch.Tensor, down: torch.Tensor,
                       down_bias: torch.Tensor, up: torch.Tensor, up_bias: torch.Tensor,
                       activation: str, skip: torch.Tensor | None = None, scale: float = 1.0,
                       gate: torch.Tensor | None = None) -> torch.Tensor:
    """residual + scale·gate·(up·act(down·x + down_bias) + up_bias) (+ skip), by kernels or
    reference (`use_triton`)."""
    if use_triton(x):
        return bottleneck_adapter_triton(x, residual, down, down_bias, up, up_bias, activation,
                                         skip, scale, gate)
    check_bottleneck_inputs(x, residual, down, down_bias, up, up_bias, activation, skip, gate)
    return bottleneck_adapter_reference(x, residual, down, down_bias, up, up_bias, activation,
                                        skip, scale, gate)


def _bottleneck_adapter_fake(x: torch.Tensor, residual: torch.Tensor, down: torch.Tensor,
                             down_bias: torch.Tensor, up: torch.Tensor, up_bias: torch.Tensor,
                             activation: str, skip: torch.Tensor | None = None,
                             scale: float = 1.0, gate: torch.Tensor | None = None
                             ) -> torch.Tensor:
    return residual.new_empty(residual.shape, dtype=x.dtype)


define_op(bottleneck_adapter, _bottleneck_adapter_fake)
