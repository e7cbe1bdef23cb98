"""Pass: add a LoRA update beside every linear node assigned `lora` (DoRA sites are left to
`insert_dora`, mixtures to `insert_mixture`).

    linear(x, W₀, b)  →  linear(x, W₀, b) + <site>.lora(x)      (gated: the update × G_L(x))
    init=pissa:          linear(x, <site>.lora.residual, b) + <site>.lora(x)

With PiSSA the layer reads a new frozen parameter W_res = W₀ − s·B·A registered on the
adapter; W₀ leaves the graph module (the user's model keeps it, unchanged).
"""
from __future__ import annotations

from torch.fx import GraphModule

from adaptc.methods.lora import LoraAdapter
from adaptc.passes.base import METHODS, SITE, CompileContext, PassResult, misplaced, report
from adaptc.passes.graph import (dense_weight, factory, linear_input, linear_weight, splice,
                                 swap_weight)


class InsertLora:
    name = "insert_lora"

    def run(self, gm: GraphModule, ctx: CompileContext) -> PassResult:
        count = pissa = 0
        for node in list(gm.graph.nodes):
            assignment = node.meta.get(METHODS, {}).get("lora")
            if assignment is None or ctx.plan.mixture is not None:
                continue
            site, config = node.meta[SITE], assignment.rule.config
            if config.dora:
                continue  # insert_dora's
            if config.gate:
                check_gate_input(ctx, node, assignment)
            adapter = LoraAdapter(config, site.in_features, site.out_features,
                                  **factory(gm, linear_weight(node).target))
            target = f"{site.path}.lora"
            splice(gm, node, linear_input(node), target, adapter, "lora")
            if config.init == "pissa":
                residual = adapter.init_pissa(dense_weight(gm, node))
                swap_weight(gm, node, f"{target}.residual", residual)
                pissa += 1
            ctx.sites.append(report(site, "lora", assignment, adapter))
            count += 1
        counts = {"lora_inserted": count, **({"pissa_residuals": pissa} if pissa else {})}
        return PassResult(gm, counts)


def check_gate_input(ctx: CompileContext, node, assignment) -> None:
    """A gate averages over the sequence: it needs the linear's input as [batch, seq, features]."""
    val = linear_input(node).meta.get("val")
    if val is None or val.dim() != 3:
        raise misplaced(ctx, assignment.rule.span_of("gate"),
                        f"gated LoRA on {assignment.site.describe()}: the traced input is not "
                        "[batch, seq, features] (GPT-2's Conv1D flattens it); drop 'gate' "
                        "for this target")
