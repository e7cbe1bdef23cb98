"""Pass: replace every linear node assigned `lora ... dora` by its DoRA form.

    linear(x, W₀, b)  →  base = linear(x, W₀, b);  base + <site>.dora(x, W₀, b, base)

The base weight and bias reach the adapter as graph inputs (their get_attr nodes), so the
module stores no copy and the direction norm always reads the layer's current weight.
With init=pissa the residual is swapped in first and the magnitude starts at
‖W_res + s·B·A‖ = ‖W₀‖, as in PEFT.
"""
from __future__ import annotations

from torch.fx import GraphModule

from adaptc.methods.dora import DoraAdapter
from adaptc.passes.base import SITE, CompileContext, PassResult, assigned, report
from adaptc.passes.graph import (dense_weight, factory, linear_bias, linear_input, linear_weight,
                                 splice, swap_weight, weight_transposed)


class InsertDora:
    name = "insert_dora"

    def run(self, gm: GraphModule, ctx: CompileContext) -> PassResult:
        count = 0
        if ctx.plan.mixture is not None:  # insert_mixture's
            return PassResult(gm, {"dora_inserted": 0})
        for node, assignment in assigned(gm, "lora"):
            site, config = node.meta[SITE], assignment.rule.config
            if not config.dora:
                continue
            adapter = DoraAdapter(config, site.in_features, site.out_features,
                                  weight_transposed(node),
                                  **factory(gm, linear_weight(node).target))
            target = f"{site.path}.dora"
            gm.add_submodule(target, adapter)
            if config.init == "pissa":
                residual = adapter.init_pissa(dense_weight(gm, node))
                swap_weight(gm, node, f"{target}.residual", residual)
            adapter.init_magnitude(dense_weight(gm, node))
            splice(gm, node, linear_input(node), target, adapter, "dora",
                   extra_args=(linear_weight(node), linear_bias(node), node))
            ctx.sites.append(report(site, "dora", assignment, adapter))
            count += 1
        return PassResult(gm, {"dora_inserted": count})
