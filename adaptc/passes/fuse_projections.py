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

The A GEMM's columns come last, and when two or more of the group's layers carry those LoRA
updates, their B GEMMs and adds become one each as well (`lora_stacked`):

    y = x·[W_q; W_k; W_v; A_q; A_v]ᵀ;  h = y[..., W rows:]
    q, k, v = split(y[..., :W rows] + h·B_blockᵀ)     B_block = [[B_q, 0], [0, 0], [0, B_v]]

so the B side costs two launches (GEMM, add) per group instead of two per layer; B_block's
zeros cost a few r-wide columns of arithmetic, and a layer without LoRA (k here) gets exact
zeros added.

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
from adaptc.passes.base import INSERTED, CompileContext, PassResult
from adaptc.passes.graph import aten, attr_tensor, drop_attr, mark_inserted

CONCATENATED = "adaptc.concatenated"  # gm.meta key: {old name: (fused name, start, end)}


class FuseProjections:
    name = "fuse_projections"

    def run(self, gm: GraphModule, ctx: CompileContext) -> PassResult:
        protected = ctx.user_modules()
        groups = projection_groups(gm)
        stacked = sum(fuse_group(gm, group, protected) for group in groups)
        counts = {"projections_concatenated": sum(len(group) for group in groups),
                  "projection_groups": len(groups), "lora_stacked": stacked}
        return PassResult(gm, counts)


def operands(node: Node) -> tuple[Node, Node | None]:
    """The get_attr nodes of a linear node's weight and bias (None without one)."""
    return node.args[1], node.args[2] if len(node.args) > 2 else None


def projection_groups(gm: GraphModule) -> list[list[Node]]:
    """Linear nodes sharing input, dtype and device, in graph order."""
    readers = Counter(id(attr_tensor(gm, n.target)) for n in gm.graph.nodes if n.op == "get_attr")
    groups: dict[tuple, list[Node]] = {}
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target != aten.linear.default:
            continue
        reads = [arg for arg in operands(node) if arg is not None]
        if any(arg.op != "get_attr" or len(arg.users) != 1
               or readers[id(attr_tensor(gm, arg.target))] != 1 for arg in reads):
            continue
        weight = attr_tensor(gm, reads[0].target)
        groups.setdefault((node.args[0], weight.dtype, weight.device), []).append(node)
    return [group for group in groups.values() if len(group) > 1]


def fuse_group(gm: GraphModule, group: list[Node], protected: frozenset[int]) -> int:
    """Replace the group by one linear over concatenated operands and a split of its output
    (LoRA A GEMMs last); then stack the group's LoRA B GEMMs. The number of updates stacked."""
    graph = gm.graph
    first = group[0]
    group = sorted(group, key=lambda node: node.meta.get(INSERTED) == "lora")  # stable
    weights = [operands(node)[0].target for node in group]
    biases = [None if b is None else b.target for b in (operands(node)[1] for node in group)]
    common = os.path.commonprefix([target.split(".")[:-1] for target in weights])
    joined = "_".join(target.split(".")[len(common)] for target in weights)
    base = ".".join([*common, joined])  # model.layers.0.self_attn.q_proj_k_proj_v_proj
    sizes = [attr_tensor(gm, target).shape[0] for target in weights]
    with graph.inserting_before(first):
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
    lora = [i for i, node in enumerate(group) if node.meta.get(INSERTED) == "lora"]
    if len(lora) != 1:
        return 0
    layers = "_".join(target.split(".")[len(common)] for target in weights[:lora[0]])
    target = ".".join([*common, f"{layers}_lora_B"])  # model.layers.0.mlp.gate_proj_up_proj_lora_B
    return stack_updates(gm, fused, pieces, sizes, lora[0], target, protected)


def stack_updates(gm: GraphModule, fused: Node, pieces: list[Node], sizes: list[int],
                  a: int, target: str, protected: frozenset[int]) -> int:
    """`pieces[j] + linear(h_i, B_i)` for the LoRA parts h_i of h = pieces[a] (the columns
    after the layers' own) → one `y[..., :a's offset] + linear(h, B_block)`, split again.
    Returns the number of updates stacked: 0 (nothing changed) unless there are two or more."""
    graph, h = gm.graph, pieces[a]
    users = list(h.users)
    splits = users[0] if len(users) == 1 and users[0].target == aten.split_with_sizes.default \
        else None
    parts = sorted(splits.users, key=lambda n: n.args[1]) if splits else [h]
    updates = [update_of(part, pieces[:a]) for part in parts]
    if len(updates) < 2 or None in updates or len({j for _, _, j in updates}) < len(updates):
        return 0
    width = sum(sizes[:a])
    starts = [sum(sizes[:j]) for j in range(a)]
    blocks = [gm.get_parameter(linear.args[1].target) for linear, _, _ in updates]
    stacked = blocks[0].new_zeros(width, sum(b.shape[1] for b in blocks))
    column = 0
    for block, (_, _, j) in zip(blocks, updates):
        stacked[starts[j]:starts[j] + sizes[j], column:column + block.shape[1]] = block
        column += block.shape[1]
    bind(gm, target, nn.Parameter(stacked, requires_grad=False), protected)
    readers = {user for piece in pieces for user in piece.users}
    first_user = next(n for n in graph.nodes if n in readers)
    with graph.inserting_before(first_user):  # new nodes in order, before any piece is read
        own = graph.call_function(aten.slice.Tensor, (fused, -1, 0, width))
        update = graph.call_function(aten.linear.default, (h, graph.get_attr(target)))
        total = graph.call_function(aten.add.Tensor, (own, update))
        split = graph.call_function(aten.split_with_sizes.default, (total, sizes[:a], -1))
        outs = [graph.call_function(operator.getitem, (split, j)) for j in range(a)]
    for node in (own, update, total, split, *outs):
        mark_inserted(node, h, "lora")
    added = {j: add for _, add, j in updates}
    for j, out in enumerate(outs):
        (added.get(j) or pieces[j]).replace_all_uses_with(out)
    for part, (linear, add, j) in zip(parts, updates):
        weight = linear.args[1]
        for node in (add, linear, part):
            graph.erase_node(node)
        drop_attr(gm, weight)
    graph.erase_node(splits)  # two or more parts: h was split
    for j in range(a):
        graph.erase_node(pieces[j])
    return len(updates)


def update_of(part: Node, own: list[Node]) -> tuple[Node, Node, int] | None:
    """(B linear, add, index in `own`) when `part` feeds exactly `own[j] + linear(part, B)`,
    `own[j]` read by nothing else; None for any other shape."""
    users = list(part.users)
    if len(users) != 1 or users[0].target != aten.linear.default or users[0].args[0] is not part \
            or len(users[0].args) != 2 or users[0].args[1].op != "get_attr":
        return None
    linear = users[0]
    adds = list(linear.users)
    if len(adds) != 1 or adds[0].target != aten.add.Tensor or adds[0].kwargs \
            or adds[0].args[1] is not linear or adds[0].args[0] not in own:
        return None
    base = adds[0].args[0]
    if len(base.users) != 1:
        return None
    return linear, adds[0], own.index(base)


def concatenate(gm: GraphModule, olds: list[str | None], sizes: list[int], target: str,
                protected: frozenset[int]) -> str:
    """Bind the rows of `olds` one after another at `target` (zeros for a missing bias);
    record where each old tensor's rows went; return `target`."""
    like = attr_tensor(gm, next(old for old in olds if old is not None))
    parts = [like.new_zeros(size) if old is None else attr_tensor(gm, old).detach()
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
