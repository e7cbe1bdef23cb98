"""Pass (infer mode): fold the weight-space methods that rescale a layer into its weights.

    DoRA:        linear(x, W₀, b) + <site>.dora(x, W₀, b, ·)  →  linear(x, m/‖W'‖ ⊙ W', b),
                 W' = W₀ + s·B·A
    IA3 output:  <site>.ia3(linear(x, W₀, b))                 →  linear(x, l ⊙ W₀, l ⊙ b)
    IA3 input:   linear(<site>.ia3(x), W₀, b)                 →  linear(x, W₀ ⊙ l, b)

Each adapter's `merged(weight, bias)` rule computes the folded tensors in float32 (float64 for float64 weights) and casts
them back once; they become new parameters beside the adapter (`<site>.merged_weight`,
`<site>.merged_bias`, recorded in `gm.meta["adaptc.merged"]`), so the user's tensors are
never written.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.fx import GraphModule, Node

from adaptc.graph_attrs import bind
from adaptc.passes.base import INSERTED, CompileContext, PassResult, record_merge
from adaptc.passes.graph import linear_bias, linear_weight, weight_transposed
from adaptc.passes.merge_weights import base_weight, refuse_overflow

SCALING = ("dora", "ia3")


class MergeScaling:
    name = "merge_scaling"

    def run(self, gm: GraphModule, ctx: CompileContext) -> PassResult:
        protected = ctx.user_modules()
        counts = {f"{method}_merged": 0 for method in SCALING}
        for call in [n for n in gm.graph.nodes if n.op == "call_module"
                     and n.meta.get(INSERTED) in SCALING]:
            counts[f"{call.meta[INSERTED]}_merged"] += 1
            fold(gm, call, protected)
        return PassResult(gm, counts)


def fold(gm: GraphModule, call: Node, protected: frozenset[int]) -> None:
    """Take `call` out of the graph and make its layer read the folded weights."""
    adapter = gm.get_submodule(call.target)
    if call.meta[INSERTED] == "dora":
        (add,) = call.users
        linear = add.args[0]
        add.replace_all_uses_with(linear)
        gm.graph.erase_node(add)
    elif adapter.config.feedforward:
        (linear,) = call.users
        linear.replace_input_with(call, call.args[0])
    else:
        linear = call.args[0]
        call.replace_all_uses_with(linear)
    gm.graph.erase_node(call)
    rebind(gm, linear, adapter, call.target.rpartition(".")[0], protected, call.meta[INSERTED])
    gm.delete_submodule(call.target)


def rebind(gm: GraphModule, linear: Node, adapter: nn.Module, site: str,
           protected: frozenset[int], method: str) -> None:
    """Point `linear` at `adapter.merged(W, b)` registered beside the site."""
    transposed = weight_transposed(linear)
    weight = base_weight(gm, linear_weight(linear), linear)
    bias_node = linear_bias(linear)
    bias = gm.get_parameter(bias_node.target) if bias_node is not None else None
    with torch.no_grad():
        new_weight, new_bias = adapter.merged(weight.t() if transposed else weight, bias)
    for folded in (new_weight, new_bias):
        if folded is not None:
            refuse_overflow(folded, site, method)
    stored = new_weight.t().contiguous() if transposed else new_weight
    replace_operand(gm, linear, linear_weight(linear), f"{site}.merged_weight", stored, protected)
    record_merge(gm, site, "weight", f"{site}.merged_weight")
    if new_bias is not None and new_bias is not bias:
        replace_operand(gm, linear, bias_node, f"{site}.merged_bias", new_bias, protected)
        record_merge(gm, site, "bias", f"{site}.merged_bias")


def replace_operand(gm: GraphModule, linear: Node, old: Node, target: str,
                    value: torch.Tensor, protected: frozenset[int]) -> None:
    bind(gm, target, nn.Parameter(value.detach(), requires_grad=False), protected)
    with gm.graph.inserting_before(linear):
        fresh = gm.graph.get_attr(target)
    fresh.meta = {k: v for k, v in old.meta.items() if k in ("val", "tensor_meta")}
    linear.replace_input_with(old, fresh)
    if old.users:
        return
    gm.graph.erase_node(old)
    if old.op == "call_module":  # a QLoRA NF4 weight, now folded into a dense copy
        gm.delete_submodule(old.target)
    elif not any(n.op == "get_attr" and n.target == old.target for n in gm.graph.nodes):
        path, _, name = old.target.rpartition(".")
        owner = gm.get_submodule(path) if path else gm
        if id(owner) not in protected:  # unread now: the module need not hold it
            delattr(owner, name)
