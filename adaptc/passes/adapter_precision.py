"""Pass (train mode): the adapters of a float16 or bfloat16 model train in float32, as PEFT's
do (`autocast_adapter_dtype=True`, its default).

    <site>.lora(x)  →  <site>.lora(x.float()).to(x.dtype)     A, B, gates, routers: float32

In float16 an Adam step on a half-precision parameter rounds `eps=1e-8` to 0 (LoRA's A,
whose first gradient is exactly 0, becomes NaN) and small updates vanish under the weight's
rounding; float32 adapters need neither workaround. The adapter tensors (trainable and
`frozen_state`) become float32 in place, so optimizers and saved files see float32; each
adapter module the graph calls gets hooks that cast its floating inputs to float32 and its
floating outputs back to the model's dtype, so the graph around it is unchanged. Tensors the
graph reads directly (a PiSSA residual on the adapter module, `train` copies of base
parameters) keep the model's dtype. Infer mode merges in float32 anyway (`wide`) and keeps
its fused kernels' operands in the model's dtype, so it does not run this pass.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.fx import GraphModule
from torch.utils import _pytree as pytree

from adaptc.adapters import adapter_modules, adapter_tensors
from adaptc.passes.base import CompileContext, PassResult

HALF = (torch.float16, torch.bfloat16)


class AdapterPrecision:
    name = "adapter_precision"

    def run(self, gm: GraphModule, ctx: CompileContext) -> PassResult:
        called = {n.target for n in gm.graph.nodes if n.op == "call_module"}
        count = 0
        for path, module in adapter_modules(gm).items():
            tensors = [t for t in adapter_tensors(module).values() if t.dtype in HALF]
            if path not in called or not tensors:
                continue
            dtype = tensors[0].dtype
            with torch.no_grad():
                for tensor in tensors:
                    tensor.data = tensor.data.float()
            module.register_forward_pre_hook(CastInputs(), with_kwargs=True)
            module.register_forward_hook(CastOutputs(dtype))
            count += 1
        return PassResult(gm, {"adapters_float32": count})


def cast(tree, dtype: torch.dtype):
    return pytree.tree_map_only(
        torch.Tensor, lambda t: t.to(dtype) if t.is_floating_point() else t, tree)


class CastInputs:
    """Forward pre-hook: floating inputs to float32 (a class, so deep copies keep it)."""

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        return cast(args, torch.float32), cast(kwargs, torch.float32)


class CastOutputs:
    """Forward hook: floating outputs back to the model's dtype."""

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype

    def __call__(self, module: nn.Module, args: tuple, output):
        return cast(output, self.dtype)
