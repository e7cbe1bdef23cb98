"""Pass: store the weight of every linear node assigned `quantize` as NF4 and dequantise it
in the graph.

    get_attr W  →  <site>.nf4()   (the linear and the adapters inserted on it: DoRA's direction)

Runs after the adapter insertions, so it quantises what the layer finally reads (with
init=pissa: the residual, as QLoRA + PiSSA do) and adapters that read the weight see the
dequantised one. The float weight leaves the graph module unless a module of the model
itself reads it too (a tied input embedding keeps its exact float weight, which the report's
`weight_bytes_after` counts); the user's tensor is unchanged.
"""
from __future__ import annotations

import torch
from torch.fx import GraphModule

from adaptc.errors import ModelError
from adaptc.methods.quantize import Nf4Weight
from adaptc.passes.base import INSERTED, SITE, CompileContext, PassResult, assigned, build_sized
from adaptc.passes.graph import drop_attr, linear_weight


class QuantizeWeights:
    name = "quantize_weights"

    def run(self, gm: GraphModule, ctx: CompileContext) -> PassResult:
        count = before = 0
        for node, assignment in assigned(gm, "quantize"):
            site, old = node.meta[SITE], linear_weight(node)
            owner, _, name = old.target.rpartition(".")
            weight = getattr(gm.get_submodule(owner) if owner else gm, name)
            check_finite(weight, old.target)
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
            for reader in [u for u in old.users if u is node or u.meta.get(INSERTED)]:
                reader.replace_input_with(old, new)
            if not old.users:
                drop_attr(gm, old)
            before += weight.numel() * weight.element_size()
            ctx.sites.append({"path": site.path, "method": "quantize/nf4", "type": site.type_name,
                              "line": assignment.rule.statement.span.line, "in": site.in_features,
                              "out": site.out_features, "params": 0})
            count += 1
        counts = {"quantize_inserted": count}
        if count:
            counts["weight_bytes_before"] = before  # after: compiler.stored_weight_bytes
        return PassResult(gm, counts)


def check_finite(weight: torch.Tensor, name: str) -> None:
    """NaN or infinity in a weight would make its block's absmax, and with double quantisation
    the mean of every constant, NaN: the whole dequantised weight NaN, found only at run time.
    A weight on `meta` (a model counted, not run) holds no values to check."""
    if weight.device.type != "meta" and not torch.isfinite(weight).all():
        bad = (~torch.isfinite(weight)).sum().item()
        raise ModelError(f"quantize: tensor '{name}' has {bad} NaN or infinite value(s); "
                         "NF4 cannot store them")
