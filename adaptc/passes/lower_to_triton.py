"""Pass (infer mode): adapters that cannot merge become one fused custom op each.

    h + <site>.adapter(x)  →  torch.ops.adaptc.bottleneck_adapter(x, h, D, b_D, U, b_U, act)
                              (scale=s when s ≠ 1, gate=<site>.adapter.gate(x) with a gate)
    y + <site>.moe(x)      →  torch.ops.adaptc.mixture_lora(x, y, W_g, A, B, s, top_k)
    <site>.mov(y, x)       →  torch.ops.adaptc.mixture_vectors(y, x, W_g, l, top_k)
    <site>.mov(x)          →  torch.ops.adaptc.mixture_vectors(x, x, W_g, l, top_k)  (feedforward)

Mixtures the kernels do not cover (more experts or a higher rank than they take) stay eager
modules in the graph (`kept_eager`), so the infer graph still computes what train mode
computes. A bottleneck adapter's UniPELT gate stays a small eager module whose [B, 1, 1]
output the kernel reads.

The ops (adaptc/backends/triton) run their Triton kernels on CUDA and their PyTorch
reference elsewhere; they are inference only (no dropout, no balance loss). The weights
stay in the adapter submodules and are read through get_attr nodes, so the state dict and
`adaptc.adapter_state_dict` keep their names.

The backend is imported inside `run`, never when this module is imported: importing it
imports triton, and triton must not be imported before a test or user can set
TRITON_INTERPRET.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.fx import GraphModule, Node

from adaptc.methods.bottleneck import BottleneckAdapter
from adaptc.methods.mixture import MixtureOfLora, MixtureOfVectors
from adaptc.passes.base import INSERTED, CompileContext, PassResult
from adaptc.passes.graph import aten


@dataclass(frozen=True)
class Fusion:
    """How one adapter module becomes a call to a fused op."""

    count: str                                   # key in the pass counts
    op: str                                      # name in torch.ops.adaptc
    weights: tuple[str, ...]                     # parameters passed after (x, residual)
    constants: Callable[[nn.Module], tuple]      # non-tensor arguments, last
    fusable: Callable[[nn.Module], bool] = lambda adapter: True  # what the kernel computes
    scales: bool = False  # the op replaces `adapter(values[, x])` itself, not `residual + ·`
    options: Callable[[nn.Module], dict] = lambda adapter: {}  # keywords not at their default


def within_kernel_limits(mixture: MixtureOfLora | MixtureOfVectors) -> bool:
    """The mixture ops check E ≤ MAX_EXPERTS and r ≤ MAX_RANK on every call, the CPU
    reference too: a wider mixture, valid in train mode, fused into an op that refused it."""
    from adaptc.backends.triton.moe_lora import MAX_EXPERTS, MAX_RANK

    rank = mixture.A.shape[1] if isinstance(mixture, MixtureOfLora) else 0
    return mixture.experts <= MAX_EXPERTS and rank <= MAX_RANK


FUSIONS = {
    BottleneckAdapter: Fusion("adapter_fused", "bottleneck_adapter",
                              ("down", "down_bias", "up", "up_bias"),
                              lambda a: (a.config.activation,),
                              options=lambda a: {"scale": a.config.scale}
                              if a.config.scale != 1.0 else {}),
    MixtureOfLora: Fusion("mixture_fused", "mixture_lora", ("router", "A", "B"),
                          lambda a: (a.scale, a.top_k), within_kernel_limits),
    MixtureOfVectors: Fusion("mixture_fused", "mixture_vectors", ("router", "vectors"),
                             lambda a: (a.top_k,), within_kernel_limits,
                             scales=True),
}


class LowerToTriton:
    name = "lower_to_triton"

    def run(self, gm: GraphModule, ctx: CompileContext) -> PassResult:
        import adaptc.backends.triton  # noqa: F401  registers torch.ops.adaptc.*

        counts = {fusion.count: 0 for fusion in FUSIONS.values()} | {"kept_eager": 0}
        for call in [n for n in gm.graph.nodes if n.op == "call_module"]:
            adapter = gm.get_submodule(call.target)
            fusion = FUSIONS.get(type(adapter))
            if fusion is None:
                continue
            if not fusion.fusable(adapter):
                counts["kept_eager"] += 1
                continue
            op = getattr(torch.ops.adaptc, fusion.op).default
            if fusion.scales:
                fuse_scaling(gm, call, op, fusion.weights, fusion.constants(adapter))
            else:
                fuse(gm, call, op, fusion.weights, fusion.constants(adapter),
                     fusion.options(adapter), getattr(adapter, "gate", None) is not None)
            counts[fusion.count] += 1
        return PassResult(gm, counts)


def fuse(gm: GraphModule, call: Node, op, weights: tuple[str, ...], constants: tuple,
         options: dict, gated: bool) -> Node:
    """Replace `residual + call(x)` by `op(x, residual, *weights, *constants, **options)`,
    plus `gate=call.gate(x)` when `gated`."""
    (add,) = call.users
    if add.target != aten.add.Tensor or add.args[1] is not call:
        raise RuntimeError(f"{call.target}: expected residual + adapter(x), found {add.format_node()}")
    (source,), residual = call.args, add.args[0]
    graph = gm.graph
    with graph.inserting_before(add):
        reads = [graph.get_attr(f"{call.target}.{name}") for name in weights]
        if gated:
            gate = graph.call_module(f"{call.target}.gate", (source,))
            gate.meta = dict(call.meta)
            options = {**options, "gate": gate}
        fused = graph.call_function(op, (source, residual, *reads, *constants), options)
    fused.meta = {**add.meta, INSERTED: call.meta.get(INSERTED)}
    add.replace_all_uses_with(fused)
    graph.erase_node(add)
    graph.erase_node(call)
    return fused


def fuse_scaling(gm: GraphModule, call: Node, op, weights: tuple[str, ...],
                 constants: tuple) -> Node:
    """Replace `call(values, x)` (`call(values)`: x is values) by
    `op(values, x, *weights, *constants)`."""
    values, *router_input = call.args
    x = router_input[0] if router_input else values
    graph = gm.graph
    with graph.inserting_before(call):
        reads = [graph.get_attr(f"{call.target}.{name}") for name in weights]
        fused = graph.call_function(op, (values, x, *reads, *constants))
    fused.meta = dict(call.meta)
    call.replace_all_uses_with(fused)
    graph.erase_node(call)
    return fused
