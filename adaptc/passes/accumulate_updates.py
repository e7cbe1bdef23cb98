"""Pass (infer mode): unmerged LoRA updates are added by the GEMM that computes them.

    y = linear(x, W);  u = linear(h, s·B);  out = y + u
      →  out = add_product_(linear(x, W), h, s·B)      y += h·(s·B)ᵀ in place: one addmm_

`fuse_siblings` leaves each unmerged LoRA site as a B GEMM and an add: the GEMM writes the
update u, the add reads y and u back and writes the sum, four passes over an output-sized
tensor besides the base GEMM's one write. `addmm_` on y (cuBLAS / BLAS with β = 1) reads y
once and writes it once: at 8×512 tokens on the Llama-shaped 1.1B, the H200's device time
for all-linear r16 was 1.17× the base model's, and those passes over the seven projection
outputs of 22 layers are ~6.6 GB of the extra. The sum is also rounded once, in the GEMM's
float32 accumulator, instead of twice.

Only an add whose left operand is a linear/mm/addmm output used by nothing else (GPT-2's
Conv1D projections are addmm), and whose right is
the site's B GEMM (no bias) in the same dtype, is rewritten: y is then a fresh contiguous
tensor no other node sees, so updating it in place is invisible outside the node. Export
and torch.compile trace through `add_product_` (functionalised to an out-of-place addmm).
"""
from __future__ import annotations

import torch
from torch.fx import GraphModule, Node

from adaptc.passes.base import INSERTED, CompileContext, PassResult
from adaptc.passes.graph import aten, attr_tensor

FRESH_OUTPUTS = {aten.linear.default, aten.mm.default, aten.addmm.default}  # GPT-2: addmm


def add_product_(out: torch.Tensor, h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """out += h·weightᵀ in place (one GEMM reading out), for out [..., n], h [..., r],
    weight [n, r]; returns out."""
    out.view(-1, out.shape[-1]).addmm_(h.reshape(-1, h.shape[-1]), weight.t())
    return out


class AccumulateUpdates:
    name = "accumulate_updates"

    def run(self, gm: GraphModule, ctx: CompileContext) -> PassResult:
        rewritten = 0
        for node in list(gm.graph.nodes):
            operands = update_operands(gm, node)
            if operands is None:
                continue
            base, update = node.args
            with gm.graph.inserting_before(node):
                fused = gm.graph.call_function(add_product_, (base, *operands))
            fused.meta.update(node.meta)
            fused.meta[INSERTED] = "lora"
            node.replace_all_uses_with(fused)
            gm.graph.erase_node(node)
            gm.graph.erase_node(update)
            rewritten += 1
        gm.recompile()
        return PassResult(gm, {"lora_updates_accumulated": rewritten})


def update_operands(gm: GraphModule, add: Node) -> tuple[Node, Node] | None:
    """(h, s·B) when `add` is y + linear(h, s·B) with y a fresh GEMM output only it reads,
    both in one dtype; else None."""
    if add.op != "call_function" or add.target != aten.add.Tensor or add.kwargs \
            or len(add.args) != 2 or not all(isinstance(a, Node) for a in add.args):
        return None
    base, update = add.args
    if update.op != "call_function" or update.target != aten.linear.default \
            or len(update.args) != 2 or update.kwargs or len(update.users) != 1 \
            or update.meta.get(INSERTED) != "lora" or update.args[1].op != "get_attr":
        return None
    if base.op != "call_function" or base.target not in FRESH_OUTPUTS or len(base.users) != 1:
        return None
    value, weight = base.meta.get("val"), attr_tensor(gm, update.args[1].target)
    if not isinstance(value, torch.Tensor) or weight.dtype != value.dtype \
            or weight.shape[0] != value.shape[-1]:
        return None
    return update.args
