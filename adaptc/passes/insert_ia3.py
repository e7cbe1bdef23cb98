"""Pass: rescale the output (or, with `feedforward`, the input) of every linear node
assigned `ia3` (with a mixture statement, `insert_mixture` puts MoV there instead).

    output:       linear(x, W₀, b)  →  <site>.ia3(linear(x, W₀, b))
    feedforward:  linear(x, W₀, b)  →  linear(<site>.ia3(x), W₀, b)
"""
from __future__ import annotations

from torch.fx import GraphModule

from adaptc.methods.ia3 import Ia3Adapter
from adaptc.passes.base import SITE, CompileContext, PassResult, assigned, report
from adaptc.passes.graph import factory, linear_input, linear_weight, wrap_input, wrap_output


class InsertIa3:
    name = "insert_ia3"

    def run(self, gm: GraphModule, ctx: CompileContext) -> PassResult:
        count = 0
        if ctx.plan.mixture is not None:  # insert_mixture's
            return PassResult(gm, {"ia3_inserted": 0})
        for node, assignment in assigned(gm, "ia3"):
            site, config = node.meta[SITE], assignment.rule.config
            adapter = Ia3Adapter(config, site.in_features, site.out_features,
                                 **factory(gm, linear_weight(node).target))
            target = f"{site.path}.ia3"
            if config.feedforward:
                wrap_input(gm, node, linear_input(node), target, adapter, "ia3")
            else:
                wrap_output(gm, node, target, adapter, "ia3")
            where = "ia3/input" if config.feedforward else "ia3/output"
            ctx.sites.append(report(site, where, assignment, adapter))
            count += 1
        return PassResult(gm, {"ia3_inserted": count})
