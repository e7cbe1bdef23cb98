"""Pass: a linear layer traced as `x @ Wᵀ (+ b)` becomes one aten.linear node.

Falcon's FalconLinear (an nn.Linear) computes `input @ self.weight.T + self.bias`, which
torch.export records as aten.numpy_T, aten.matmul and aten.add instead of aten.linear.
Every later pass finds linear layers by aten.linear / aten.addmm, so this pass rewrites the
adapted layers of that form first: `linear(x, W, b)` is the same product. Layers no
statement adapts keep their traced ops.
"""
from __future__ import annotations

from torch.fx import GraphModule, Node

from adaptc.passes.base import CompileContext, PassResult
from adaptc.passes.graph import aten, is_linear, module_path

TRANSPOSES = (aten.numpy_T.default, aten.t.default)


class CanonicalizeLinears:
    name = "canonicalize_linears"

    def run(self, gm: GraphModule, ctx: CompileContext) -> PassResult:
        wanted = {a.site.path for a in ctx.assignments if a.site.kind == "linear"}
        traced = {module_path(n) for n in gm.graph.nodes if is_linear(n)}
        rewritten = 0
        for node in list(gm.graph.nodes):
            path = module_path(node) if node.op == "call_function" else None
            if path in wanted and path not in traced:
                operands = transposed_matmul(node, path)
                if operands is not None:
                    rewrite(gm, node, *operands)
                    rewritten += 1
        return PassResult(gm, {"linears_canonicalized": rewritten} if rewritten else {})


def transposed_matmul(node: Node, path: str) -> tuple[Node, Node] | None:
    """(x, W) when `node` is `matmul(x, transpose(W))` and W is the weight of module `path`."""
    if node.target != aten.matmul.default:
        return None
    x, transposed = node.args
    if not (isinstance(transposed, Node) and transposed.target in TRANSPOSES):
        return None
    weight = transposed.args[0]
    return (x, weight) if isinstance(weight, Node) and owned_by(weight, path, "weight") else None


def rewrite(gm: GraphModule, matmul: Node, x: Node, weight: Node) -> None:
    """Replace `matmul` (and the bias add of its module right after it) with aten.linear."""
    path = module_path(matmul)
    users = list(matmul.users)
    bias_add = users[0] if len(users) == 1 and adds_bias(users[0], matmul, path) else None
    last = bias_add or matmul
    bias = bias_add.args[1] if bias_add is not None else None
    with gm.graph.inserting_before(last):
        linear = gm.graph.call_function(aten.linear.default,
                                        (x, weight) if bias is None else (x, weight, bias))
    linear.meta = dict(last.meta)
    last.replace_all_uses_with(linear)
    for dead in (bias_add, matmul, matmul.args[1]):
        if dead is not None and not dead.users:
            gm.graph.erase_node(dead)


def adds_bias(node: Node, matmul: Node, path: str) -> bool:
    """Whether `node` is `matmul + <path>.bias` (FalconLinear with bias)."""
    if node.target != aten.add.Tensor or len(node.args) != 2 or node.args[0] is not matmul:
        return False
    bias = node.args[1]
    return isinstance(bias, Node) and owned_by(bias, path, "bias")


def owned_by(node: Node, path: str, name: str) -> bool:
    """Whether `node` reads tensor `name` of module `path` (inside a wrapper, as when decoding)."""
    return node.op == "get_attr" and (node.target == f"{path}.{name}"
                                      or node.target.endswith(f".{path}.{name}"))
