"""Pass: only adapter parameters train (in infer mode, none do). Adapter modules declare theirs
through the `adapter_parameters()` protocol, so nothing is guessed from parameter names."""
from __future__ import annotations

from torch.fx import GraphModule

from adaptc.passes.base import CompileContext, PassResult


def adapter_parameter_ids(gm) -> set[int]:
    return {id(p) for m in gm.modules() if hasattr(m, "adapter_parameters")
            for p in m.adapter_parameters().values()}


class FreezeBase:
    name = "freeze_base"

    def run(self, gm: GraphModule, ctx: CompileContext) -> PassResult:
        trainable = adapter_parameter_ids(gm) if ctx.mode == "train" else set()
        frozen = 0
        for param in gm.parameters():
            param.requires_grad_(id(param) in trainable)
            frozen += id(param) not in trainable
        return PassResult(gm, {"params_frozen": frozen, "params_trainable": len(trainable)})
