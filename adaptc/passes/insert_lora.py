"""Pass: add a LoRA update beside every linear node assigned `lora` (DoRA sites are left to
`insert_dora`, mixtures to `insert_mixture`).

    linear(x, W₀, b)  →  linear(x, W₀, b) + <site>.lora(x)      (gated: the update × G_L(x);
                         GPT-2's Conv1D: <site>.lora(x, x₃) with x₃ the [B, S, F] input;
                         a [B, F] input, BERT's pooler: each row's own gate)
    init=pissa:          linear(x, <site>.lora.residual, b) + <site>.lora(x)

With PiSSA the layer reads a new frozen parameter W_res = W₀ − s·B·A registered on the
adapter; W₀ leaves the graph module (the user's model keeps it, unchanged).
"""
from __future__ import annotations

from torch.fx import GraphModule

from adaptc.methods.lora import LoraAdapter
from adaptc.passes.base import SITE, CompileContext, PassResult, assigned, misplaced, report
from adaptc.passes.graph import (dense_weight, factory, linear_input, linear_weight,
                                 one_row_per_example, splice, swap_weight, unflattened)


class InsertLora:
    name = "insert_lora"

    def run(self, gm: GraphModule, ctx: CompileContext) -> PassResult:
        count = pissa = 0
        if ctx.plan.mixture is not None:  # insert_mixture's
            return PassResult(gm, {"lora_inserted": 0})
        for node, assignment in assigned(gm, "lora"):
            site, config = node.meta[SITE], assignment.rule.config
            if config.dora:
                continue  # insert_dora's
            sequence = gate_input(ctx, gm, node, assignment) if config.gate else None
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


def gate_input(ctx: CompileContext, gm: GraphModule, node, assignment):
    """A gate averages σ(w·x + b) over each example's positions. None where the linear reads
    [batch, seq, features] itself, or [batch, features], one row per example (BERT's pooler:
    the gate of that row, a mean over one position); where it reads its tokens flattened
    (GPT-2's Conv1D: view(x, [-1, F]) then addmm), the [batch, seq, features] node they were
    flattened from; else a spec error."""
    x = linear_input(node)
    val = x.meta.get("val")
    if val is not None and val.dim() == 3 or one_row_per_example(gm, x):
        return None
    source = unflattened(gm, x)
    if source is x:
        shape = "untraced" if val is None else f"{val.dim()}-D"
        raise misplaced(ctx, assignment.rule.span_of("gate"),
                        f"gated LoRA on {assignment.site.describe()}: the traced input is "
                        f"{shape}, neither [batch, seq, features], [batch, features] nor "
                        "flattened from [batch, seq, features], so it has no example rows "
                        "for the gate; drop 'gate' for this target")
    return source
