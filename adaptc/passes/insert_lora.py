"""Pass: add a LoRA update beside every linear node assigned `lora`.

    linear(x, W₀, b)  →  linear(x, W₀, b) + <site>.lora(x)      (gated: the update × G_L(x))
"""
from __future__ import annotations

from torch.fx import GraphModule

from adaptc.errors import ModelError
from adaptc.methods.lora import LoraAdapter
from adaptc.passes.base import METHODS, SITE, CompileContext, PassResult
from adaptc.passes.graph import LINEAR_OPS, factory, linear_input, splice


class InsertLora:
    name = "insert_lora"

    def run(self, gm: GraphModule, ctx: CompileContext) -> PassResult:
        count = 0
        for node in list(gm.graph.nodes):
            assignment = node.meta.get(METHODS, {}).get("lora")
            if assignment is None or ctx.plan.mixture is not None:
                continue
            site = node.meta[SITE]
            if assignment.rule.config.gate:
                check_gate_input(node, site)
            weight = node.args[LINEAR_OPS[node.target][1]].target
            adapter = LoraAdapter(assignment.rule.config, site.in_features, site.out_features,
                                  **factory(gm, weight))
            splice(gm, node, linear_input(node), f"{site.path}.lora", adapter, "lora")
            ctx.sites.append(report(site, "lora", assignment, adapter))
            count += 1
        return PassResult(gm, count > 0, {"lora_inserted": count})


def check_gate_input(node, site) -> None:
    """A gate averages over the sequence: it needs the linear's input as [batch, seq, features]."""
    val = linear_input(node).meta.get("val")
    if val is None or val.dim() != 3:
        raise ModelError(f"gated LoRA on {site.describe()}: the traced input is not "
                         "[batch, seq, features] (GPT-2's Conv1D flattens it); drop 'gate' there")


def report(site, method: str, assignment, adapter) -> dict:
    """One row of the compile report: where, what, from which line, how many parameters."""
    return {"path": site.path, "method": method, "line": assignment.rule.statement.span.line,
            "in": site.in_features, "out": site.out_features,
            "params": sum(p.numel() for p in adapter.adapter_parameters().values())}
