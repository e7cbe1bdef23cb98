"""Pass (infer mode, opt-in: `fuse_projections=True`, `--fuse-projections`): linear layers
that read the same input become one GEMM over their concatenated weights.

    q = linear(x, W_q, b_q); k = linear(x, W_k, b_k); v = linear(x, W_v, b_v)
      →  y = linear(x, [W_q; W_k; W_v], [b_q; b_k; b_v]);  q, k, v = split(y, [out_q, out_k, out_v])

Groups are the linear nodes (not GPT-2's addmm, whose c_attn is already fused) with one
input node, weight dtype and device, whose weight (and bias) no other node reads under any
name (a tied embedding stays where it is): q, k, v and gate, up in Llama-like models,
query, key, value in BERT. After `fuse_siblings` the A GEMM of unmerged LoRA updates
reading the same input joins the group, so `x·[W_q; W_k; W_v; A]ᵀ` is one GEMM. When some
members have a bias, the others contribute zeros to the fused bias. The pieces are views
of y (the consumers reshape them as before).

It is off by default: it trades the guarantee that a merged LoRA-only graph has exactly the
base model's operations for fewer, wider GEMMs, and the concatenated weights are new
tensors (the user's model keeps its own). `gm.meta["adaptc.concatenated"]` maps each former
tensor name to (fused name, first row, end row), which is how the hf/ export splits them.
"""
from __future__ import annotations

import operator
import os
from collections import Counter

import torch
from torch import nn
from torch.fx import GraphModule, Node

from adaptc.graph_attrs import bind
from adaptc.passes.base import CompileContext, PassResult
from adaptc.passes.graph import aten, drop_attr

CONCATENATED = "adaptc.concatenated"  # gm.meta key: {old name: (fused name, start, end)}


class FuseProjections:
    name = "fuse_projections"

    def run(self, gm: GraphModule, ctx: CompileContext) -> PassResult:
        protected = ctx.user_modules()
        groups = projection_groups(gm)
        for group in groups:
            fuse_group(gm, group, protected)
        counts = {"projections_concatenated": sum(len(group) for group in groups),
                  "projection_groups": len(groups)}
        return PassResult(gm, counts)


def operands(node: Node) -> tuple[Node, Node | None]:
    """The get_attr nodes of a linear node's weight and bias (None without one)."""
    return node.args[1], node.args[2] if len(node.args) > 2 else None


def projection_groups(gm: GraphModule) -> list[list[Node]]:
    """Linear nodes sharing input, dtype and device, in graph order."""
    readers = Counter(id(tensor(gm, n.target)) for n in gm.graph.nodes if n.op == "get_attr")
    groups: dict[tuple, list[Node]] = {}
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target != aten.linear.default:
            continue
        reads = [arg for arg in operands(node) if arg is not None]
        if any(arg.op != "get_attr" or len(arg.users) != 1
               or readers[id(tensor(gm, arg.target))] != 1 for arg in reads):
            continue
        weight = tensor(gm, reads[0].target)
        groups.setdefault((node.args[0], weight.dtype, weight.device), []).append(node)
    return [group for group in groups.values() if len(group) > 1]


def tensor(gm: GraphModule, target: str) -> torch.Tensor:
    owner, _, name = target.rpartition(".")
    return getattr(gm.get_submodule(owner) if owner else gm, name)


def fuse_group(gm: GraphModule, group: list[Node], protected: frozenset[int]) -> None:
    """Replace the group by one linear over concatenated operands and a split of its output."""
    graph = gm.graph
    weights = [operands(node)[0].target for node in group]
    biases = [None if b is None else b.target for b in (operands(node)[1] for node in group)]
    common = os.path.commonprefix([target.split(".")[:-1] for target in weights])
    joined = "_".join(target.split(".")[len(common)] for target in weights)
    base = ".".join([*common, joined])  # model.layers.0.self_attn.q_proj_k_proj_v_proj
    sizes = [tensor(gm, target).shape[0] for target in weights]
    with graph.inserting_before(group[0]):
        reads = [graph.get_attr(concatenate(gm, weights, sizes, f"{base}_weight", protected))]
        if any(biases):
            reads.append(graph.get_attr(concatenate(gm, biases, sizes, f"{base}_bias", protected)))
        fused = graph.call_function(aten.linear.default, (group[0].args[0], *reads))
        split = graph.call_function(aten.split_with_sizes.default, (fused, sizes, -1))
        pieces = [graph.call_function(operator.getitem, (split, i)) for i in range(len(group))]
    for node, piece in zip(group, pieces):
        piece.meta["nn_module_stack"] = dict(node.meta.get("nn_module_stack", {}))
        node.replace_all_uses_with(piece)
        reads = [arg for arg in operands(node) if arg is not None]
        graph.erase_node(node)
        for read in reads:
            drop_attr(gm, read)


def concatenate(gm: GraphModule, olds: list[str | None], sizes: list[int], target: str,
                protected: frozenset[int]) -> str:
    """Bind the rows of `olds` one after another at `target` (zeros for a missing bias);
    record where each old tensor's rows went; return `target`."""
    like = tensor(gm, next(old for old in olds if old is not None))
    parts = [like.new_zeros(size) if old is None else tensor(gm, old).detach()
             for old, size in zip(olds, sizes)]
    with torch.no_grad():
        bind(gm, target, nn.Parameter(torch.cat(parts), requires_grad=False), protected)
    record = gm.meta.setdefault(CONCATENATED, {})
    start = 0
    for old, size in zip(olds, sizes):
        if old is not None:
            record[old] = (target, start, start + size)
        start += size
    return target


def graph_tensor(gm: GraphModule, name: str) -> torch.Tensor:
    """The graph module's tensor `name`, or its rows of the tensor this pass concatenated
    it into (CONCATENATED)."""
    if name in gm.meta.get(CONCATENATED, {}):
        fused, start, end = gm.meta[CONCATENATED][name]
        return gm.get_parameter(fused)[start:end]
    return gm.get_parameter(name)
