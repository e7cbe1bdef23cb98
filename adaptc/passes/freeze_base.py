"""Pass: only adapter parameters train (in infer mode, none do). Adapter modules declare theirs
through the `adapter_parameters()` protocol, so nothing is guessed from parameter names.

The graph reads the user's parameter objects; freezing them in place would switch off
`requires_grad` in the user's model too. A base parameter that requires grad is replaced by
a frozen alias of the same storage instead (one alias per tensor, so tied weights stay tied).
"""
from __future__ import annotations

from torch import nn
from torch.fx import GraphModule

from adaptc.passes.base import CompileContext, PassResult


def adapter_parameter_ids(gm) -> set[int]:
    return {id(p) for m in gm.modules() if hasattr(m, "adapter_parameters")
            for p in m.adapter_parameters().values()}


class FreezeBase:
    name = "freeze_base"

    def run(self, gm: GraphModule, ctx: CompileContext) -> PassResult:
        trainable = adapter_parameter_ids(gm) if ctx.mode == "train" else set()
        aliases: dict[int, nn.Parameter] = {}
        for module in gm.modules():
            for name, param in list(module.named_parameters(recurse=False,
                                                             remove_duplicate=False)):
                if id(param) in trainable:
                    param.requires_grad_(True)
                elif param.requires_grad:
                    if id(param) not in aliases:
                        aliases[id(param)] = nn.Parameter(param.detach(), requires_grad=False)
                    module.register_parameter(name, aliases[id(param)])
        frozen = sum(id(p) not in trainable for p in gm.parameters())
        return PassResult(gm, {"params_frozen": frozen, "params_trainable": len(trainable)})
