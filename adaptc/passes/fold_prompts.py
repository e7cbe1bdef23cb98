"""Pass (infer mode): prefix reparameterisation MLPs and P-tuning prompt encoders become
the constant tensors they compute with the trained weights (`adaptc.fold_prompts`), so the
inference graph carries learned prefixes and prompts, not the networks that made them."""
from __future__ import annotations

from torch.fx import GraphModule

from adaptc.adapters import fold_prompts
from adaptc.passes.base import CompileContext, PassResult


class FoldPrompts:
    name = "fold_prompts"

    def run(self, gm: GraphModule, ctx: CompileContext) -> PassResult:
        folded = fold_prompts(gm)
        return PassResult(gm, {"prompts_folded": folded})
