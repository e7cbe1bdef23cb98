"""Block reuse: trace one transformer block and replicate it, so tracing time does not grow
with depth.

A model whose layers are one ModuleList of identical blocks (same class, parameter names
and shapes, and attention type) is traced with only its first block; the block's nodes are
then copied once per further layer, reading that layer's parameters (the user's tensors,
shared as torch.export shares them) and chained hidden state to hidden state. Module paths
in `nn_module_stack` are rewritten so passes see `layers.7.mlp` as if it had been traced.
Anything that does not fit (no such list, differing blocks, a block with more than one
output) returns None and the caller traces the whole model.
"""
from __future__ import annotations

import copy

import torch
from torch import nn
from torch.fx import GraphModule, Node

from adaptc.frontend.models import LoadedModel
from adaptc.graph_attrs import bind


def find_stack(module: nn.Module) -> tuple[str, nn.ModuleList] | None:
    """The longest ModuleList of blocks that share class, parameter names and shapes."""
    best = None
    for path, child in module.named_modules():
        if isinstance(child, nn.ModuleList) and len(child) > 1 and identical(child):
            if best is None or len(child) > len(best[1]):
                best = (path, child)
    return best


def identical(blocks: nn.ModuleList) -> bool:
    def signature(block):
        return type(block), [(n, tuple(p.shape)) for n, p in block.named_parameters()]
    first = signature(blocks[0])
    return all(signature(b) == first for b in blocks)


def shallow_model(model: LoadedModel, path: str) -> LoadedModel | None:
    """A copy of the module tree down to the stack, with one block and a one-layer config."""
    config = getattr(model.module, "config", None)
    if config is None or len(set(getattr(config, "layer_types", None) or [0])) > 1:
        return None
    small = copy.copy(config)
    small.num_hidden_layers = 1
    if getattr(config, "layer_types", None) and len(small.layer_types) != 1:
        try:
            small.layer_types = config.layer_types[:1]
        except AttributeError:  # a read-only property not derived from the depth
            return None
    root = copy.copy(model.module)
    root._modules = dict(root._modules)
    parent = root
    *parents, leaf = path.split(".")
    for name in parents:
        child = copy.copy(parent._modules[name])
        child._modules = dict(child._modules)
        parent._modules[name] = child
        parent = child
    parent._modules[leaf] = nn.ModuleList([parent._modules[leaf][0]])
    swapped = [part for part in root.modules() if getattr(part, "config", None) is config]
    for part in swapped:
        part.config = small
    # Most of these parts are the user's own modules (only the path to the stack is copied):
    # `restore_configs` gives them their config back once the block is traced.
    return LoadedModel(root, model.example_inputs, model.source, model.family,
                       {"config_swapped": [(part, config) for part in swapped]})


def restore_configs(small: LoadedModel) -> None:
    """Undo `shallow_model`'s config swap on the user's modules."""
    for part, config in small.details.pop("config_swapped", []):
        part.config = config


def replicate(gm: GraphModule, model: nn.Module, path: str, count: int) -> bool:
    """Copy block 0's nodes for blocks 1..count-1; False if the block cannot be replicated."""
    prefix = f"{path}.0"
    block = [n for n in gm.graph.nodes if in_block(n, prefix)]
    members = set(block)
    outputs = [n for n in block if any(u not in members for u in n.users)]
    # in graph order: each copy binds its layer's tensors in this order, which makes the order
    # of the layer's submodules, and so of `parameters()` (an optimizer's state_dict), that
    # of block 0 in every process (a set's order follows the nodes' addresses)
    params = dict.fromkeys(n for n in gm.graph.nodes
                           if n.op == "get_attr" and n.target.startswith(prefix + "."))
    inputs = {a for n in block for a in n.all_input_nodes if a not in members and a not in params}
    hidden = [a for a in inputs if is_hidden(a, outputs)]
    if len(outputs) != 1 or len(hidden) != 1 or not all(owned(model, n.target) for n in params):
        return False
    last = outputs[0]
    users = [u for u in last.users if u not in members]
    previous = last
    for index in range(1, count):
        previous = copy_block(gm, model, block, params, path, index, hidden[0], previous)
    for user in users:
        user.replace_input_with(last, previous)
    return True


def is_hidden(node: Node, outputs: list[Node]) -> bool:
    """The block input whose shape equals the block output's: the residual stream."""
    val, out = node.meta.get("val"), outputs[0].meta.get("val") if outputs else None
    shape = getattr(val, "shape", None)
    return shape is not None and out is not None and str(shape) == str(out.shape)


def copy_block(gm: GraphModule, model: nn.Module, block: list[Node], params: dict[Node, None],
               path: str, index: int, hidden: Node, previous: Node) -> Node:
    graph = gm.graph
    mapping: dict[Node, Node] = {hidden: previous}
    old, new = f"{path}.0.", f"{path}.{index}."
    for node in params:
        target = new + node.target[len(old):]
        bind(gm, target, tensor_at(model, target))
        with graph.inserting_before(block[0]):
            mapping[node] = graph.get_attr(target)
        mapping[node].meta = dict(node.meta)  # its fake value: later passes read its shape
    anchor = previous
    for node in block:
        with graph.inserting_after(anchor):
            copied = graph.node_copy(node, lambda n: mapping.get(n, n))
        copied.meta = dict(node.meta)
        copied.meta["nn_module_stack"] = {
            key.replace(old[:-1], new[:-1]): (p.replace(old[:-1], new[:-1], 1), t)
            for key, (p, t) in node.meta.get("nn_module_stack", {}).items()}
        mapping[node] = anchor = copied
    return anchor


def owned(model: nn.Module, target: str) -> bool:
    """Whether a block's tensor is a parameter or buffer of the model. A constant that
    torch.export lifted out of the block's code (Falcon's attention makes one) might differ
    per layer, so such a block is not replicated: the whole model is exported."""
    try:
        tensor_at(model, target)
    except AttributeError:
        return False
    return True


def tensor_at(model: nn.Module, target: str) -> torch.Tensor:
    try:
        return model.get_parameter(target)
    except AttributeError:
        return model.get_buffer(target)


def in_block(node: Node, prefix: str) -> bool:
    return any(p == prefix or p.startswith(prefix + ".")
               for p, _ in node.meta.get("nn_module_stack", {}).values())
