"""Pass (infer mode, last): call torch's Python bindings instead of aten overloads.

An exported graph calls `torch.ops.aten.mul.Tensor(a, b)`: OpOverload's Python `__call__`,
then the dispatcher. `torch.mul(a, b)` reaches the same kernel through torch's generated C++
argument parser, about 0.5–1 µs less per call on this machine's CPU. Small-batch inference
and token-by-token decoding run a few thousand such calls per forward (a 22-layer Llama:
~1450), and the graph's host time decides latency wherever kernels are short. The pass also
removes nodes that compute nothing at inference: eval-mode dropout, casts to the dtype a
tensor already has, and export's dtype assertions (a compiled module's inputs are checked
before it runs, `InputCheck`; every other dtype follows from the weights). With the module
shortcuts below, the traced graph of a 22-layer Llama went from 1.5× the eager Hugging Face
model's host time to 0.76× (benchmarks/host_overhead.py, RESULTS.md).

The generated code reads each weight through an attribute chain
(`getattr(self.model.layers, "0").self_attn.q_proj.weight`), and nn.Module keeps submodules
in `_modules`, so every link is a call to the Python-level `Module.__getattr__`: a fifth of
the bound graph's host time. `shortcut_modules` also sets each submodule on those chains in
its parent's instance dict, where attribute lookup finds it without that call. Only modules
are shortcut, never tensors (`Module.to` replaces buffers, which must still be read from
`_buffers`); setting a submodule through `Module.__setattr__` drops the shortcut, and the
graph's own containers are the compiler's, not the user's modules.

Only ops whose binding takes the same arguments under the same names are bound (`BINDINGS`);
the rest (slices, index ops, in-place cache updates, adaptc's custom ops) stay as they are.
Each bound node keeps its overload in `meta[ATEN]` for anything that needs the schema.
`bind_ops` also serves graphs that were not compiled here (a loaded `.pt2` program's module).
"""
from __future__ import annotations

import torch
from torch.fx import GraphModule, Node

from adaptc.passes.base import CompileContext, PassResult

aten = torch.ops.aten
ATEN = "adaptc.aten"  # on a bound node: the aten overload it called

# overload → the Python binding that parses the same arguments into the same kernel call
BINDINGS = {
    aten.add.Tensor: torch.add,
    aten.sub.Tensor: torch.sub,
    aten.mul.Tensor: torch.mul,
    aten.div.Tensor: torch.div,
    aten.pow.Tensor_Scalar: torch.pow,
    aten.neg.default: torch.neg,
    aten.rsqrt.default: torch.rsqrt,
    aten.tanh.default: torch.tanh,
    aten.cos.default: torch.cos,
    aten.sin.default: torch.sin,
    aten.mean.dim: torch.mean,
    aten.min.other: torch.min,
    aten.where.self: torch.where,
    aten.where.ScalarOther: torch.where,
    aten.le.Tensor: torch.le,
    aten.lt.Scalar: torch.lt,
    aten.gt.Scalar: torch.gt,
    aten.ge.Scalar: torch.ge,
    aten.__and__.Tensor: torch.bitwise_and,
    aten.linear.default: torch._C._nn.linear,
    aten.addmm.default: torch.addmm,
    aten.silu.default: torch._C._nn.silu,
    aten.gelu.default: torch._C._nn.gelu,
    aten.layer_norm.default: torch.layer_norm,
    aten.embedding.default: torch.embedding,
    aten.scaled_dot_product_attention.default: torch._C._nn.scaled_dot_product_attention,
    aten.arange.default: torch.arange,
    aten.cat.default: torch.cat,
    aten.split_with_sizes.default: torch.split_with_sizes,
    aten.unsqueeze.default: torch.unsqueeze,
    aten.transpose.int: torch.transpose,
    aten.permute.default: torch.permute,
    aten.select.int: torch.select,
    aten.reshape.default: torch.reshape,
    aten.view.default: torch.Tensor.view,
    aten.expand.default: torch.Tensor.expand,
    aten.contiguous.default: torch.Tensor.contiguous,
    aten.to.dtype: torch.Tensor.to,
    aten.to.device: torch.Tensor.to,
}


class BindOps:
    name = "bind_ops"

    def run(self, gm: GraphModule, ctx: CompileContext) -> PassResult:
        return PassResult(gm, bind_ops(gm))


def bind_ops(gm: GraphModule) -> dict[str, int]:
    """Rewrite `gm` in place (see the module docstring) and recompile it; the counts."""
    bound = dropped = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function":
            continue
        if computes_nothing(node):
            if node.users:
                node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
            dropped += 1
        elif node.target in BINDINGS:
            node.meta[ATEN] = node.target
            node.target = BINDINGS[node.target]
            bound += 1
    gm.recompile()
    return {"ops_bound": bound, "nodes_dropped": dropped, "modules_shortcut": shortcut_modules(gm)}


def shortcut_modules(gm: GraphModule) -> int:
    """Put the submodules on get_attr and call_module paths in their parents' `__dict__`."""
    done = set()
    for node in gm.graph.nodes:
        if node.op not in ("get_attr", "call_module"):
            continue
        parent = gm
        for name in node.target.split("."):
            child = parent._modules.get(name)
            if child is None:
                break
            if (id(parent), name) not in done:
                parent.__dict__[name] = child
                done.add((id(parent), name))
            parent = child
    return len(done)


def aten_op(node: Node):
    """The target `node` computes: its aten overload, whether or not it was bound since."""
    return node.meta.get(ATEN, node.target)


def computes_nothing(node: Node) -> bool:
    """Export's dtype assertion, dropout with train=False, a cast to the dtype it has."""
    if node.target is aten._assert_tensor_metadata.default:
        return not node.users
    if node.target is aten.dropout.default:
        return node.args[2] is False
    if node.target is aten.to.dtype and not node.kwargs and len(node.args) == 2:
        value = node.args[0].meta.get("val") if isinstance(node.args[0], Node) else None
        return isinstance(value, torch.Tensor) and value.dtype == node.args[1]
    return False
