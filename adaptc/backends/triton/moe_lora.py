"""Mixture of LoRA experts for inference, grouped by expert in the spirit of Punica's SGMV.

    g = softmax over the top_k logits of W_g·x (float32), zero elsewhere  (top_k = E: soft routing)
    y = residual + s·Σ_e g_e·B_e·A_e·x

    x [..., in], residual [..., out], W_g `router` [E, in], A [E, r, in], B [E, out, r];
    y has x's dtype and residual's shape. Limits: E ≤ MAX_EXPERTS, r ≤ MAX_RANK.

Eager math: `adaptc.methods.mixture.MixtureOfLora.gates` / `forward` (plus the residual add).

The grouped path, over the T flattened tokens and their T·k (token, slot) assignments:
  1. router kernel: logits, top-k by repeated argmax, softmax over the chosen → gates [T, E]
     float32, experts [T, k] int32, and each expert's number of assignments, counts [E]
     (each program adds its block's counts with one vector of atomics). One program holds
     BLOCK_T tokens × all E logits.
  2. grouping: one stable sort of the T·k assignments by expert id; the sorted row i holds
     assignment order[i] of token order[i] // k. Expert e's rows start at the sum of the
     counts before e, which the kernels below add up themselves (E ≤ 64 values, one load),
     so there is no offsets pass, and nothing reads a device value back to the host (as
     `torch.bincount` does on CUDA, to size its output: it would stall the launch queue).
  3. shrink kernel, grid (token blocks, E): h = x[tokens] · A_eᵀ for the rows of segment e
     → h [T·k, r] in x's dtype. Segments hold at most T rows, so the grid needs no host sync;
     programs past their segment's end return at once.
  4. expand kernel, grid (token blocks, out blocks, E): (h · B_eᵀ)·g[token, e]·s, added with
     float32 atomics into the output rows, which start as a float32 copy of the residual.
     Atomics keep memory at T·out (a deterministic reduction would need T·k·out); the price is
     that for k > 1 the order of the k additions, hence the last bits, can vary run to run.
     With k = 1 each output row has one writer, which adds the residual and stores in x's
     dtype: no float32 buffer, copy or cast, and no atomics.

When all experts' ranks add up to at most STACKED_MAX_COLUMNS (E·r ≤ 128: 8 experts of r 8
take 64), the op skips the grouping and takes two launches over the tokens in order, "stacked":
  1. stacked shrink, grid (token blocks): the router's logits and every expert's h = A_e·x in
     one pass over x (router and the E·r rows of A as one [E + E·r, in] product), top-k and
     softmax as in the router kernel, then hg[t, e·r + j] = s·g[t, e]·h[t, e·r + j] → hg
     [T, E·r] in x's dtype (zero for the experts a token did not choose);
  2. stacked expand, grid (token blocks, out blocks): residual + hg·B_allᵀ, where B_all
     [out, E·r] is B read in place (column e·r + j of it is B[e, :, j]), stored in x's dtype.
It multiplies E/k times the needed low-rank products, but those are a few percent of the
bytes the op must move anyway (x read once, residual read, output written): on an H200 at
4096 tokens of width 2048 the grouped path took 0.178 ms (7% of copy bandwidth) for gathers,
a sort, atomics and a float32 buffer that the stacked path does not have. No atomics, so
its results do not vary run to run; the grouped path remains for wide mixtures (many experts
or high ranks), where computing every expert for every token would cost more than grouping.

Few tokens (decoding: T ≤ PER_TOKEN_MAX_TOKENS) take one launch instead, in the spirit of
Punica's BGMV beside its SGMV: at a few tokens each launch of the other paths (two stacked;
router, sort, shrink, expand, residual copy and cast grouped) costs more than the arithmetic.
The per-token kernel's grid is (tokens, out blocks); each program routes its token (logits,
top-k and softmax as in the router kernel, as matrix-vector products in float32), computes
h = A_e·x for each chosen expert (rounded to x's dtype, as the grouped h buffer is) and writes
its block of residual + s·Σ g_e·B_e·h. The out blocks of one token each redo the routing and
the shrink, reading the router and the chosen A_e from L2, which at r ≪ d is a small price
for no grouping, no atomics (so no run-to-run variation) and no float32 output buffer.
"""
import torch
import triton
import triton.language as tl
from torch.nn import functional as F

from adaptc.backends.triton import (cdiv, check_input, check_tensor, define_op, dot,
                                    dot_block, dot_precision, interpreting, launch,
                                    next_power_of_2, upcast_dot, use_triton)

MAX_EXPERTS = 64
MAX_RANK = 128
PER_TOKEN_MAX_TOKENS = 16  # at most this many tokens: the one-launch per-token kernel
STACKED_MAX_COLUMNS = 128  # E·r at most this: the stacked kernels, else the grouped ones
PATHS = ("per-token", "stacked", "grouped")
_OP = "mixture_lora"


# --------------------------------------------------------------------------- autotune configs

def _router_configs() -> list[triton.Config]:
    """Tiles for the router: tokens per program and d_in step."""
    if interpreting():
        return [triton.Config({"BLOCK_T": 16, "BLOCK_K": 32})]
    return [triton.Config({"BLOCK_T": t, "BLOCK_K": k}, num_warps=w)
            for t, k in ((16, 64), (32, 64), (64, 64), (64, 128)) for w in (4, 8)]


def _shrink_configs() -> list[triton.Config]:
    """Tiles for shrink: segment rows per program and d_in step."""
    if interpreting():
        return [triton.Config({"BLOCK_T": 16, "BLOCK_K": 32})]
    tiles = [(16, 128, 4, 3), (32, 64, 4, 3), (32, 64, 8, 2), (64, 64, 4, 3), (64, 64, 8, 2),
             (64, 128, 4, 3), (64, 128, 8, 2)]  # not (16, 128, 8, 2): it spills on sm_90
    return [triton.Config({"BLOCK_T": t, "BLOCK_K": k}, num_warps=w, num_stages=s)
            for t, k, w, s in tiles]


def _expand_configs() -> list[triton.Config]:
    """Tiles for expand: segment rows and output features per program."""
    if interpreting():
        return [triton.Config({"BLOCK_T": 16, "BLOCK_N": 32})]
    tiles = [(t, n, w) for t, n in ((16, 128), (32, 64), (32, 128), (64, 64)) for w in (4, 8)]
    tiles.append((64, 128, 8))  # not with 4 warps: it spills on sm_80
    return [triton.Config({"BLOCK_T": t, "BLOCK_N": n}, num_warps=w) for t, n, w in tiles]


def _stacked_shrink_configs() -> list[triton.Config]:
    """Tiles for the stacked shrink: tokens per program and d_in step."""
    if interpreting():
        return [triton.Config({"BLOCK_T": 16, "BLOCK_K": 32})]
    return [triton.Config({"BLOCK_T": t, "BLOCK_K": k}, num_warps=w, num_stages=3)
            for t, k in ((16, 128), (32, 64), (32, 128), (64, 64)) for w in (4, 8)]


def _stacked_expand_configs() -> list[triton.Config]:
    """Tiles for the stacked expand: tokens and output features per program."""
    if interpreting():
        return [triton.Config({"BLOCK_T": 16, "BLOCK_N": 32})]
    return [triton.Config({"BLOCK_T": t, "BLOCK_N": n}, num_warps=w)
            for t, n in ((32, 64), (32, 128), (64, 64), (64, 128)) for w in (4, 8)]


def _per_token_configs() -> list[triton.Config]:
    """Tiles for the per-token kernel: output features per program and d_in step."""
    if interpreting():
        return [triton.Config({"BLOCK_N": 32, "BLOCK_K": 32})]
    return [triton.Config({"BLOCK_N": n, "BLOCK_K": k}, num_warps=w)
            for n, k in ((64, 128), (128, 128), (128, 256), (256, 128)) for w in (2, 4)]


# --------------------------------------------------------------------------- kernels

@triton.jit
def router_logits(x_ptr, router_ptr, rows, row_mask, ex, ex_mask, D_IN, stride_xt, stride_xk,
                  DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr, BLOCK_T: tl.constexpr,
                  BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr):
    """x[rows] · W_gᵀ [BLOCK_T, BLOCK_E] in float32; padded experts get -inf, never chosen."""
    acc = tl.zeros((BLOCK_T, BLOCK_E), dtype=tl.float32)
    for k0 in range(0, D_IN, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_mask = ks < D_IN
        x = tl.load(x_ptr + rows[:, None] * stride_xt + ks[None, :] * stride_xk,
                    mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        router_t = tl.load(router_ptr + ex[None, :] * D_IN + ks[:, None],
                           mask=ex_mask[None, :] & k_mask[:, None], other=0.0)
        acc = dot(x, router_t, acc, DOT_PRECISION, UPCAST_DOT)
    return tl.where(ex_mask[None, :], acc, float("-inf"))


@triton.autotune(configs=_router_configs(), key=["D_IN", "E"], restore_value=["counts_ptr"])
@triton.jit
def _router_kernel(
    x_ptr, router_ptr, gates_ptr, experts_ptr, counts_ptr,
    T, D_IN, E, top_k,
    stride_xt, stride_xk,
    DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr, BLOCK_E: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """gates[t]: softmax over the top_k logits, 0 elsewhere; experts[t]: their ids, best first;
    counts[e] += how many of the block's tokens chose e."""
    # ---- this program's tokens and their logits
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    row_mask = rows < T
    ex = tl.arange(0, BLOCK_E)
    ex_mask = ex < E
    logits = router_logits(x_ptr, router_ptr, rows, row_mask, ex, ex_mask, D_IN, stride_xt,
                           stride_xk, DOT_PRECISION, UPCAST_DOT, BLOCK_T, BLOCK_E, BLOCK_K)

    # ---- top-k: take the argmax k times, knocking each winner out with -inf
    remaining = logits
    for slot in range(top_k):
        best = tl.argmax(remaining, axis=1, tie_break_left=True)
        tl.store(experts_ptr + rows * top_k + slot, best, mask=row_mask)
        remaining = tl.where(ex[None, :] == best[:, None], float("-inf"), remaining)
    chosen = (remaining == float("-inf")) & ex_mask[None, :]
    picks = (chosen & row_mask[:, None]).to(tl.int32)
    tl.atomic_add(counts_ptr + ex, tl.sum(picks, axis=0), mask=ex_mask)
    tl.store(gates_ptr + rows[:, None] * E + ex[None, :], chosen_softmax(logits, chosen),
             mask=row_mask[:, None] & ex_mask[None, :])


@triton.jit
def chosen_softmax(logits, chosen):
    """[BLOCK_T, BLOCK_E] gates: softmax over each row's chosen logits (shifted by the row's
    best, which is chosen), 0 elsewhere."""
    p = tl.where(chosen, tl.exp(logits - tl.max(logits, axis=1)[:, None]), 0.0)
    return p / tl.sum(p, axis=1)[:, None]


@triton.jit
def top_k_gates(logits, ex, ex_mask, top_k):
    """[BLOCK_T, BLOCK_E] gates: `chosen_softmax` over each row's top_k logits, found by
    taking the argmax top_k times and knocking each winner out with -inf."""
    remaining = logits
    for _ in range(top_k):
        best = tl.argmax(remaining, axis=1, tie_break_left=True)
        remaining = tl.where(ex[None, :] == best[:, None], float("-inf"), remaining)
    return chosen_softmax(logits, (remaining == float("-inf")) & ex_mask[None, :])


@triton.autotune(configs=_stacked_shrink_configs(), key=["D_IN", "E", "R"])
@triton.jit
def _stacked_shrink_kernel(
    x_ptr, router_ptr, a_ptr, hg_ptr,
    T, D_IN, E, R, top_k, scale,
    stride_xt, stride_xk,
    DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr, BLOCK_E: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """hg[t, e·r + j] = s·g[t, e]·(A_e·x[t])[j] for every expert e, with g the top-k gates."""
    # ---- this program's tokens; experts, and the E·r stacked rows of A (row c: expert c // r)
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    row_mask = rows < T
    ex = tl.arange(0, BLOCK_E)
    ex_mask = ex < E
    cols = tl.arange(0, BLOCK_C)
    col_mask = cols < E * R

    # ---- one pass over x: logits = x·W_gᵀ and h = x·A_allᵀ, float32 accumulators
    logits = tl.zeros((BLOCK_T, BLOCK_E), dtype=tl.float32)
    h = tl.zeros((BLOCK_T, BLOCK_C), dtype=tl.float32)
    for k0 in range(0, D_IN, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_mask = ks < D_IN
        x = tl.load(x_ptr + rows[:, None] * stride_xt + ks[None, :] * stride_xk,
                    mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        router_t = tl.load(router_ptr + ex[None, :] * D_IN + ks[:, None],
                           mask=ex_mask[None, :] & k_mask[:, None], other=0.0)
        a_t = tl.load(a_ptr + cols[None, :] * D_IN + ks[:, None],
                      mask=col_mask[None, :] & k_mask[:, None], other=0.0)
        logits = dot(x, router_t, logits, DOT_PRECISION, UPCAST_DOT)
        h = dot(x, a_t, h, DOT_PRECISION, UPCAST_DOT)
    logits = tl.where(ex_mask[None, :], logits, float("-inf"))

    # ---- top-k gates, as in the router kernel, spread over each expert's r columns
    gates = top_k_gates(logits, ex, ex_mask, top_k)
    spread = tl.zeros((BLOCK_T, BLOCK_C), dtype=tl.float32)
    for e in range(E):
        gate = tl.sum(tl.where(ex[None, :] == e, gates, 0.0), axis=1)
        spread = tl.where((cols // R)[None, :] == e, gate[:, None], spread)
    tl.store(hg_ptr + rows[:, None] * (E * R) + cols[None, :],
             (h * spread * scale).to(hg_ptr.dtype.element_ty),
             mask=row_mask[:, None] & col_mask[None, :])


@triton.autotune(configs=_stacked_expand_configs(), key=["D_OUT", "E", "R"])
@triton.jit
def _stacked_expand_kernel(
    hg_ptr, b_ptr, res_ptr, out_ptr,
    T, D_OUT, E, R,
    stride_rt, stride_rn,
    DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr, BLOCK_C: tl.constexpr,
    BLOCK_J: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """out[t, block] = residual[t, block] + hg[t]·B_all[block]ᵀ (B_all[n, e·r+j] = B[e,n,j]),
    the E·r columns taken BLOCK_J at a time (`stacked_step`)."""
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    row_mask = rows < T
    outs = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    out_mask = outs < D_OUT
    y = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
    for c0 in tl.static_range(0, BLOCK_C, BLOCK_J):
        cols = c0 + tl.arange(0, BLOCK_J)
        col_mask = cols < E * R
        hg = tl.load(hg_ptr + rows[:, None] * (E * R) + cols[None, :],
                     mask=row_mask[:, None] & col_mask[None, :], other=0.0)
        b_t = tl.load(b_ptr + (cols // R)[:, None] * D_OUT * R + outs[None, :] * R
                      + (cols % R)[:, None], mask=col_mask[:, None] & out_mask[None, :],
                      other=0.0)
        y = dot(hg, b_t, y, DOT_PRECISION, UPCAST_DOT)
    tile_mask = row_mask[:, None] & out_mask[None, :]
    y += tl.load(res_ptr + rows[:, None] * stride_rt + outs[None, :] * stride_rn,
                 mask=tile_mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + rows[:, None] * D_OUT + outs[None, :], y.to(out_ptr.dtype.element_ty),
             mask=tile_mask)


@triton.jit
def _segment(counts_ptr, expert, E, BLOCK_E: tl.constexpr):
    """[start, end) of `expert`'s rows among the assignments sorted by expert."""
    ex = tl.arange(0, BLOCK_E)
    counts = tl.load(counts_ptr + ex, mask=ex < E, other=0)
    start = tl.sum(tl.where(ex < expert, counts, 0))
    return start, start + tl.sum(tl.where(ex == expert, counts, 0))


@triton.autotune(configs=_shrink_configs(), key=["D_IN", "R"])
@triton.jit
def _shrink_kernel(
    x_ptr, a_ptr, order_ptr, counts_ptr, h_ptr,
    D_IN, R, E, top_k,
    stride_xt, stride_xk,
    DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_E: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """h[row] = A_e · x[token of row] for the sorted rows of expert e = program_id(1)."""
    # ---- this program's rows of expert e's segment; nothing to do past its end
    expert = tl.program_id(1)
    start, end = _segment(counts_ptr, expert, E, BLOCK_E)
    first = start + tl.program_id(0) * BLOCK_T
    if first >= end:
        return
    rows = first + tl.arange(0, BLOCK_T)
    row_mask = rows < end
    tokens = tl.load(order_ptr + rows, mask=row_mask, other=0) // top_k
    ranks = tl.arange(0, BLOCK_R)
    rank_mask = ranks < R

    # ---- gather the tokens' x rows and reduce against A_eᵀ, float32 accumulator
    acc = tl.zeros((BLOCK_T, BLOCK_R), dtype=tl.float32)
    a_expert = a_ptr + expert * R * D_IN
    for k0 in range(0, D_IN, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_mask = ks < D_IN
        x = tl.load(x_ptr + tokens[:, None] * stride_xt + ks[None, :] * stride_xk,
                    mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        a_t = tl.load(a_expert + ranks[None, :] * D_IN + ks[:, None],
                      mask=rank_mask[None, :] & k_mask[:, None], other=0.0)
        acc = dot(x, a_t, acc, DOT_PRECISION, UPCAST_DOT)
    tl.store(h_ptr + rows[:, None] * R + ranks[None, :], acc.to(h_ptr.dtype.element_ty),
             mask=row_mask[:, None] & rank_mask[None, :])


@triton.autotune(configs=_expand_configs(), key=["D_OUT", "R"], restore_value=["out_ptr"])
@triton.jit
def _expand_kernel(
    h_ptr, b_ptr, order_ptr, counts_ptr, gates_ptr, res_ptr, out_ptr,
    D_OUT, R, E, top_k, scale,
    stride_rt, stride_rn,
    DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr, ACCUMULATE: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """out[token] += s·g[token, e]·(B_e · h[row]) for the rows of expert e = program_id(2);
    without ACCUMULATE (top_k = 1: one row per token) out[token] = residual[token] + that."""
    # ---- this program's rows of expert e's segment and its output columns
    expert = tl.program_id(2)
    start, end = _segment(counts_ptr, expert, E, BLOCK_E)
    first = start + tl.program_id(0) * BLOCK_T
    if first >= end:
        return
    rows = first + tl.arange(0, BLOCK_T)
    row_mask = rows < end
    tokens = tl.load(order_ptr + rows, mask=row_mask, other=0) // top_k
    ranks = tl.arange(0, BLOCK_R)
    rank_mask = ranks < R
    outs = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    out_mask = outs < D_OUT

    # ---- h · B_eᵀ over the whole rank, float32 accumulator
    h = tl.load(h_ptr + rows[:, None] * R + ranks[None, :],
                mask=row_mask[:, None] & rank_mask[None, :], other=0.0)
    b_t = tl.load(b_ptr + expert * D_OUT * R + outs[None, :] * R + ranks[:, None],
                  mask=out_mask[None, :] & rank_mask[:, None], other=0.0)
    y = dot(h, b_t, None, DOT_PRECISION, UPCAST_DOT)

    # ---- weight by gate and scale, accumulate into the tokens' output rows (or, the only
    # writer of them, add the residual and store in the output's dtype)
    gate = tl.load(gates_ptr + tokens * E + expert, mask=row_mask, other=0.0)
    y = y * (gate * scale)[:, None]
    tile_mask = row_mask[:, None] & out_mask[None, :]
    if ACCUMULATE:
        tl.atomic_add(out_ptr + tokens[:, None] * D_OUT + outs[None, :], y, mask=tile_mask)
    else:
        y += tl.load(res_ptr + tokens[:, None] * stride_rt + outs[None, :] * stride_rn,
                     mask=tile_mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + tokens[:, None] * D_OUT + outs[None, :],
                 y.to(out_ptr.dtype.element_ty), mask=tile_mask)


@triton.jit
def _rows_times_x(w_ptr, rows, row_mask, x_row, stride_xk, D_IN, BLOCK_K: tl.constexpr):
    """w[rows] · x in float32 for a row-major w [·, D_IN] and one token's x, BLOCK_K at a time."""
    acc = tl.zeros(rows.shape, dtype=tl.float32)
    for k0 in range(0, D_IN, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_mask = ks < D_IN
        x = tl.load(x_row + ks * stride_xk, mask=k_mask, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + rows[:, None] * D_IN + ks[None, :],
                    mask=row_mask[:, None] & k_mask[None, :], other=0.0).to(tl.float32)
        acc += tl.sum(w * x[None, :], axis=1)
    return acc


@triton.autotune(configs=_per_token_configs(), key=["D_IN", "D_OUT", "R", "E"])
@triton.jit
def _per_token_kernel(
    x_ptr, res_ptr, router_ptr, a_ptr, b_ptr, out_ptr,
    D_IN, D_OUT, R, E, top_k, scale,
    stride_xt, stride_xk, stride_rt, stride_rn,
    BLOCK_E: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """out[t, block] = residual + s·Σ_chosen g_e·B_e·A_e·x[t] for token t = program_id(0)."""
    # ---- this program's token, output columns, and the (padded) experts and ranks
    token = tl.program_id(0)
    x_row = x_ptr + token * stride_xt
    ex = tl.arange(0, BLOCK_E)
    ex_mask = ex < E
    ranks = tl.arange(0, BLOCK_R)
    rank_mask = ranks < R
    outs = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    out_mask = outs < D_OUT

    # ---- logits = W_g·x in float32; padded experts get -inf and are never chosen
    logits = _rows_times_x(router_ptr, ex, ex_mask, x_row, stride_xk, D_IN, BLOCK_K)
    logits = tl.where(ex_mask, logits, float("-inf"))

    # ---- top-k by repeated argmax, then the softmax's numerators and denominator
    remaining = logits
    for _ in range(top_k):
        best = tl.argmax(remaining, axis=0, tie_break_left=True)
        remaining = tl.where(ex == best, float("-inf"), remaining)
    chosen = (remaining == float("-inf")) & ex_mask
    p = tl.where(chosen, tl.exp(logits - tl.max(logits, axis=0)), 0.0)
    total = tl.sum(p, axis=0)

    # ---- the chosen experts again, best first: h = A_e·x, y += g_e·B_e[block]·h
    y = tl.zeros((BLOCK_N,), dtype=tl.float32)
    remaining = logits
    for _ in range(top_k):
        best = tl.argmax(remaining, axis=0, tie_break_left=True)
        remaining = tl.where(ex == best, float("-inf"), remaining)
        gate = tl.sum(tl.where(ex == best, p, 0.0), axis=0) / total
        h = _rows_times_x(a_ptr + best * R * D_IN, ranks, rank_mask, x_row, stride_xk, D_IN,
                          BLOCK_K)
        h = h.to(x_ptr.dtype.element_ty).to(tl.float32)
        b = tl.load(b_ptr + best * D_OUT * R + outs[:, None] * R + ranks[None, :],
                    mask=out_mask[:, None] & rank_mask[None, :], other=0.0).to(tl.float32)
        y += gate * tl.sum(b * h[None, :], axis=1)

    # ---- residual + s·y, in x's dtype
    res = tl.load(res_ptr + token * stride_rt + outs * stride_rn, mask=out_mask,
                  other=0.0).to(tl.float32)
    tl.store(out_ptr + token * D_OUT + outs, (res + scale * y).to(out_ptr.dtype.element_ty),
             mask=out_mask)


# --------------------------------------------------------------------------- reference

def route_reference(x: torch.Tensor, router: torch.Tensor, top_k: int) -> torch.Tensor:
    """Gates [..., E] in float32 (float64 for float64 inputs): softmax over the top_k logits,
    zero elsewhere."""
    wide = torch.promote_types(x.dtype, torch.float32)
    logits = F.linear(x.to(wide), router.to(wide))
    top, idx = logits.topk(top_k, dim=-1)
    return torch.zeros_like(logits).scatter(-1, idx, top.softmax(-1))


def mixture_lora_reference(x: torch.Tensor, residual: torch.Tensor, router: torch.Tensor,
                           A: torch.Tensor, B: torch.Tensor, scale: float,
                           top_k: int) -> torch.Tensor:
    """The op in plain PyTorch, float32 throughout (float64 for float64 inputs), cast to x's
    dtype at the end."""
    gates = route_reference(x, router, top_k)
    wide = gates.dtype
    low = torch.einsum("...i,eri->...er", x.to(wide), A.to(wide)) * gates.unsqueeze(-1)
    update = torch.einsum("...er,eor->...o", low, B.to(wide))
    return (residual.to(wide) + scale * update).to(x.dtype)


# --------------------------------------------------------------------------- launchers

def check_mixture_inputs(x: torch.Tensor, residual: torch.Tensor, router: torch.Tensor,
                         A: torch.Tensor, B: torch.Tensor, top_k: int) -> None:
    """Raise ValueError/TypeError naming the first argument that is off."""
    check_input(_OP, x)
    if A.dim() != 3 or B.dim() != 3:
        raise ValueError(f"{_OP}: `A` and `B` must be 3-d, "
                         f"got shapes {tuple(A.shape)} and {tuple(B.shape)}")
    (experts, rank, _), d_out = A.shape, B.shape[1]
    if not 1 <= experts <= MAX_EXPERTS:
        raise ValueError(f"{_OP}: `A` holds {experts} experts; "
                         f"the router kernel supports 1..{MAX_EXPERTS}")
    if rank > MAX_RANK:
        raise ValueError(f"{_OP}: `A` has rank {rank}; "
                         f"the expand kernel supports ranks up to {MAX_RANK}")
    if not 1 <= top_k <= experts:
        raise ValueError(f"{_OP}: top_k={top_k} must be between 1 and "
                         f"the number of experts ({experts})")
    check_tensor(_OP, "A", A, x, (experts, rank, x.shape[-1]))
    check_tensor(_OP, "B", B, x, (experts, d_out, rank))
    check_tensor(_OP, "router", router, x, (experts, x.shape[-1]))
    check_tensor(_OP, "residual", residual, x, (*x.shape[:-1], d_out))


def route_tokens(x: torch.Tensor, router: torch.Tensor,
                 top_k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Router kernel on x [T, in]: gates [T, E] float32, chosen experts [T, top_k] int32,
    assignments per expert [E] int32."""
    (tokens, d_in), experts = x.shape, router.shape[0]
    gates = torch.empty((tokens, experts), dtype=torch.float32, device=x.device)
    chosen = torch.empty((tokens, top_k), dtype=torch.int32, device=x.device)
    counts = torch.zeros(experts, dtype=torch.int32, device=x.device)
    launch(_router_kernel, (d_in, experts, x.dtype), tokens,
           lambda meta: (cdiv(tokens, meta["BLOCK_T"]),),
           x, router.contiguous(), gates, chosen, counts, tokens, d_in, experts, top_k,
           x.stride(0), x.stride(1), DOT_PRECISION=dot_precision(), UPCAST_DOT=upcast_dot(x),
           BLOCK_E=dot_block(experts))
    return gates, chosen, counts


def sort_by_expert(chosen: torch.Tensor) -> torch.Tensor:
    """The T·k assignments (token·k + slot) in expert order, stably: int64 [T·k]."""
    return torch.sort(chosen.flatten(), stable=True).indices


def choose_path(tokens: int, experts: int, rank: int) -> str:
    """The op's kernels for `tokens` tokens: per-token up to PER_TOKEN_MAX_TOKENS, then
    stacked while E·r ≤ STACKED_MAX_COLUMNS, else grouped."""
    if tokens <= PER_TOKEN_MAX_TOKENS:
        return "per-token"
    return "stacked" if experts * rank <= STACKED_MAX_COLUMNS else "grouped"


def mixture_lora_triton(x: torch.Tensor, residual: torch.Tensor, router: torch.Tensor,
                        A: torch.Tensor, B: torch.Tensor, scale: float, top_k: int,
                        path: str | None = None) -> torch.Tensor:
    """Check the inputs; then run one of PATHS (None: `choose_path`'s): the per-token kernel,
    the stacked shrink and expand, or route, group, shrink and expand into a float32 copy of
    the residual."""
    check_mixture_inputs(x, residual, router, A, B, top_k)
    (experts, rank, d_in), d_out = A.shape, B.shape[1]
    x2 = x.reshape(-1, d_in)
    path = path or choose_path(x2.shape[0], experts, rank)
    if path == "stacked" and experts * rank > STACKED_MAX_COLUMNS:
        raise ValueError(f"{_OP}: the stacked kernels take E·r ≤ {STACKED_MAX_COLUMNS}, "
                         f"got {experts}·{rank}")
    if path in ("per-token", "stacked"):
        run = _per_token if path == "per-token" else _stacked
        return run(x2, residual.reshape(-1, d_out), router.contiguous(), A.contiguous(),
                   B.contiguous(), scale, top_k).reshape(residual.shape)
    if path != "grouped":
        raise ValueError(f"{_OP}: path must be one of {', '.join(PATHS)}, got {path!r}")
    res = residual.reshape(-1, d_out)
    if top_k == 1:  # one writer per output row: residual + update straight into x's dtype
        out = torch.empty((x2.shape[0], d_out), dtype=x.dtype, device=x.device)
    else:
        out = torch.empty((x2.shape[0], d_out), dtype=torch.float32, device=x.device)
        out.copy_(res)
    if x2.shape[0] > 0:
        gates, chosen, counts = route_tokens(x2, router, top_k)
        order = sort_by_expert(chosen)
        h = _shrink(x2, A.contiguous(), order, counts, top_k)
        _expand(h, B.contiguous(), order, counts, gates, res, out, scale, top_k)
    return out.to(x.dtype).reshape(residual.shape)


def _per_token(x: torch.Tensor, res: torch.Tensor, router: torch.Tensor, A: torch.Tensor,
               B: torch.Tensor, scale: float, top_k: int) -> torch.Tensor:
    """out [T, out] in x's dtype from the per-token kernel, one launch."""
    (experts, rank, d_in), (n_tokens, d_out) = A.shape, res.shape
    out = torch.empty((n_tokens, d_out), dtype=x.dtype, device=x.device)
    if n_tokens > 0:
        launch(_per_token_kernel, (d_in, d_out, rank, experts, x.dtype), n_tokens,
               lambda meta: (n_tokens, cdiv(d_out, meta["BLOCK_N"])),
               x, res, router, A, B, out, d_in, d_out, rank, experts, top_k, scale,
               x.stride(0), x.stride(1), res.stride(0), res.stride(1),
               BLOCK_E=next_power_of_2(experts), BLOCK_R=next_power_of_2(rank))
    return out


def _stacked(x: torch.Tensor, res: torch.Tensor, router: torch.Tensor, A: torch.Tensor,
             B: torch.Tensor, scale: float, top_k: int) -> torch.Tensor:
    """out [T, out] in x's dtype from the stacked shrink and expand, two launches."""
    (experts, rank, d_in), (n_tokens, d_out) = A.shape, res.shape
    out = torch.empty((n_tokens, d_out), dtype=x.dtype, device=x.device)
    if n_tokens == 0:
        return out
    hg = torch.empty((n_tokens, experts * rank), dtype=x.dtype, device=x.device)
    columns = dot_block(experts * rank)
    launch(_stacked_shrink_kernel, (d_in, experts, rank, x.dtype), n_tokens,
           lambda meta: (cdiv(n_tokens, meta["BLOCK_T"]),),
           x, router, A, hg, n_tokens, d_in, experts, rank, top_k, scale,
           x.stride(0), x.stride(1), DOT_PRECISION=dot_precision(), UPCAST_DOT=upcast_dot(x),
           BLOCK_E=dot_block(experts), BLOCK_C=columns)
    launch(_stacked_expand_kernel, (d_out, experts, rank, x.dtype), n_tokens,
           lambda meta: (cdiv(n_tokens, meta["BLOCK_T"]),
                         cdiv(d_out, meta["BLOCK_N"])),
           hg, B, res, out, n_tokens, d_out, experts, rank, res.stride(0), res.stride(1),
           DOT_PRECISION=dot_precision(), UPCAST_DOT=upcast_dot(x), BLOCK_C=columns,
           BLOCK_J=stacked_step(columns, x.dtype))
    return out


def stacked_step(columns: int, dtype: torch.dtype) -> int:
    """Columns of E·r per `tl.dot` in the stacked expand: all of them in half precision
    (tensor cores), 16 in float32, whose IEEE dot runs on FMA units and holds both operand
    tiles in registers (one K = 64 dot spilled in 7 of 8 configs on sm_90)."""
    return min(columns, 16) if dtype == torch.float32 else columns


def _shrink(x: torch.Tensor, A: torch.Tensor, order: torch.Tensor, counts: torch.Tensor,
            top_k: int) -> torch.Tensor:
    """h [T·k, r] in x's dtype: row i is A_e·x[order[i] // k] for the segment e holding it."""
    (experts, rank, d_in), n_tokens = A.shape, x.shape[0]
    h = torch.empty((order.shape[0], rank), dtype=x.dtype, device=x.device)
    launch(_shrink_kernel, (d_in, rank, x.dtype), n_tokens,
           lambda meta: (cdiv(n_tokens, meta["BLOCK_T"]), experts),
           x, A, order, counts, h, d_in, rank, experts, top_k, x.stride(0), x.stride(1),
           DOT_PRECISION=dot_precision(), UPCAST_DOT=upcast_dot(x), BLOCK_R=dot_block(rank),
           BLOCK_E=dot_block(experts))
    return h


def _expand(h: torch.Tensor, B: torch.Tensor, order: torch.Tensor, counts: torch.Tensor,
            gates: torch.Tensor, res: torch.Tensor, out: torch.Tensor, scale: float,
            top_k: int) -> None:
    """out[t] += scale·g[t, e]·B_e·h[i] for t = order[i] // k, in float32 (top_k = 1:
    out[t] = res[t] + that, in out's dtype)."""
    (experts, d_out, rank), n_tokens = B.shape, out.shape[0]
    launch(_expand_kernel, (d_out, rank, h.dtype, top_k == 1), n_tokens,
           lambda meta: (cdiv(n_tokens, meta["BLOCK_T"]),
                         cdiv(d_out, meta["BLOCK_N"]), experts),
           h, B, order, counts, gates, res, out, d_out, rank, experts, top_k, scale,
           res.stride(0), res.stride(1), DOT_PRECISION=dot_precision(),
           UPCAST_DOT=upcast_dot(h), ACCUMULATE=top_k > 1, BLOCK_R=dot_block(rank),
           BLOCK_E=dot_block(experts))


# --------------------------------------------------------------------------- the op

def mixture_lora(x: torch.Tensor, residual: torch.Tensor, router: torch.Tensor, A: torch.Tensor,
                 B: torch.Tensor, scale: float, top_k: int) -> torch.Tensor:
    """residual + scale·Σ_e g_e·B_e·A_e·x, by kernels or reference (`use_triton`)."""
    if use_triton(x):
        return mixture_lora_triton(x, residual, router, A, B, scale, top_k)
    check_mixture_inputs(x, residual, router, A, B, top_k)
    return mixture_lora_reference(x, residual, router, A, B, scale, top_k)


def _mixture_lora_fake(x: torch.Tensor, residual: torch.Tensor, router: torch.Tensor,
                       A: torch.Tensor, B: torch.Tensor, scale: float, top_k: int) -> torch.Tensor:
    return residual.new_empty(residual.shape, dtype=x.dtype)


define_op(mixture_lora, _mixture_lora_fake)
