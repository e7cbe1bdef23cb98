"""Compile the kernels' autotune configs for a GPU architecture on a machine without a GPU.

The CPU tests run the kernels under triton's interpreter, which checks what they compute but
not what the compiler checks: `tl.dot` layouts, registers, spills, shared memory. Triton
compiles to a cubin with no driver present (its own `triton.tools.compile` does), so this module
builds each kernel as its launcher would for a given problem — the same argument types and the
same specialisations (an int equal to 1 becomes a constant; pointers and ints divisible by 16
carry a divisibility hint) — for every config its autotuner would try, and reads ptxas's report.

Run it where triton is not interpreted (TRITON_INTERPRET unset when triton is first imported):

    python -m adaptc.backends.triton.precompile --arch 90 --dtype bfloat16
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import re
import sys
from dataclasses import asdict, dataclass

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.errors import TritonError

from adaptc.backends.triton import (bottleneck, dot_block, dot_precision, interpreting, moe_lora,
                                    moe_vectors, next_power_of_2)
from adaptc.errors import first_line

# Shared memory one block may use (opt-in maximum, bytes), by compute capability (CUDA
# programming guide, "Technical Specifications per Compute Capability").
SHARED_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}
TRITON_DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


@dataclass(frozen=True)
class Launch:
    """One kernel launch as its launcher makes it.

    `args` maps each runtime argument to a pointer type ("*bf16"), an int or float value (the
    value decides the specialisation), or None (a constant, like an absent residual);
    `constexprs` holds the launcher's constexpr arguments; autotune configs add the rest.
    `has_dot`: the kernel multiplies tiles with `tl.dot` (the per-token kernel does not).
    """
    name: str
    kernel: triton.runtime.Autotuner
    args: dict[str, str | int | float | None]
    constexprs: dict[str, object]
    has_dot: bool = True


@dataclass(frozen=True)
class Compiled:
    """ptxas's report for one launch under one config; `error` set when it did not compile.

    `dot_unit` is what the PTX multiplies `tl.dot` tiles with: "wgmma" (Hopper's warpgroup
    tensor-core MMA), "mma" (mma.sync, the tensor cores since Ampere) or "fma" (no tensor cores);
    "none" for a kernel without `tl.dot`.
    """
    launch: str
    config: str
    dot_unit: str = ""
    registers: int = 0
    spill_stores: int = 0
    spill_loads: int = 0
    shared: int = 0
    error: str | None = None

    def problems(self, arch: int) -> list[str]:
        """What would keep this config from running well on `arch`: errors, spills, overflow."""
        if self.error:
            return [self.error]
        found = []
        if self.spill_stores or self.spill_loads:
            found.append(f"spills {self.spill_stores} B stored / {self.spill_loads} B loaded")
        if self.shared > SHARED_LIMIT[arch]:
            found.append(f"needs {self.shared} B shared memory, sm_{arch} allows "
                         f"{SHARED_LIMIT[arch]} B")
        return found


def llama_launches(dtype: torch.dtype, tokens: int = 4096, hidden: int = 2048,
                   bottleneck_width: int = 64, wide: int = 256,
                   experts: int = 8, rank: int = 8, top_k: int = 2) -> list[Launch]:
    """Every kernel launch of the benchmark's workloads (Llama-shaped 1.1B, 8×512 tokens, and
    the per-token mixture kernel that decoding takes).

    Bottleneck adapters on the hidden state (the fused kernel, and the two-launch path for a
    bottleneck wider than MAX_FUSED_BOTTLENECK); a mixture of LoRA experts on a projection of
    the hidden state (q's and v's widths, 2048 and 256, specialise alike: one compile); MoV
    vectors scaling such a projection's output.
    """
    ptr = f"*{TRITON_DTYPES[dtype]}"
    opts = {"DOT_PRECISION": dot_precision(), "UPCAST_DOT": False}  # as compiled on a GPU
    rows = {"stride_xt": hidden, "stride_xk": 1}
    launches = [
        Launch("bottleneck_fused", bottleneck._bottleneck_fused_kernel,
               {**dict.fromkeys(("x_ptr", "res_ptr", "skip_ptr", "down_ptr", "down_bias_ptr",
                                 "up_ptr", "up_bias_ptr", "out_ptr"), ptr),
                "gate_ptr": "*fp32", "T": tokens, "D_IN": hidden, "D_OUT": hidden,
                "BOTTLENECK": bottleneck_width, "scale": 4.0, **rows,
                "stride_rt": hidden, "stride_rn": 1, "stride_st": hidden, "stride_sn": 1},
               {"ACTIVATION": "relu", "HAS_SKIP": True, "HAS_GATE": True, **opts,
                "BLOCK_B": dot_block(bottleneck_width)}),  # every epilogue term: the largest
    ]
    for name, (n, k), res, act in (("bottleneck_down", (wide, hidden), None, "relu"),
                                  ("bottleneck_up", (hidden, wide), ptr, "identity")):
        launches.append(Launch(name, bottleneck._linear_kernel, {
            "a_ptr": ptr, "w_ptr": ptr, "bias_ptr": ptr, "gate_ptr": "*fp32" if res else None,
            "res_ptr": res, "skip_ptr": res, "out_ptr": ptr, "M": tokens, "N": n, "K": k,
            "scale": 4.0 if res else 1.0, "stride_am": k, "stride_ak": 1,
            **dict.fromkeys(("stride_rm", "stride_sm"), hidden if res else 0),
            **dict.fromkeys(("stride_rn", "stride_sn"), 1 if res else 0),
        }, {"ACTIVATION": act, "HAS_GATE": res is not None, "HAS_RESIDUAL": res is not None,
            "HAS_SKIP": res is not None, **opts}))
    launches.append(Launch("mixture_router", moe_lora._router_kernel, {
        "x_ptr": ptr, "router_ptr": ptr, "gates_ptr": "*fp32", "experts_ptr": "*i32",
        "counts_ptr": "*i32", "T": tokens, "D_IN": hidden, "E": experts, "top_k": top_k, **rows,
    }, {**opts, "BLOCK_E": dot_block(experts)}))
    launches.append(Launch("mixture_shrink", moe_lora._shrink_kernel, {
        "x_ptr": ptr, "a_ptr": ptr, "order_ptr": "*i64", "counts_ptr": "*i32", "h_ptr": ptr,
        "D_IN": hidden, "R": rank, "E": experts, "top_k": top_k, **rows,
    }, {**opts, "BLOCK_R": dot_block(rank), "BLOCK_E": dot_block(experts)}))
    for name, k, out in (("mixture_expand", top_k, "*fp32"), ("mixture_expand_top1", 1, ptr)):
        launches.append(Launch(name, moe_lora._expand_kernel, {
            "h_ptr": ptr, "b_ptr": ptr, "order_ptr": "*i64", "counts_ptr": "*i32",
            "gates_ptr": "*fp32", "res_ptr": ptr, "out_ptr": out, "D_OUT": hidden, "R": rank,
            "E": experts, "top_k": k, "scale": 2.0, "stride_rt": hidden, "stride_rn": 1,
        }, {**opts, "ACCUMULATE": k > 1, "BLOCK_R": dot_block(rank),
            "BLOCK_E": dot_block(experts)}))
    launches.append(Launch("mixture_stacked_shrink", moe_lora._stacked_shrink_kernel, {
        "x_ptr": ptr, "router_ptr": ptr, "a_ptr": ptr, "hg_ptr": ptr, "T": tokens,
        "D_IN": hidden, "E": experts, "R": rank, "top_k": top_k, "scale": 2.0, **rows,
    }, {**opts, "BLOCK_E": dot_block(experts), "BLOCK_C": dot_block(experts * rank)}))
    launches.append(Launch("mixture_stacked_expand", moe_lora._stacked_expand_kernel, {
        "hg_ptr": ptr, "b_ptr": ptr, "res_ptr": ptr, "out_ptr": ptr, "T": tokens,
        "D_OUT": hidden, "E": experts, "R": rank, "stride_rt": hidden, "stride_rn": 1,
    }, {**opts, "BLOCK_C": dot_block(experts * rank),
        "BLOCK_J": moe_lora.stacked_step(dot_block(experts * rank), dtype)}))
    launches.append(Launch("mixture_per_token", moe_lora._per_token_kernel, {
        "x_ptr": ptr, "res_ptr": ptr, "router_ptr": ptr, "a_ptr": ptr, "b_ptr": ptr,
        "out_ptr": ptr, "D_IN": hidden, "D_OUT": hidden, "R": rank, "E": experts,
        "top_k": top_k, "scale": 2.0, **rows, "stride_rt": hidden, "stride_rn": 1,
    }, {"BLOCK_E": next_power_of_2(experts), "BLOCK_R": next_power_of_2(rank)},
        has_dot=False))
    launches.append(Launch("mixture_vectors", moe_vectors._mixture_vectors_kernel, {
        "values_ptr": ptr, "x_ptr": ptr, "router_ptr": ptr, "vectors_ptr": ptr, "out_ptr": ptr,
        "T": tokens, "D_IN": hidden, "N": hidden, "E": experts, "top_k": top_k,
        "stride_vt": hidden, "stride_vn": 1, **rows,
    }, {**opts, "BLOCK_E": dot_block(experts)}))
    return launches


def compile_launch(launch: Launch, config: triton.Config, arch: int) -> Compiled:
    """Compile `launch` under `config` for sm_`arch`; ptxas's registers, spills, shared memory."""
    fn = launch.kernel.fn
    signature, constexprs, attrs = {}, {**launch.constexprs, **config.kwargs}, {}
    for name in fn.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
            continue
        value = launch.args[name]
        if value is None or isinstance(value, int) and value == 1:  # constants, as triton's JIT
            signature[name], constexprs[name] = "constexpr", value
            continue
        signature[name] = value if isinstance(value, str) else (
            "fp32" if isinstance(value, float) else "i32")
        if isinstance(value, str) or isinstance(value, int) and value % 16 == 0:
            attrs[(fn.arg_names.index(name),)] = [["tt.divisibility", 16]]
    label = ", ".join([f"{k}={v}" for k, v in config.kwargs.items()]
                      + [f"warps={config.num_warps}", f"stages={config.num_stages}"])
    options = {"num_warps": config.num_warps, "num_stages": config.num_stages,
               "num_ctas": config.num_ctas}
    log = io.StringIO()
    try:
        with _ptxas_log(), contextlib.redirect_stdout(log):
            kernel = triton.compile(ASTSource(fn, signature, constexprs, attrs),
                                    target=GPUTarget("cuda", arch, 32), options=options)
    except (TritonError, RuntimeError) as error:  # frontend, MLIR pass or ptxas failure
        return Compiled(launch.name, label, error=f"{type(error).__name__}: {first_line(error)}")
    report, ptx = log.getvalue(), kernel.asm["ptx"]
    dot_unit = ("none" if not launch.has_dot else "wgmma" if "wgmma.mma_async" in ptx
                else "mma" if "mma.sync" in ptx else "fma")
    return Compiled(launch.name, label, dot_unit=dot_unit,
                    registers=_number(r"Used (\d+) registers", report),
                    spill_stores=_number(r"(\d+) bytes spill stores", report),
                    spill_loads=_number(r"(\d+) bytes spill loads", report),
                    shared=kernel.metadata.shared)


def compile_all(dtype: torch.dtype, arch: int) -> list[Compiled]:
    """Every config of every launch in `llama_launches(dtype)`, compiled for sm_`arch`."""
    if interpreting():
        raise RuntimeError("triton is interpreting (TRITON_INTERPRET=1): the kernels were "
                           "decorated for the interpreter and cannot be compiled; run this in "
                           "a process without it")
    return [compile_launch(launch, config, arch)
            for launch in llama_launches(dtype) for config in launch.kernel.configs]


@contextlib.contextmanager
def _ptxas_log():
    """Have triton run ptxas (no cache hits) and print its `-v` report while compiling.

    The knobs are triton's TRITON_ALWAYS_COMPILE and TRITON_DUMP_PTXAS_LOG.
    """
    knobs = triton.knobs
    previous = knobs.compilation.always_compile, knobs.nvidia.dump_ptxas_log
    knobs.compilation.always_compile, knobs.nvidia.dump_ptxas_log = True, True
    try:
        yield
    finally:
        knobs.compilation.always_compile, knobs.nvidia.dump_ptxas_log = previous


def _number(pattern: str, report: str) -> int:
    """The largest value `pattern` matches in ptxas's report (0 when it never appears)."""
    return max((int(m) for m in re.findall(pattern, report)), default=0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m adaptc.backends.triton.precompile",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, choices=sorted(SHARED_LIMIT),
                        help="compute capability, e.g. 90 for H100/H200, 80 for A100")
    parser.add_argument("--dtype", default="bfloat16",
                        choices=[str(d).removeprefix("torch.") for d in TRITON_DTYPES])
    parser.add_argument("--json", action="store_true", help="print one JSON list, not a table")
    args = parser.parse_args(argv)
    try:
        results = compile_all(getattr(torch, args.dtype), args.arch)
    except RuntimeError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    failed = any(r.problems(args.arch) for r in results)
    if args.json:
        print(json.dumps([{**asdict(r), "problems": r.problems(args.arch)} for r in results]))
        return 1 if failed else 0
    print("| kernel | config | dot | registers | spills (B) | shared (B) | problems |\n"
          "|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r.launch} | {r.config} | {r.dot_unit} | {r.registers} | {r.spill_stores} | "
              f"{r.shared} | "
              f"{'; '.join(r.problems(args.arch)) or 'none'} |")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
