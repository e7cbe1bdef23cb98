"""Graph surgery shared by the insertion passes: reading linear operands and module
boundaries from exported graphs, splicing an adapter module onto a node's output, and
finding attention ops and position ids for the prefix and prompt methods."""
from __future__ import annotations

import torch
from torch import nn
from torch.fx import GraphModule, Node

from adaptc.errors import ModelError
from adaptc.frontend.targets import POSITION_EMBEDDINGS, matches
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


# ---- attention ops and positions (prefix and prompt methods) ------------------------------

SDPA = aten.scaled_dot_product_attention.default
SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")


def attention_op(gm: GraphModule, path: str) -> Node:
    """The one scaled_dot_product_attention node traced inside module `path`."""
    found = [n for n in gm.graph.nodes if n.op == "call_function" and n.target == SDPA
             and in_module(n, path)]
    if len(found) != 1:
        raise ModelError(f"module '{path}' has {len(found)} scaled_dot_product_attention ops in "
                         "the traced graph (need exactly one); prefix methods need the model's "
                         "'sdpa' attention implementation")
    return found[0]


def sdpa_arg(node: Node, name: str, default=None):
    index = SDPA_ARGS.index(name)
    return node.args[index] if len(node.args) > index else node.kwargs.get(name, default)


def set_sdpa_arg(node: Node, name: str, value) -> None:
    index = SDPA_ARGS.index(name)
    if len(node.args) > index:
        node.update_arg(index, value)
    else:
        node.update_kwarg(name, value)


def position_inputs(gm: GraphModule, family: str | None) -> list[tuple[Node, Node]]:
    """(consumer, position ids) pairs: where integer positions enter a *RotaryEmbedding
    module or the family's absolute position table (`targets.POSITION_EMBEDDINGS`)."""
    table = POSITION_EMBEDDINGS.get(family or "")
    found = []
    for node in gm.graph.nodes:
        stack = list(node.meta.get("nn_module_stack", {}).values())
        if node.op != "call_function" or not stack:
            continue
        path, type_name = stack[-1][0], str(stack[-1][1])
        if not (type_name.endswith("RotaryEmbedding") or (table and matches(table, path))):
            continue
        for arg in node.all_input_nodes:
            val = arg.meta.get("val")
            outside = not in_module(arg, path)
            if outside and isinstance(val, torch.Tensor) and not val.is_floating_point():
                found.append((node, arg))
    return found


def shift_positions(gm: GraphModule, family: str | None, offset: int, method: str) -> int:
    """Add `offset` to the position ids where they enter the position encoding."""
    found = position_inputs(gm, family)
    if not found:
        raise ModelError(f"{method}: cannot find where positions enter the model (no rotary "
                         "embedding module and no known absolute position table for family "
                         f"'{family}')")
    for consumer, positions in found:
        with gm.graph.inserting_before(consumer):
            shifted = gm.graph.call_function(aten.add.Tensor, (positions, offset))
        shifted.meta["nn_module_stack"] = dict(consumer.meta.get("nn_module_stack", {}))
        shifted.meta[INSERTED] = method
        consumer.replace_input_with(positions, shifted)
    return len(found)
