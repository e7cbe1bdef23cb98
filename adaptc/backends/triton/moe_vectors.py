"""MoV for inference: a routed mix of (IA)³ vectors scaling a tensor, in one kernel.

    g = softmax over the top_k logits of W_g·x (float32), zero elsewhere  (top_k = E: soft routing)
    y = values ⊙ Σ_e g_e·l_e

    values [..., n] (a site's output, or with `feedforward` its input: then x is values),
    x [..., in] the router's input, W_g `router` [E, in], l `vectors` [E, n]; y has values'
    shape and dtype. Limit: E ≤ MAX_EXPERTS.

Eager math: `adaptc.methods.mixture.MixtureOfVectors.forward`.

The eager module takes a router GEMM, a top-k, a scatter, a softmax, a [T, E]·[E, n] GEMM and
an elementwise product, each a launch with its intermediate in memory. The kernel's grid is
(token blocks, column splits): each program routes its BLOCK_T tokens (logits as a `tl.dot`
over d_in in float32, top-k by repeated argmax, softmax over the chosen) and then walks its
share of the n columns BLOCK_N at a time: mix = g·l_block in float32, out = values ⊙ mix,
rounded once to values' dtype. Splitting the columns over programs gives few tokens (decoding)
enough programs to fill the GPU; each split redoes its tokens' routing, reading x and the
router again from L2, so the launcher splits only until the grid covers the device
(`column_splits`). No atomics, no float32 buffer: the result does not vary run to run.
"""
import torch
import triton
import triton.language as tl

from adaptc.backends.triton import (cdiv, check_input, check_tensor, column_splits, define_op,
                                    dot_block, dot_precision, interpreting, launch, upcast_dot,
                                    use_triton)
from adaptc.backends.triton.moe_lora import (MAX_EXPERTS, route_reference, router_logits,
                                             top_k_gates)

_OP = "mixture_vectors"


def _configs() -> list[triton.Config]:
    """Tiles: tokens per program, d_in step of the router, columns per step."""
    if interpreting():
        return [triton.Config({"BLOCK_T": 16, "BLOCK_K": 32, "BLOCK_N": 32})]
    tiles = [(16, 128, 128, 4), (16, 128, 128, 8), (32, 64, 128, 4), (32, 64, 128, 8),
             (32, 128, 256, 8), (64, 64, 128, 8)]  # not the last two with 4 warps: they spill on sm_90
    return [triton.Config({"BLOCK_T": t, "BLOCK_K": k, "BLOCK_N": n}, num_warps=w)
            for t, k, n, w in tiles]


@triton.autotune(configs=_configs(), key=["D_IN", "N", "E"])
@triton.jit
def _mixture_vectors_kernel(
    values_ptr, x_ptr, router_ptr, vectors_ptr, out_ptr,
    T, D_IN, N, E, top_k,
    stride_vt, stride_vn, stride_xt, stride_xk,
    DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr, BLOCK_E: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """out[t, cols] = values[t, cols] ⊙ (g(x[t]) · vectors[:, cols]) for this program's tokens
    and every column block j ≡ program_id(1) (mod num_programs(1))."""
    # ---- this program's tokens and their logits
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    row_mask = rows < T
    ex = tl.arange(0, BLOCK_E)
    ex_mask = ex < E
    logits = router_logits(x_ptr, router_ptr, rows, row_mask, ex, ex_mask, D_IN, stride_xt,
                           stride_xk, DOT_PRECISION, UPCAST_DOT, BLOCK_T, BLOCK_E, BLOCK_K)

    # ---- top-k by repeated argmax, then the softmax over the chosen, shifted by the best
    gates = top_k_gates(logits, ex, ex_mask, top_k)

    # ---- this program's column blocks: mix = g · l in float32, out = values ⊙ mix
    for n0 in range(tl.program_id(1) * BLOCK_N, N, tl.num_programs(1) * BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_mask = cols < N
        vectors = tl.load(vectors_ptr + ex[:, None] * N + cols[None, :],
                          mask=ex_mask[:, None] & col_mask[None, :], other=0.0).to(tl.float32)
        mix = tl.dot(gates, vectors, input_precision="ieee")
        mask = row_mask[:, None] & col_mask[None, :]
        values = tl.load(values_ptr + rows[:, None] * stride_vt + cols[None, :] * stride_vn,
                         mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + rows[:, None] * N + cols[None, :],
                 (values * mix).to(out_ptr.dtype.element_ty), mask=mask)


def mixture_vectors_reference(values: torch.Tensor, x: torch.Tensor, router: torch.Tensor,
                              vectors: torch.Tensor, top_k: int) -> torch.Tensor:
    """The op in plain PyTorch, float32 throughout (float64 for float64 inputs), cast to
    values' dtype at the end."""
    gates = route_reference(x, router, top_k)
    mix = gates @ vectors.to(gates.dtype)
    return (values.to(gates.dtype) * mix).to(values.dtype)


def check_vectors_inputs(values: torch.Tensor, x: torch.Tensor, router: torch.Tensor,
                         vectors: torch.Tensor, top_k: int) -> None:
    """Raise ValueError/TypeError naming the first argument that is off."""
    check_input(_OP, x)
    if vectors.dim() != 2:
        raise ValueError(f"{_OP}: `vectors` must be 2-d [experts, n], "
                         f"got shape {tuple(vectors.shape)}")
    experts, n = vectors.shape
    if not 1 <= experts <= MAX_EXPERTS:
        raise ValueError(f"{_OP}: `vectors` holds {experts} experts; "
                         f"the kernel supports 1..{MAX_EXPERTS}")
    if not 1 <= top_k <= experts:
        raise ValueError(f"{_OP}: top_k={top_k} must be between 1 and "
                         f"the number of experts ({experts})")
    check_tensor(_OP, "router", router, x, (experts, x.shape[-1]))
    check_tensor(_OP, "vectors", vectors, x, (experts, n))
    check_tensor(_OP, "values", values, x, (*x.shape[:-1], n))


def mixture_vectors_triton(values: torch.Tensor, x: torch.Tensor, router: torch.Tensor,
                           vectors: torch.Tensor, top_k: int,
                           splits: int | None = None) -> torch.Tensor:
    """Check the inputs and run the kernel; `splits` fixes the column splits (None:
    `column_splits`)."""
    check_vectors_inputs(values, x, router, vectors, top_k)
    (experts, n), d_in = vectors.shape, x.shape[-1]
    x2, values2 = x.reshape(-1, d_in), values.reshape(-1, n)
    tokens = x2.shape[0]
    out = torch.empty((tokens, n), dtype=values.dtype, device=values.device)
    if tokens == 0 or n == 0:
        return out.reshape(values.shape)

    def grid(meta):
        blocks = cdiv(tokens, meta["BLOCK_T"])
        return blocks, splits or column_splits(blocks, cdiv(n, meta["BLOCK_N"]), x.device)

    launch(_mixture_vectors_kernel, (d_in, n, experts, x.dtype), tokens, grid,
           values2, x2, router.contiguous(), vectors.contiguous(), out, tokens, d_in, n, experts,
           top_k, values2.stride(0), values2.stride(1), x2.stride(0), x2.stride(1),
           DOT_PRECISION=dot_precision(), UPCAST_DOT=upcast_dot(x), BLOCK_E=dot_block(experts))
    return out.reshape(values.shape)


def mixture_vectors(values: torch.Tensor, x: torch.Tensor, router: torch.Tensor,
                    vectors: torch.Tensor, top_k: int) -> torch.Tensor:
    """values ⊙ Σ_e g_e(x)·vectors_e, by kernel or reference (`use_triton`)."""
    if use_triton(x):
        return mixture_vectors_triton(values, x, router, vectors, top_k)
    check_vectors_inputs(values, x, router, vectors, top_k)
    return mixture_vectors_reference(values, x, router, vectors, top_k)


def _mixture_vectors_fake(values: torch.Tensor, x: torch.Tensor, router: torch.Tensor,
                          vectors: torch.Tensor, top_k: int) -> torch.Tensor:
    return torch.empty_like(values)


define_op(mixture_vectors, _mixture_vectors_fake)
