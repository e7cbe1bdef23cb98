"""Graph surgery shared by the insertion passes: reading linear operands and module
boundaries from exported graphs, and splicing an adapter module onto a node's output."""
from __future__ import annotations

import torch
from torch import nn
from torch.fx import GraphModule, Node

from adaptc.passes.base import INSERTED

aten = torch.ops.aten
LINEAR_OPS = {aten.linear.default: (0, 1), aten.addmm.default: (1, 2)}  # op: (input, weight) arg


def is_linear(node: Node) -> bool:
    return node.op == "call_function" and node.target in LINEAR_OPS


def linear_input(node: Node) -> Node:
    """The activation operand of aten.linear(x, W, b) or GPT-2's aten.addmm(b, x, W)."""
    return node.args[LINEAR_OPS[node.target][0]]


def module_path(node: Node) -> str | None:
    """The innermost module a node was traced in."""
    stack = node.meta.get("nn_module_stack")
    return list(stack.values())[-1][0] if stack else None


def in_module(node: Node, path: str) -> bool:
    return any(entry[0] == path for entry in node.meta.get("nn_module_stack", {}).values())


def splice(gm: GraphModule, output: Node, adapter_input: Node, target: str, adapter: nn.Module,
           method: str, keep_users: set[Node] = frozenset()) -> Node:
    """Register `adapter` at `target` and make every user of `output` (but `keep_users`)
    read `output + adapter(adapter_input)` instead."""
    gm.add_submodule(target, adapter)
    graph = gm.graph
    with graph.inserting_after(output):
        delta = graph.call_module(target, (adapter_input,))
    with graph.inserting_after(delta):
        total = graph.call_function(aten.add.Tensor, (output, delta))
    for new in (delta, total):
        new.meta["nn_module_stack"] = dict(output.meta.get("nn_module_stack", {}))
        new.meta[INSERTED] = method
    if "val" in output.meta:
        total.meta["val"] = output.meta["val"]
    skip = {delta, total, *keep_users}
    output.replace_all_uses_with(total, delete_user_cb=lambda user: user not in skip)
    return total


def factory(gm: GraphModule, weight_target: str) -> dict:
    """Device and dtype of an existing parameter, for building adapters beside it."""
    weight = gm.get_parameter(weight_target)
    return {"device": weight.device, "dtype": weight.dtype}
