"""Graph surgery shared by the insertion passes: reading linear operands and module
boundaries from exported graphs, splicing an adapter module onto a node's output, and
finding attention ops and position ids for the prefix and prompt methods."""
from __future__ import annotations

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor
from torch.fx import GraphModule, Node

from adaptc.errors import ModelError
from adaptc.frontend.targets import POSITION_TABLES, matches
from adaptc.frontend.trace import SDPA
from adaptc.passes.base import INSERTED

aten = torch.ops.aten
# ops that only reshape a tensor (GPT-2 flattens [batch, seq, features] before its Conv1D)
VIEWS = (aten.view.default, aten.reshape.default, aten._unsafe_view.default)
LINEAR_OPS = {aten.linear.default: (0, 1), aten.addmm.default: (1, 2)}  # op: (input, weight) arg


def is_linear(node: Node) -> bool:
    return node.op == "call_function" and node.target in LINEAR_OPS


def plain_add(node: Node) -> bool:
    """`node` is aten.add of two distinct graph values, without alpha."""
    return node.op == "call_function" and node.target == aten.add.Tensor and not node.kwargs \
        and len(node.args) == 2 and all(isinstance(a, Node) for a in node.args) \
        and node.args[0] is not node.args[1]


def linear_input(node: Node) -> Node:
    """The activation operand of aten.linear(x, W, b) or GPT-2's aten.addmm(b, x, W)."""
    return node.args[LINEAR_OPS[node.target][0]]


def unflattened(gm: GraphModule, x: Node) -> Node:
    """The [batch, seq, features] node a linear's 2-D input `x` was flattened from by views
    only (GPT-2's Conv1D: view(x, [-1, F]) then addmm), its first size the batch size of the
    graph's inputs; `x` itself when there is none (a [seq, batch, features] source is not)."""
    source = x
    while source.meta.get("val") is not None and source.meta["val"].dim() != 3 \
            and source.op == "call_function" and source.target in VIEWS:
        source = source.args[0]
    val = source.meta.get("val")
    if val is None or val.dim() != 3 or size_key(val.shape[0]) not in batch_sizes(gm):
        return x
    return source


def one_row_per_example(gm: GraphModule, x: Node) -> bool:
    """`x` is [batch, features] with the batch size of the graph's inputs as its first size
    (BERT's pooler reads each example's first token), not [batch·seq, features]."""
    val = x.meta.get("val")
    return val is not None and val.dim() == 2 and size_key(val.shape[0]) in batch_sizes(gm)


def batch_sizes(gm: GraphModule) -> set:
    """The first sizes of the graph's tensor inputs of two or more dimensions (`size_key`)."""
    return {size_key(node.meta["val"].shape[0]) for node in gm.graph.nodes
            if node.op == "placeholder" and isinstance(node.meta.get("val"), torch.Tensor)
            and node.meta["val"].dim() >= 2}


def size_key(size):
    """A traced size as something to compare: its symbolic expression (s0, s0*s1), or the int."""
    return size.node.expr if isinstance(size, torch.SymInt) else int(size)


def attr_tensor(gm: GraphModule, target: str) -> torch.Tensor:
    """The tensor a get_attr node's `target` names (a parameter, buffer or plain attribute)."""
    owner, _, name = target.rpartition(".")
    return getattr(gm.get_submodule(owner) if owner else gm, name)


def infer_value(gm: GraphModule, node: Node) -> None:
    """Give a node a pass added the `meta["val"]` export gives traced nodes: its op run on its
    inputs' fake values (get_attr tensors made fake in their mode), symbolic dims included.
    Nothing when no input has a fake value."""
    def value(arg):
        if not isinstance(arg, Node):
            return arg
        return attr_tensor(gm, arg.target) if arg.op == "get_attr" else arg.meta.get("val")
    args = [value(arg) for arg in node.args]
    fakes = [arg for arg in args if isinstance(arg, FakeTensor)]
    fakes += [t for arg in args if isinstance(arg, (list, tuple)) for t in arg
              if isinstance(t, FakeTensor)]
    if not fakes or any(arg is None for arg in args):
        return
    mode = fakes[0].fake_mode
    with mode:
        args = [mode.from_tensor(arg) if isinstance(arg, torch.Tensor)
                and not isinstance(arg, FakeTensor) else arg for arg in args]
        node.meta["val"] = node.target(*args)


def module_path(node: Node) -> str | None:
    """The innermost module a node was traced in."""
    stack = node.meta.get("nn_module_stack")
    return list(stack.values())[-1][0] if stack else None


def graph_input(gm: GraphModule, name: str) -> Node:
    """The placeholder of input `name` (cached decoding's positions)."""
    for node in gm.graph.nodes:
        if node.op == "placeholder" and node.target == name:
            return node
    raise ModelError(f"the traced graph has no input '{name}' (the positions of its tokens)")


def in_module(node: Node, path: str) -> bool:
    return any(entry[0] == path for entry in node.meta.get("nn_module_stack", {}).values())


def splice(gm: GraphModule, output: Node, adapter_input: Node | None, target: str,
           adapter: nn.Module, method: str, keep_users: set[Node] = frozenset(),
           extra_args: tuple = ()) -> Node:
    """Register `adapter` at `target` and make every user of `output` (but `keep_users`)
    read `output + adapter(adapter_input, *extra_args)` instead (`adapter()` for an update
    that reads no input, as an expert stack's ΔW)."""
    gm.add_submodule(target, adapter)
    graph = gm.graph
    with graph.inserting_after(output):
        inputs = () if adapter_input is None else (adapter_input,)
        delta = graph.call_module(target, (*inputs, *extra_args))
    with graph.inserting_after(delta):
        total = graph.call_function(aten.add.Tensor, (output, delta))
    mark_inserted(delta, output, method)
    mark(total, output, method)
    skip = {delta, total, *keep_users}
    output.replace_all_uses_with(total, delete_user_cb=lambda user: user not in skip)
    return total


def wrap_output(gm: GraphModule, output: Node, target: str, adapter: nn.Module,
                method: str, extra_args: tuple = ()) -> Node:
    """Register `adapter` at `target`; every user of `output` reads
    `adapter(output, *extra_args)`."""
    gm.add_submodule(target, adapter)
    with gm.graph.inserting_after(output):
        wrapped = gm.graph.call_module(target, (output, *extra_args))
    mark(wrapped, output, method)
    output.replace_all_uses_with(wrapped, delete_user_cb=lambda user: user is not wrapped)
    return wrapped


def wrap_input(gm: GraphModule, node: Node, source: Node, target: str, adapter: nn.Module,
               method: str, extra_args: tuple = ()) -> Node:
    """Register `adapter` at `target`; `node` (only) reads `adapter(source, *extra_args)` for
    `source`."""
    gm.add_submodule(target, adapter)
    with gm.graph.inserting_before(node):
        wrapped = gm.graph.call_module(target, (source, *extra_args))
    mark(wrapped, source, method)
    node.replace_input_with(source, wrapped)
    return wrapped


def mark_inserted(new: Node, like: Node, method: str) -> None:
    """Module path (`like`'s) and inserting method metadata for a node a pass added."""
    new.meta["nn_module_stack"] = dict(like.meta.get("nn_module_stack", {}))
    new.meta[INSERTED] = method


def mark(new: Node, like: Node, method: str) -> None:
    """`mark_inserted`, and `like`'s value for an inserted node of the same shape."""
    mark_inserted(new, like, method)
    if "val" in like.meta:
        new.meta["val"] = like.meta["val"]


def linear_weight(node: Node) -> Node:
    """The get_attr node of the weight a linear node reads."""
    return node.args[LINEAR_OPS[node.target][1]]


def linear_bias(node: Node) -> Node | None:
    """The bias operand: aten.linear(x, W, b) or aten.addmm(b, x, W); None without bias."""
    if node.target == aten.addmm.default:
        return node.args[0]
    return node.args[2] if len(node.args) > 2 else None


def weight_transposed(node: Node) -> bool:
    """True when the layer stores its weight as [in, out] (GPT-2 Conv1D, traced as addmm)."""
    return node.target == aten.addmm.default


def dense_weight(gm: GraphModule, node: Node) -> torch.Tensor:
    """The layer's weight in nn.Linear layout [out, in] (a view for Conv1D)."""
    weight = gm.get_parameter(linear_weight(node).target)
    return weight.t() if weight_transposed(node) else weight


def swap_weight(gm: GraphModule, node: Node, target: str, dense: torch.Tensor) -> Node:
    """Make linear `node` read a new frozen parameter at `target` (given [out, in]) instead of
    its weight; the old weight leaves the graph module when nothing else reads it. The
    user's tensor is never modified."""
    old = linear_weight(node)
    value = dense.t() if weight_transposed(node) else dense
    owner, _, name = target.rpartition(".")
    gm.get_submodule(owner).register_parameter(name, nn.Parameter(value.contiguous(),
                                                                  requires_grad=False))
    with gm.graph.inserting_before(old):
        new = gm.graph.get_attr(target)
    new.meta = {k: v for k, v in old.meta.items() if k in ("val", "tensor_meta")}
    node.replace_input_with(old, new)
    if not old.users:
        drop_attr(gm, old)
    return new


def drop_attr(gm: GraphModule, node: Node) -> None:
    """Erase an unused get_attr node and its tensor from the graph module (only from it)."""
    target = node.target
    gm.graph.erase_node(node)
    if any(n.op == "get_attr" and n.target == target for n in gm.graph.nodes):
        return
    owner, _, name = target.rpartition(".")
    module = gm.get_submodule(owner) if owner else gm
    if name in module._parameters:
        del module._parameters[name]
    elif name in module._buffers:
        del module._buffers[name]


def factory(gm: GraphModule, weight_target: str) -> dict:
    """Device and dtype of an existing parameter, for building adapters beside it."""
    weight = gm.get_parameter(weight_target)
    return {"device": weight.device, "dtype": weight.dtype}


# ---- attention ops and positions (prefix and prompt methods) ------------------------------

SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")


def attention_op(gm: GraphModule, path: str) -> Node:
    """The one scaled_dot_product_attention node traced inside module `path`."""
    found = [n for n in gm.graph.nodes if n.op == "call_function" and n.target == SDPA
             and in_module(n, path)]
    if not found:
        raise ModelError(f"module '{path}' computes no scaled_dot_product_attention in the "
                         "traced graph: prefix methods rewrite that op, so they need attention "
                         "that runs through it (the model's 'sdpa' implementation; T5's, MPT's "
                         "and DeBERTa's compute their scores themselves)")
    if len(found) > 1:
        raise ModelError(f"module '{path}' has {len(found)} scaled_dot_product_attention ops in "
                         "the traced graph; a prefix goes on a module with exactly one")
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


def position_inputs(gm: GraphModule, within: list[str] | None = None
                    ) -> list[tuple[Node, Node]]:
    """(consumer, position ids) pairs: where integer positions enter a *RotaryEmbedding
    module or an absolute position table (`targets.POSITION_TABLES`); with `within`, only
    those inside the modules it names (an encoder-decoder's decoder)."""
    found = []
    for node in gm.graph.nodes:
        stack = list(node.meta.get("nn_module_stack", {}).values())
        if node.op != "call_function" or not stack:
            continue
        path, type_name = stack[-1][0], str(stack[-1][1])
        if not (type_name.endswith("RotaryEmbedding")
                or any(matches(table, path) for table in POSITION_TABLES)):
            continue
        if within is not None and not any(path.startswith(f"{w}.") for w in within):
            continue
        for arg in node.all_input_nodes:
            val = arg.meta.get("val")
            outside = not in_module(arg, path)
            if outside and isinstance(val, torch.Tensor) and not val.is_floating_point():
                found.append((node, arg))
    return found


def reads_position_table(gm: GraphModule, within: list[str] | None = None) -> bool:
    """Whether positions index a learned table (`targets.POSITION_TABLES`) rather than a
    rotary embedding: the table's rows then bound the sequence, virtual tokens included."""
    return any(not str(list(consumer.meta["nn_module_stack"].values())[-1][1])
               .endswith("RotaryEmbedding") for consumer, _ in position_inputs(gm, within))


def shift_positions(gm: GraphModule, offset: int, method: str,
                    within: list[str] | None = None) -> int:
    """Add `offset` to the position ids where they enter the position encoding (inside the
    modules `within` names, when given)."""
    found = position_inputs(gm, within)
    if not found:
        tables = " or ".join(POSITION_TABLES)
        raise ModelError(f"{method}: cannot find where positions enter the model (no rotary "
                         f"embedding module and no absolute position table named {tables})")
    for consumer, positions in found:
        with gm.graph.inserting_before(consumer):
            shifted = gm.graph.call_function(aten.add.Tensor, (positions, offset))
        mark_inserted(shifted, consumer, method)
        consumer.replace_input_with(positions, shifted)
    return len(found)
