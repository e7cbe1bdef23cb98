"""Pass: add an AdaLoRA update beside every linear node assigned `adalora`.

    linear(x, W₀, b)  →  linear(x, W₀, b) + <site>.adalora(x)

The rank-budget schedule is not part of the graph: `adaptc.AdaLoraAllocator(module)` finds
the inserted adapters and prunes their triplets during training.
"""
from __future__ import annotations

from torch.fx import GraphModule

from adaptc.methods.adalora import AdaLoraAdapter
from adaptc.passes.base import SITE, CompileContext, PassResult, assigned, build_sized, report
from adaptc.passes.graph import factory, linear_input, linear_weight, splice


class InsertAdaLora:
    name = "insert_adalora"

    def run(self, gm: GraphModule, ctx: CompileContext) -> PassResult:
        count = 0
        for node, assignment in assigned(gm, "adalora"):
            site = node.meta[SITE]
            adapter = build_sized(
                ctx, assignment.rule, "init_r", f"'{site.path}'",
                lambda **kw: AdaLoraAdapter(assignment.rule.config, site.in_features,
                                            site.out_features, **kw),
                **factory(gm, linear_weight(node).target))
            splice(gm, node, linear_input(node), f"{site.path}.adalora", adapter, "adalora")
            ctx.sites.append(report(site, "adalora", assignment, adapter))
            count += 1
        return PassResult(gm, {"adalora_inserted": count})
