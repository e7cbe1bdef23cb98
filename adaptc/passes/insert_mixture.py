"""Pass: when the spec has a `mixture` statement, every LoRA site becomes a routed mixture of
LoRA experts (the rank, alpha and dropout of its LoRA statement; experts per layer from the
mixture statement).

    linear(x, W₀, b)  →  linear(x, W₀, b) + <site>.moe(x)
"""
from __future__ import annotations

from torch.fx import GraphModule

from adaptc.methods.mixture import MixtureOfLora
from adaptc.passes.base import METHODS, SITE, CompileContext, PassResult, report
from adaptc.passes.graph import factory, linear_input, linear_weight, splice


class InsertMixture:
    name = "insert_mixture"

    def run(self, gm: GraphModule, ctx: CompileContext) -> PassResult:
        if ctx.plan.mixture is None:
            return PassResult(gm, {"mixture_inserted": 0})
        mixture = ctx.plan.mixture.config
        count = 0
        for node in list(gm.graph.nodes):
            assignment = node.meta.get(METHODS, {}).get("lora")
            if assignment is None:
                continue
            site = node.meta[SITE]
            experts = mixture.experts_at(site.layer, ctx.n_layers)
            adapter = MixtureOfLora(assignment.rule.config, mixture, experts, site.in_features,
                                    site.out_features, **factory(gm, linear_weight(node).target))
            splice(gm, node, linear_input(node), f"{site.path}.moe", adapter, "moe")
            ctx.sites.append(report(site, f"moe[{experts}]", assignment, adapter))
            count += 1
        return PassResult(gm, {"mixture_inserted": count})
