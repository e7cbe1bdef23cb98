"""Fused Triton kernels for adapter inference, one op per file, registered as torch custom ops.

Importing this package registers:

    torch.ops.adaptc.bottleneck_adapter   residual + s·g·(U·act(D·x + b_D) + b_U)    (bottleneck.py)
    torch.ops.adaptc.mixture_lora         residual + s·Σ_e g_e(x)·B_e·A_e·x          (moe_lora.py)
    torch.ops.adaptc.mixture_vectors      values ⊙ Σ_e g_e(x)·l_e                    (moe_vectors.py)

Each op runs its Triton kernels when `use_triton` says so and its pure-PyTorch reference
otherwise; its fake (`define_op`) gives torch.export / torch.compile the output shape without
running either. `precompile` (not imported here) compiles the kernels for a GPU architecture on a
machine without one and reports their registers, spills and shared memory. The helpers below
(and the `dot` the kernels call) are shared by the op modules, which are imported last for
that reason.
"""
import functools
from collections.abc import Callable

import torch
import triton
import triton.language as tl


def interpreting() -> bool:
    """True when triton's interpreter runs kernels on the CPU (TRITON_INTERPRET=1).

    Triton reads the variable when it decorates a function: its own `triton.language` helpers
    when triton is first imported, our kernels (and `dot`) when this package is. It must be set
    before both for the kernels to run interpreted.
    """
    return bool(triton.knobs.runtime.interpret)


def use_triton(t: torch.Tensor) -> bool:
    """Whether an op on `t` runs its Triton kernels (True) or its PyTorch reference (False).

    Kernels run on CUDA tensors, and on any tensor under the interpreter (bfloat16 ones through
    `upcast_dot`).
    """
    return t.is_cuda or interpreting()


def upcast_dot(t: torch.Tensor) -> bool:
    """The kernels' UPCAST_DOT flag for operands of `t`'s dtype: bfloat16 under the interpreter.

    triton 3.9's interpreter multiplies bfloat16 blocks in `tl.dot` as their raw uint16 storage
    (garbage; so does its bf16 elementwise arithmetic, which the kernels never do), while its bf16
    loads, stores and bf16→fp32 casts are exact. So under this flag `dot` casts the loaded tiles
    to float32 and takes an "ieee" fp32 dot. That is the GPU's computation up to the order (and,
    inside tensor cores, the rounding) of the fp32 additions: bf16→fp32 is exact, a product of
    two bf16 values (8-bit significands) is exact in fp32's 24 bits, and both sum those products
    into the fp32 accumulator. On a GPU the flag is False and the compiled kernels are unchanged.
    One difference remains outside the dot: the interpreter rounds fp32→bf16 `.to` toward zero
    where the GPU rounds to nearest even, so interpreted bf16 results can sit one bf16 ulp from
    the GPU's.
    """
    return interpreting() and t.dtype == torch.bfloat16


def dot_precision() -> str:
    """`tl.dot` input precision for float32 blocks, following torch's matmul precision setting.

    torch multiplies float32 matrices in full precision unless told otherwise
    (`torch.set_float32_matmul_precision`), so the kernels do too ("ieee"); fp16/bf16 blocks
    ignore it.
    """
    return "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"


@triton.jit
def dot(a, b, acc, DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr):
    """`tl.dot(a, b, acc)`; under UPCAST_DOT of a and b cast to float32 (see `upcast_dot`)."""
    if UPCAST_DOT:
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
    return acc


def cdiv(a: int, b: int) -> int:
    """⌈a / b⌉ for grids. triton 3.9's `triton.cdiv` and `triton.next_power_of_2` are
    ConstexprFunctions whose host-side call costs microseconds each; the ops call these
    plain ones at every launch."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two ≥ n (1 for n ≤ 1)."""
    return 1 << max(n - 1, 0).bit_length()


@functools.cache
def multiprocessors(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (cached: the query is a driver call)."""
    return torch.cuda.get_device_properties(device).multi_processor_count


def column_splits(token_blocks: int, column_blocks: int, device: torch.device,
                  per_multiprocessor: int = 2) -> int:
    """Programs per token block for kernels whose programs can share a token block's output
    columns (each redoing the block's per-token work): enough for the grid to reach
    `per_multiprocessor` programs per multiprocessor (one in all on the CPU), at most one per
    column block, and one once the token blocks alone fill that, where redoing the work would
    only re-read x and the weights."""
    programs = per_multiprocessor * multiprocessors(device) if device.type == "cuda" else 1
    return max(1, min(column_blocks, programs // max(token_blocks, 1)))


def dot_block(n: int) -> int:
    """Block width covering `n` columns of a `tl.dot` operand: a power of two, at least 16."""
    return max(16, next_power_of_2(n))


CHOSEN: dict[tuple, dict] = {}  # (autotuned kernel, problem key) → its config's launch kwargs


def launch(kernel: triton.runtime.Autotuner, key: tuple, tokens: int, grid, *args,
           **kwargs) -> None:
    """`kernel[grid](*args, **kwargs)`, with a config chosen per problem and token bucket.

    `key` holds the shapes the kernel's autotune key names and x's dtype (which fixes the
    other tensors' dtypes: the ops check them); `tokens` the rows the launch covers. The
    autotuner's own key leaves the token count out, so on its own it would keep the tile it
    chose at the first call (one decoding token, say) for every later size: on an H200 that
    put the bottleneck kernel at 28% of copy bandwidth at 4096 tokens. So each new (key,
    token bucket) clears the autotuner's cache and tunes anew; later calls launch the kernel's
    JIT function with the recorded config directly, skipping `Autotuner.run`, which rebuilds
    dicts of every argument at each call (~5.5 µs of this machine's CPU, 40% of the
    bottleneck op's host time before triton's own launch). Any config computes the right
    result at any shape (the kernels mask their tiles): the choice only decides speed.
    """
    key = (*key, token_bucket(tokens))
    config = CHOSEN.get((kernel, key))
    if config is None:
        kernel.cache.clear()
        kernel[grid](*args, **kwargs)  # autotunes for this call's shapes
        CHOSEN[(kernel, key)] = kernel.best_config.all_kwargs()
    else:
        kernel.fn[grid](*args, **kwargs, **config)


def token_bucket(tokens: int) -> int:
    """The power of two at or above `tokens`, at most 2**14: 15 sizes tuned per problem."""
    return min(next_power_of_2(tokens), 1 << 14)


def check_tensor(op: str, name: str, t: torch.Tensor, x: torch.Tensor,
                 shape: tuple[int, ...]) -> None:
    """Raise TypeError/ValueError naming `name` unless `t` has x's dtype and device and `shape`."""
    if t.dtype != x.dtype:
        raise TypeError(f"{op}: `{name}` has dtype {t.dtype}, expected {x.dtype} (that of `x`)")
    if t.device != x.device:
        raise ValueError(f"{op}: `{name}` is on {t.device}, expected {x.device} (that of `x`)")
    if tuple(t.shape) != shape:
        raise ValueError(f"{op}: `{name}` has shape {tuple(t.shape)}, expected {shape}")


def check_input(op: str, x: torch.Tensor) -> None:
    """Raise unless `x` is a floating-point tensor with a feature dimension."""
    if not x.is_floating_point():
        raise TypeError(f"{op}: `x` must be a floating-point tensor, got {x.dtype}")
    if x.dim() < 1:
        raise ValueError(f"{op}: `x` must have shape [..., d_in], got a 0-d tensor")


LIBRARY = torch.library.Library("adaptc", "DEF")


def define_op(kernel: Callable[..., torch.Tensor], fake: Callable[..., torch.Tensor]) -> None:
    """Register `kernel` as `torch.ops.adaptc.<its name>` on every device (its schema from its
    type hints) and `fake` as what torch.export / torch.compile trace instead.

    Through a `torch.library.Library` rather than `torch.library.custom_op`: the ops serve
    inference only, and custom_op wraps each call in an autograd function and a dynamo guard,
    about 4 µs more host time per call (6.4 µs of dispatch against 2.2 µs on this machine's
    CPU), paid at every adapter site of every forward. Without an autograd kernel, a backward
    through the ops is an error.
    """
    name = kernel.__name__
    LIBRARY.define(name + torch.library.infer_schema(kernel, mutates_args=()))
    LIBRARY.impl(name, kernel, "CompositeExplicitAutograd")
    torch.library.register_fake(f"adaptc::{name}", fake, lib=LIBRARY)


# Imported last: the op modules import the helpers above; importing them registers the ops.
from adaptc.backends.triton import bottleneck, moe_lora, moe_vectors  # noqa: E402

__all__ = ["CHOSEN", "LIBRARY", "bottleneck", "check_input", "check_tensor", "define_op", "dot",
           "dot_block", "dot_precision", "interpreting", "launch", "moe_lora", "moe_vectors",
           "upcast_dot", "use_triton"]
