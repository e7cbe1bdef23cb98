"""Pass (infer mode): unmerged LoRA updates become plain linear ops, and sibling updates that
read the same input share one GEMM for their concatenated A matrices.

    y_i + <site_i>.lora(x)   for the sites i = 1..n reading x (q, k, v; gate, up)
      →  h = linear(x, [A_1; …; A_n])                  one GEMM, h [..., r_1 + … + r_n]
         y_i + linear(h_i, s_i·B_i)                    h_i: h's columns for site i

The scale s_i is folded into a copy of B_i (in float32, cast once), so the update costs two
GEMMs per group plus one per site, instead of two GEMMs and a multiply per site. This is
what a LoRA update looks like when it is *not* merged (`compile(..., merge=False)`): the
base weights stay the user's tensors, untouched and unduplicated (a QLoRA base stays in
NF4). With merging on, only gated (UniPELT) LoRA is left unmerged, and it stays an eager
module: its gate depends on the input. Like the fused ops, the result has no dropout.

The concatenated A is `<common parent>.lora_A` (`model.layers.0.self_attn.lora_A` for q, k,
v), the scaled B `<site>.lora_B`; the LoRA adapter modules leave the graph module.
"""
from __future__ import annotations

import operator
import os

import torch
from torch import nn
from torch.fx import GraphModule, Node

from adaptc.graph_attrs import bind
from adaptc.methods.lora import LoraAdapter
from adaptc.passes.base import INSERTED, CompileContext, PassResult
from adaptc.passes.graph import aten, infer_value, mark_inserted


class FuseSiblings:
    name = "fuse_siblings"

    def run(self, gm: GraphModule, ctx: CompileContext) -> PassResult:
        protected = ctx.user_modules()
        groups = sibling_groups(gm)
        taken: set[str] = set()
        for calls in groups:
            lower_group(gm, calls, a_target(calls, taken), protected)
        counts = {"lora_lowered": sum(len(calls) for calls in groups),
                  "lora_sibling_groups": sum(len(calls) > 1 for calls in groups)}
        return PassResult(gm, counts)


def sibling_groups(gm: GraphModule) -> list[list[Node]]:
    """Ungated LoRA calls grouped by the input node they read (and dtype), in graph order."""
    groups: dict[tuple, list[Node]] = {}
    for node in gm.graph.nodes:
        if node.op != "call_module" or node.meta.get(INSERTED) != "lora":
            continue
        adapter = gm.get_submodule(node.target)
        if isinstance(adapter, LoraAdapter) and adapter.gate is None:
            groups.setdefault((node.args[0], adapter.A.dtype, adapter.A.device), []).append(node)
    return list(groups.values())


def a_target(calls: list[Node], taken: set[str]) -> str:
    """`<longest common module path of the sites>.lora_A`, numbered if another group has it."""
    common = os.path.commonprefix([call.target.rpartition(".")[0].split(".") for call in calls])
    name, index = ".".join([*common, "lora_A"]), 1
    while name in taken:
        index += 1
        name = ".".join([*common, f"lora_A{index}"])
    taken.add(name)
    return name


def lower_group(gm: GraphModule, calls: list[Node], target: str,
                protected: frozenset[int]) -> None:
    """Replace the group's adapter calls by one A GEMM, a split, and one B GEMM per site."""
    graph, x = gm.graph, calls[0].args[0]
    adapters = [gm.get_submodule(call.target) for call in calls]
    with torch.no_grad():
        stacked = torch.cat([adapter.A.detach() for adapter in adapters])
    bind(gm, target, nn.Parameter(stacked, requires_grad=False), protected)
    with graph.inserting_before(calls[0]):
        hidden = graph.call_function(aten.linear.default, (x, graph.get_attr(target)))
        parts, added = [hidden], [hidden]
        if len(calls) > 1:
            ranks = [adapter.A.shape[0] for adapter in adapters]
            split = graph.call_function(aten.split_with_sizes.default, (hidden, ranks, -1))
            parts = [graph.call_function(operator.getitem, (split, i)) for i in range(len(calls))]
            added += [split, *parts]
    for node in added:
        tag(gm, node, calls[0])
    for call, adapter, part in zip(calls, adapters, parts):
        lower_site(gm, call, adapter, part, protected)


def lower_site(gm: GraphModule, call: Node, adapter: LoraAdapter, part: Node,
               protected: frozenset[int]) -> None:
    """`call(x)` → `linear(part, s·B)`; the adapter module leaves the graph module."""
    site = call.target.rpartition(".")[0]
    with torch.no_grad():
        scaled = (adapter.B.detach().float() * adapter.scale).to(adapter.B.dtype)
    bind(gm, f"{site}.lora_B", nn.Parameter(scaled, requires_grad=False), protected)
    with gm.graph.inserting_before(call):
        update = gm.graph.call_function(aten.linear.default,
                                        (part, gm.graph.get_attr(f"{site}.lora_B")))
    tag(gm, update, call)
    call.replace_all_uses_with(update)
    gm.graph.erase_node(call)
    release(gm, call.target, protected)


def tag(gm: GraphModule, node: Node, like: Node) -> None:
    """Module path, inserting method and value of a node this pass added (accumulate_updates
    reads the B GEMM's shape and dtype to add the base GEMM into its output)."""
    mark_inserted(node, like, "lora")
    infer_value(gm, node)


def release(gm: GraphModule, target: str, protected: frozenset[int]) -> None:
    """Delete the adapter module at `target`. A tensor of it the graph still reads (PiSSA's
    residual, the layer's weight) moves beside it first: `<site>.lora.residual` →
    `<site>.lora_residual`."""
    site = target.rpartition(".")[0]
    for node in gm.graph.nodes:
        if node.op == "get_attr" and node.target.startswith(target + "."):
            moved = f"{site}.lora_{node.target.removeprefix(target + '.').replace('.', '_')}"
            bind(gm, moved, gm.get_parameter(node.target), protected)
            node.target = moved
    gm.delete_submodule(target)
