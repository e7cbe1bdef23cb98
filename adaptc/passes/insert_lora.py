"""Pass: add a LoRA update beside every linear node assigned `lora` (DoRA sites are left to
`insert_dora`, mixtures to `insert_mixture`).

    linear(x, W₀, b)  →  linear(x, W₀, b) + <site>.lora(x)      (gated: the update × G_L(x);
                         GPT-2's Conv1D: <site>.lora(x, x₃) with x₃ the [B, S, F] input)
    init=pissa:          linear(x, <site>.lora.residual, b) + <site>.lora(x)

With PiSSA the layer reads a new frozen parameter W_res = W₀ − s·B·A registered on the
adapter; W₀ leaves the graph module (the user's model keeps it, unchanged).
"""
from __future__ import annotations

from torch.fx import GraphModule

from adaptc.methods.lora import LoraAdapter
from adaptc.passes.base import METHODS, SITE, CompileContext, PassResult, misplaced, report
from adaptc.passes.graph import (VIEWS, dense_weight, factory, linear_input, linear_weight,
                                 splice, swap_weight)


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
            sequence = gate_input(ctx, node, assignment) if config.gate else None
            adapter = LoraAdapter(config, site.in_features, site.out_features,
                                  **factory(gm, linear_weight(node).target))
            target = f"{site.path}.lora"
            splice(gm, node, linear_input(node), target, adapter, "lora",
                   extra_args=() if sequence is None else (sequence,))
            if config.init == "pissa":
                residual = adapter.init_pissa(dense_weight(gm, node))
                swap_weight(gm, node, f"{target}.residual", residual)
                pissa += 1
            ctx.sites.append(report(site, "lora", assignment, adapter))
            count += 1
        counts = {"lora_inserted": count, **({"pissa_residuals": pissa} if pissa else {})}
        return PassResult(gm, counts)


def gate_input(ctx: CompileContext, node, assignment):
    """A gate averages over the sequence: None where the linear reads [batch, seq, features]
    itself; where it reads them flattened (GPT-2's Conv1D: view(x, [-1, F]) then addmm), the
    [batch, seq, features] node it flattened; else a spec error."""
    source = linear_input(node)
    while source.meta.get("val") is not None and source.meta["val"].dim() != 3 \
            and source.op == "call_function" and source.target in VIEWS:
        source = source.args[0]
    val = source.meta.get("val")
    if val is None or val.dim() != 3:
        raise misplaced(ctx, assignment.rule.span_of("gate"),
                        f"gated LoRA on {assignment.site.describe()}: the traced input is not "
                        "[batch, seq, features]; drop 'gate' for this target")
    return None if source is linear_input(node) else source
