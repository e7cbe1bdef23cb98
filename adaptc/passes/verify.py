"""Pass: check the rewritten graph is well formed and every inserted module is reachable."""
from __future__ import annotations

from torch.fx import GraphModule

from adaptc.passes.base import INSERTED, CompileContext, PassResult


class Verify:
    name = "verify"

    def run(self, gm: GraphModule, ctx: CompileContext) -> PassResult:
        gm.graph.lint()
        called = {n.target for n in gm.graph.nodes if n.op == "call_module"}
        for target in called:
            gm.get_submodule(target)
        dead = [n.name for n in gm.graph.nodes if n.meta.get(INSERTED) and not n.users]
        if dead:
            raise RuntimeError(f"inserted nodes without users: {', '.join(dead)}")
        gm.recompile()
        return PassResult(gm, {"graph_nodes": len(gm.graph.nodes)})
