"""Pass: when the spec has a `mixture` statement (`moe`, `loramoe`), every LoRA site becomes a
routed mixture of LoRA experts (MoLoRA, LoRAMoE: the rank, alpha and dropout of its LoRA
statement) and every (IA)³ site a routed mixture of (IA)³ vectors (MoV); experts per layer
from the mixture statement.

    lora:             linear(x, W₀, b)  →  linear(x, W₀, b) + <site>.moe(x)
    ia3:              linear(x, W₀, b)  →  <site>.mov(linear(x, W₀, b), x)
    ia3 feedforward:  linear(x, W₀, b)  →  linear(<site>.mov(x), W₀, b)

loramoe where the layer reads its tokens flattened (GPT-2's Conv1D), in train mode: the
mixture also reads x₃, the [B, S, F] tensor x was flattened from, to record its routing per
example for the balancing loss: <site>.moe(x, x₃), <site>.mov(y, x, x₃), <site>.mov(x, x, x₃);
where it reads [B, F], one row per example (BERT's pooler), x₃ = unsqueeze(x, 1).
"""
from __future__ import annotations

from torch.fx import GraphModule, Node

from adaptc.frontend.sites import stack_of
from adaptc.methods.mixture import MixtureOfLora, MixtureOfVectors
from adaptc.passes.base import (METHODS, SITE, CompileContext, PassResult, build_sized,
                                misplaced, report)
from adaptc.passes.graph import (aten, factory, infer_value, linear_input, linear_weight,
                                 mark_inserted, one_row_per_example, splice, unflattened,
                                 wrap_input, wrap_output)


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
                rows = example_rows(gm, ctx, site, x) if mixture.method == "loramoe" else ()
                if method == "lora":
                    splice(gm, node, x, f"{site.path}.moe", adapter, "moe", extra_args=rows)
                elif config.feedforward:
                    wrap_input(gm, node, x, f"{site.path}.mov", adapter, "mov",
                               (x, *rows) if rows else ())
                else:
                    wrap_output(gm, node, f"{site.path}.mov", adapter, "mov", (x, *rows))
                label = mixture.method if method == "lora" else "mov"  # moe, loramoe
                ctx.sites.append(report(site, f"{label}[{experts}]", assignment, adapter,
                                        mixture))
                count += 1
        return PassResult(gm, {"mixture_inserted": count})


def example_rows(gm: GraphModule, ctx: CompileContext, site, x: Node) -> tuple:
    """LoRAMoE's balancing sums each example's router weights over its positions, so it needs
    the batch rows. () where the linear reads [batch, seq, features] itself, and in infer mode
    (no balancing loss); where it reads its tokens flattened (GPT-2's Conv1D: view(x, [-1, F])
    then addmm), the [batch, seq, features] node they were flattened from, passed to the
    mixture as `sequence`; for [batch, features], one row per example (BERT's pooler),
    x as [batch, 1, features]; else a spec error."""
    val = x.meta["val"]
    if val.dim() == 3:
        return ()
    source = unflattened(gm, x)
    if source is x and not one_row_per_example(gm, x):
        raise misplaced(ctx, ctx.plan.mixture.statement.kind_span,
                        f"loramoe balances the router weights each example's tokens sum to, "
                        f"and '{site.path}' reads a {val.dim()}-D input that is neither "
                        "[batch, seq, features], [batch, features] nor flattened from "
                        "[batch, seq, features]: no example rows to sum")
    if ctx.mode != "train":
        return ()
    if source is x:
        with gm.graph.inserting_after(x):
            source = gm.graph.call_function(aten.unsqueeze.default, (x, 1))
        mark_inserted(source, x, "moe")
        infer_value(gm, source)
    return (source,)
