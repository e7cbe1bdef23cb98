"""Pass: store the weight of every linear node assigned `quantize` as NF4 and dequantise it
in the graph.

    get_attr W  →  <site>.nf4()   (every reader of W: the linear, and DoRA's direction)

Runs after the adapter insertions, so it quantises what the layer finally reads (with
init=pissa: the residual, as QLoRA + PiSSA do) and adapters that read the weight see the
dequantised one. The float weight leaves the graph module; the user's tensor is unchanged.
"""
from __future__ import annotations

from torch.fx import GraphModule

from adaptc.methods.quantize import Nf4Weight
from adaptc.passes.base import INSERTED, METHODS, SITE, CompileContext, PassResult, build_sized
from adaptc.passes.graph import drop_attr, linear_weight


class QuantizeWeights:
    name = "quantize_weights"

    def run(self, gm: GraphModule, ctx: CompileContext) -> PassResult:
        count = before = after = 0
        for node in list(gm.graph.nodes):
            assignment = node.meta.get(METHODS, {}).get("quantize")
            if assignment is None:
                continue
            site, old = node.meta[SITE], linear_weight(node)
            owner, _, name = old.target.rpartition(".")
            weight = getattr(gm.get_submodule(owner) if owner else gm, name)
            config = assignment.rule.config
            stored = build_sized(ctx, assignment.rule, "block", f"'{site.path}'",  # E308
                                 lambda device, dtype: Nf4Weight(weight.to(device), config),
                                 weight.device, weight.dtype)
            target = f"{site.path}.nf4"
            gm.add_submodule(target, stored)
            with gm.graph.inserting_after(old):
                new = gm.graph.call_module(target, ())
            new.meta = {k: v for k, v in old.meta.items() if k in ("val", "tensor_meta")}
            new.meta[INSERTED] = "quantize"
            old.replace_all_uses_with(new)
            drop_attr(gm, old)
            before += weight.numel() * weight.element_size()
            after += stored.stored_bytes()
            ctx.sites.append({"path": site.path, "method": "quantize/nf4", "type": site.type_name,
                              "line": assignment.rule.statement.span.line, "in": site.in_features,
                              "out": site.out_features, "params": 0})
            count += 1
        counts = {"quantize_inserted": count}
        if count:
            counts.update({"weight_bytes_before": before, "weight_bytes_after": after})
        return PassResult(gm, counts)
