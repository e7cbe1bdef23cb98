"""Pass: bind the resolved assignments to graph nodes.

Linear assignments (lora, moe, adapter on a projection) are recorded on the traced
aten.linear / aten.addmm node of their module; module-level adapters are bound later by
`insert_bottleneck`, because earlier insertions move module outputs.
"""
from __future__ import annotations

from torch.fx import GraphModule

from adaptc.errors import ModelError
from adaptc.passes.base import METHODS, SITE, CompileContext, PassResult
from adaptc.passes.graph import is_linear, module_path


class LocateSites:
    name = "locate_sites"

    def run(self, gm: GraphModule, ctx: CompileContext) -> PassResult:
        wanted = {a.site.path: a.site for a in ctx.assignments if a.site.kind == "linear"}
        calls: dict[str, int] = {}
        for node in gm.graph.nodes:
            path = module_path(node) if is_linear(node) else None
            if path in wanted:
                node.meta[SITE] = wanted[path]
                node.meta[METHODS] = {a.method: a for a in ctx.assignments if a.site.path == path}
                calls[path] = calls.get(path, 0) + 1
        missing = sorted(set(wanted) - set(calls))
        if missing:
            raise ModelError(unlocated(gm, missing[0]))
        repeated = sorted(p for p, n in calls.items() if n > 1)
        if repeated:
            raise ModelError(f"module '{repeated[0]}' is called {calls[repeated[0]]} times per "
                             "forward pass; adapting shared modules is not supported")
        return PassResult(gm, {"sites_located": len(calls)})


def unlocated(gm: GraphModule, path: str) -> str:
    """Why a linear site has no linear op: never called, or its forward computes otherwise
    (Falcon's FalconLinear is `x @ W.T + b`, traced as matmul and add)."""
    ops = sorted({str(getattr(n.target, "__name__", n.target)) for n in gm.graph.nodes
                  if n.op == "call_function" and module_path(n) == path})
    if not ops:
        return f"module '{path}' was not called in the traced forward pass; it cannot be adapted"
    return (f"module '{path}' computes no aten.linear or aten.addmm in the traced graph (its "
            f"ops: {', '.join(ops[:6])}), so a linear method cannot attach to it")
