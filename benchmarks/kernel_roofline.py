"""Provider sweep for adaptc's fused Triton ops over the number of tokens.

    python benchmarks/kernel_roofline.py [--tokens 16 256 4096] [--hidden 4096] [--dtype float16]

Providers, side by side for each op and token count (milliseconds):
    triton    the op's kernels (adaptc/backends/triton), on a GPU only
    stacked   mixture_lora only, on a GPU, each path forced at every token count (the op
    grouped   chooses per-token up to PER_TOKEN_MAX_TOKENS tokens, then stacked while E·r ≤
    per-token STACKED_MAX_COLUMNS, else grouped): where the paths cross is where those
              bounds belong
    torch     the op's pure-PyTorch reference
    compile   torch.compile(reference)

On a GPU times are medians of CUDA-graph replays (do_bench_cudagraph): the device's time per
call, without the host's launch cost, which host_overhead.py measures (plain do_bench timed
the host: a fast kernel waited on its launches). On the CPU the best of a time.perf_counter
loop (robust to other processes sharing the cores), and the triton provider is skipped with a
note (the interpreter is a debugger, not a benchmark).

Roofline: the run first measures the device's ceilings in the op dtype, copy bandwidth
(`y.copy_(x)`, bytes read + written) and matmul rate (`torch.mm` on square matrices), then
gives each row's achieved rate for the fastest kernel provider (triton on a GPU, else torch):
effective bandwidth = the bytes the op must move at least (x, residual, weights read once,
output written) / time, and FLOP rate = its multiply-adds × 2 / time, each also as a share of
the ceiling. Prints the tables and writes nothing: copy them into benchmarks/RESULTS.md with
the date, device and versions printed above them.
"""
import argparse
import functools
from collections.abc import Callable

import torch
import triton
from timing import seconds

from adaptc.backends.triton.bottleneck import (bottleneck_adapter_reference,
                                               bottleneck_adapter_triton)
from adaptc.backends.triton.moe_lora import mixture_lora_reference, mixture_lora_triton
from adaptc.backends.triton.moe_vectors import (mixture_vectors_reference,
                                                mixture_vectors_triton)

MIXTURE_PATHS = ("stacked", "grouped", "per-token")
PROVIDERS = ("triton", *MIXTURE_PATHS, "torch", "compile")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", help="token counts to sweep")
    parser.add_argument("--hidden", type=int, default=4096, help="d_in = d_out of the site")
    parser.add_argument("--bottleneck", type=int, default=64)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--dtype", choices=("float32", "float16", "bfloat16"),
                        help="default: float16 on a GPU, float32 on the CPU")
    return parser.parse_args()


def bottleneck_inputs(tokens: int, args: argparse.Namespace, **factory) -> tuple:
    """(x, residual, down, down_bias, up, up_bias, activation, skip) for one site after a
    sublayer, the residual stream folded in as infer graphs run it (`fold_stream_adds`)."""
    d, b = args.hidden, args.bottleneck
    return (torch.randn(tokens, d, **factory), torch.randn(tokens, d, **factory),
            torch.randn(b, d, **factory) / d**0.5, torch.randn(b, **factory),
            torch.randn(d, b, **factory) / b**0.5, torch.randn(d, **factory), "gelu",
            torch.randn(tokens, d, **factory))


def mixture_inputs(tokens: int, args: argparse.Namespace, **factory) -> tuple:
    """(x, residual, router, A, B, scale, top_k) for one site."""
    d, e, r = args.hidden, args.experts, args.rank
    return (torch.randn(tokens, d, **factory), torch.randn(tokens, d, **factory),
            torch.randn(e, d, **factory) / d**0.5, torch.randn(e, r, d, **factory) / d**0.5,
            torch.randn(e, d, r, **factory) / r**0.5, 2.0, args.top_k)


def vectors_inputs(tokens: int, args: argparse.Namespace, **factory) -> tuple:
    """(values, x, router, vectors, top_k) for one MoV site scaling its output."""
    d, e = args.hidden, args.experts
    return (torch.randn(tokens, d, **factory), torch.randn(tokens, d, **factory),
            torch.randn(e, d, **factory) / d**0.5, 1 + torch.randn(e, d, **factory) / 10,
            args.top_k)


def bottleneck_cost(tokens: int, args: argparse.Namespace, itemsize: int) -> tuple[int, int]:
    """(bytes, flops): x, residual and stream read, output written, weights read once."""
    d, b = args.hidden, args.bottleneck
    moved = tokens * 4 * d + 2 * b * d + b + d
    return moved * itemsize, 4 * tokens * d * b


def mixture_cost(tokens: int, args: argparse.Namespace, itemsize: int) -> tuple[int, int]:
    """(bytes, flops): as above, the router, and A and B of the experts some token chose
    (all of them once tokens·k ≥ experts)."""
    d, e, r, k = args.hidden, args.experts, args.rank, args.top_k
    moved = tokens * 3 * d + e * d + 2 * min(e, tokens * k) * r * d
    return moved * itemsize, 2 * tokens * d * e + 4 * tokens * k * r * d


def vectors_cost(tokens: int, args: argparse.Namespace, itemsize: int) -> tuple[int, int]:
    """(bytes, flops): values and x read, output written, router and vectors read once."""
    d, e = args.hidden, args.experts
    return (tokens * 3 * d + 2 * e * d) * itemsize, 4 * tokens * d * e + tokens * d


def ceilings(factory: dict, on_gpu: bool) -> tuple[float, float]:
    """Measured (bytes/s of a device copy, flop/s of torch.mm) in the benchmark's dtype."""
    numel, n = (1 << 28, 8192) if on_gpu else (1 << 24, 1024)
    src, dst = torch.empty(numel, **factory), torch.empty(numel, **factory)
    copy_s = seconds(lambda: dst.copy_(src), on_gpu)
    a, b = torch.randn(n, n, **factory), torch.randn(n, n, **factory)
    mm_s = seconds(lambda: torch.mm(a, b), on_gpu)
    return 2 * numel * src.element_size() / copy_s, 2 * n**3 / mm_s


def sweep(name: str, make: Callable, kernels: Callable, paths: dict[str, Callable],
          reference: Callable, args: argparse.Namespace, factory: dict,
          on_gpu: bool) -> list[tuple]:
    """One row (op, tokens, ms per provider; None when skipped) per token count. `paths`:
    the op's kernel paths forced ("grouped", "per-token"), if it has a choice."""
    providers = {"triton": kernels if on_gpu else None,
                 **{path: paths.get(path) if on_gpu else None for path in MIXTURE_PATHS},
                 "torch": reference, "compile": torch.compile(reference)}
    rows = []
    for tokens in args.tokens:
        inputs = make(tokens, args, **factory)
        times = [None if fn is None
                 else seconds(lambda fn=fn: fn(*inputs), on_gpu, graph=True) * 1e3
                 for fn in providers.values()]
        rows.append((name, tokens, *times))
    return rows


def print_table(rows: list[tuple]) -> None:
    print(f"{'op':<20}{'tokens':>8}" + "".join(f"{p:>10}" for p in PROVIDERS) + "   (ms)")
    for name, tokens, *times in rows:
        cells = "".join(f"{'-':>10}" if t is None else f"{t:>10.4f}" for t in times)
        print(f"{name:<20}{tokens:>8}{cells}")


COSTS = {"bottleneck_adapter": bottleneck_cost, "mixture_lora": mixture_cost,
         "mixture_vectors": vectors_cost}


def print_roofline(rows: list[tuple], args: argparse.Namespace, itemsize: int,
                   bandwidth: float, flop_rate: float) -> None:
    """Achieved rates of the kernel provider (triton, else torch) against the ceilings."""
    print(f"ceilings: copy {bandwidth / 1e9:.1f} GB/s, mm {flop_rate / 1e12:.2f} TFLOP/s")
    print(f"{'op':<20}{'tokens':>8}{'provider':>10}{'GB/s':>10}{'% copy':>8}"
          f"{'TFLOP/s':>10}{'% mm':>8}")
    for name, tokens, triton_ms, *_, torch_ms, _ in rows:
        provider, ms = ("triton", triton_ms) if triton_ms is not None else ("torch", torch_ms)
        moved, flops = COSTS[name](tokens, args, itemsize)
        rate, compute = moved / (ms / 1e3), flops / (ms / 1e3)
        print(f"{name:<20}{tokens:>8}{provider:>10}{rate / 1e9:>10.1f}"
              f"{100 * rate / bandwidth:>8.1f}{compute / 1e12:>10.3f}"
              f"{100 * compute / flop_rate:>8.1f}")


def main() -> None:
    args = parse_args()
    on_gpu = torch.cuda.is_available()
    device = torch.accelerator.current_accelerator() if on_gpu else torch.device("cpu")
    dtype = getattr(torch, args.dtype or ("float16" if on_gpu else "float32"))
    args.tokens = args.tokens or ([1, 16, 64, 256, 1024, 4096, 16384] if on_gpu
                                  else [16, 64, 256])
    name = torch.cuda.get_device_name(device) if on_gpu else "cpu"
    print(f"device {name}, torch {torch.__version__}, triton {triton.__version__}, {dtype}, "
          f"hidden {args.hidden}, bottleneck {args.bottleneck}, experts {args.experts}, "
          f"rank {args.rank}, top_k {args.top_k}")
    if not on_gpu:
        print("note: no CUDA device, so the triton provider is skipped ('-')")
    factory = {"device": device, "dtype": dtype}
    with torch.inference_mode():
        bandwidth, flop_rate = ceilings(factory, on_gpu)
        rows = sweep("bottleneck_adapter", bottleneck_inputs, bottleneck_adapter_triton, {},
                     bottleneck_adapter_reference, args, factory, on_gpu)
        rows += sweep("mixture_lora", mixture_inputs, mixture_lora_triton,
                      {path: functools.partial(mixture_lora_triton, path=path)
                       for path in ("stacked", "grouped", "per-token")},
                      mixture_lora_reference, args, factory, on_gpu)
        rows += sweep("mixture_vectors", vectors_inputs, mixture_vectors_triton, {},
                      mixture_vectors_reference, args, factory, on_gpu)
    print_table(rows)
    print_roofline(rows, args, dtype.itemsize, bandwidth, flop_rate)


if __name__ == "__main__":
    main()
