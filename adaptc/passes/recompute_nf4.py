"""Pass (train mode): a linear layer on an NF4 weight dequantises it again in backward.

    linear(x, <site>.nf4(), b)  →  nf4_linear(x, <site>.nf4, b)
    addmm(b, x, <site>.nf4())   →  nf4_linear(x, <site>.nf4, b, transposed=True)   (Conv1D)

`aten.linear`'s autograd node saves its weight for the input gradient, so with the weight
dequantised in the graph every quantised layer's dense copy lived from its forward to its
backward: a training step's peak held the whole model in 16/32 bits. `nf4_linear` saves only
the NF4 module and dequantises once more in backward (bitsandbytes' `MatMul4Bit` trades the
same compute for the same memory). Readers of the dequantised weight other than the layer
(DoRA's weight norm, detached) keep calling `<site>.nf4()`. Infer mode keeps the plain linear: nothing
is saved for backward there, and the exported program needs aten ops.
"""
from __future__ import annotations

from torch.fx import GraphModule

from adaptc.methods.quantize import Nf4Weight, nf4_linear
from adaptc.passes.base import CompileContext, PassResult
from adaptc.passes.graph import (LINEAR_OPS, linear_bias, linear_input, linear_weight, mark,
                                 weight_transposed)


class RecomputeNf4:
    name = "recompute_nf4"

    def run(self, gm: GraphModule, ctx: CompileContext) -> PassResult:
        count = 0
        for weight in [n for n in gm.graph.nodes if n.op == "call_module"
                       and isinstance(gm.get_submodule(n.target), Nf4Weight)]:
            for layer in [u for u in weight.users if u.target in LINEAR_OPS and not u.kwargs
                          and linear_weight(u) is weight]:
                with gm.graph.inserting_before(layer):
                    module = gm.graph.get_attr(weight.target)
                    new = gm.graph.call_function(nf4_linear, (
                        linear_input(layer), module, linear_bias(layer), weight_transposed(layer)))
                mark(module, weight, "quantize")
                module.meta.pop("val", None)
                new.meta = dict(layer.meta)
                layer.replace_all_uses_with(new)
                gm.graph.erase_node(layer)
                count += 1
            if not weight.users:
                gm.graph.erase_node(weight)
        return PassResult(gm, {"nf4_recomputed": count})
