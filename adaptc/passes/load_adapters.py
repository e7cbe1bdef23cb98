"""Pass (infer mode): copy trained adapter weights into the inserted adapters before they are
merged or fused. Without a weights file the adapters keep their initial values (LoRA's B and
a bottleneck's up-projection start at zero, so the result equals the base model).

The file is what `adaptc.save_adapters` wrote from a train-mode module of the same spec;
names and shapes must match exactly (`adaptc.adapters.load_adapters`); with
`ctx.partial` (an encoder-decoder's two decoding graphs share one file) each graph
takes the tensors it has.
"""
from __future__ import annotations

from torch.fx import GraphModule

from adaptc.adapters import adapter_state_dict, load_adapters
from adaptc.passes.base import CompileContext, PassResult


class LoadAdapters:
    name = "load_adapters"

    def run(self, gm: GraphModule, ctx: CompileContext) -> PassResult:
        if ctx.adapters is None:
            return PassResult(gm, {"adapter_tensors_loaded": 0})
        load_adapters(gm, ctx.adapters, ctx.adapter_prefix, partial=ctx.partial,
                      sites=ctx.sites)
        ctx.loaded_adapters = frozenset(adapter_state_dict(gm))
        return PassResult(gm, {"adapter_tensors_loaded": len(ctx.loaded_adapters)})
