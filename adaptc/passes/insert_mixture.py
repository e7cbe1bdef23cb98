"""Pass: when the spec has a `mixture` statement (`moe`, `loramoe`), every LoRA site becomes a
routed mixture of LoRA experts (MoLoRA, LoRAMoE: the rank, alpha and dropout of its LoRA
statement) and every (IA)³ site a routed mixture of (IA)³ vectors (MoV); experts per layer
from the mixture statement.

    lora:             linear(x, W₀, b)  →  linear(x, W₀, b) + <site>.moe(x)
    ia3:              linear(x, W₀, b)  →  <site>.mov(linear(x, W₀, b), x)
    ia3 feedforward:  linear(x, W₀, b)  →  linear(<site>.mov(x), W₀, b)
"""
from __future__ import annotations

from torch.fx import GraphModule

from adaptc.frontend.sites import stack_of
from adaptc.methods.mixture import MixtureOfLora, MixtureOfVectors
from adaptc.passes.base import (METHODS, SITE, CompileContext, PassResult, build_sized,
                                misplaced, report)
from adaptc.passes.graph import (factory, linear_input, linear_weight, splice, wrap_input,
                                 wrap_output)


class InsertMixture:
    name = "insert_mixture"

    def run(self, gm: GraphModule, ctx: CompileContext) -> PassResult:
        if ctx.plan.mixture is None:
            return PassResult(gm, {"mixture_inserted": 0})
        mixture = ctx.plan.mixture.config
        count = 0
        for node in list(gm.graph.nodes):
            methods = node.meta.get(METHODS, {})
            for method in ("lora", "ia3"):
                assignment = methods.get(method)
                if assignment is None:
                    continue
                site, config = node.meta[SITE], assignment.rule.config
                experts = mixture.experts_at(site.layer, ctx.depths.get(stack_of(site.path),
                                                                        ctx.n_layers))
                kind = MixtureOfLora if method == "lora" else MixtureOfVectors
                adapter = build_sized(
                    ctx, ctx.plan.mixture, "experts", f"'{site.path}'",
                    lambda **kw: kind(
                        config, mixture, experts, site.in_features, site.out_features, **kw),
                    **factory(gm, linear_weight(node).target))
                x = linear_input(node)
                if mixture.method == "loramoe" and x.meta["val"].dim() != 3:
                    raise misplaced(ctx, ctx.plan.mixture.statement.kind_span,
                                    f"loramoe balances each example's router weights, and "
                                    f"'{site.path}' reads its tokens flattened "
                                    f"({x.meta['val'].dim()}-D, GPT-2's Conv1D): no batch "
                                    "rows to weigh")
                if method == "lora":
                    splice(gm, node, x, f"{site.path}.moe", adapter, "moe")
                elif config.feedforward:
                    wrap_input(gm, node, x, f"{site.path}.mov", adapter, "mov")
                else:
                    wrap_output(gm, node, f"{site.path}.mov", adapter, "mov", (x,))
                label = mixture.method if method == "lora" else "mov"  # moe, loramoe
                ctx.sites.append(report(site, f"{label}[{experts}]", assignment, adapter,
                                        mixture))
                count += 1
        return PassResult(gm, {"mixture_inserted": count})
