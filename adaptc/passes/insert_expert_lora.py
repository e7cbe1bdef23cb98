"""Pass: LoRA on mixture-of-experts weight stacks (PEFT's `target_parameters`).

    get_attr experts.gate_up_proj  →  experts.gate_up_proj + experts.lora_gate_up_proj()

Every graph read of the stack W₀ [E, d₁, d₂] (found by tensor identity, as `train_parameters`
finds them) now reads W₀ + ΔW, ΔW[e] = s·B[e]·A[e] computed by an `ExpertLora` module, so
however the model's experts use their weights (transformers' grouped matmul), each expert
computes with its adapted matrix and gradients reach A and B.
"""
from __future__ import annotations

from torch.fx import GraphModule

from adaptc.methods.lora import ExpertLora
from adaptc.passes.base import CompileContext, PassResult, misplaced, report
from adaptc.passes.graph import splice
from adaptc.passes.train_parameters import tensor_readers

METHOD = "expert_lora"  # the INSERTED mark: merge_weights folds these calls into W₀


class InsertExpertLora:
    name = "insert_expert_lora"

    def run(self, gm: GraphModule, ctx: CompileContext) -> PassResult:
        chosen = [a for a in ctx.assignments if a.method == "lora" and a.site.expert_stack]
        readers = tensor_readers(gm) if chosen else {}
        for assignment in chosen:
            site = assignment.site
            weight = ctx.model.module.get_parameter(site.path)
            nodes = [n for n in readers.get(id(weight), []) if n.users]
            if not nodes:
                raise misplaced(ctx, assignment.target.span,
                                f"expert stack '{site.path}' is not read by the traced graph; "
                                "lora cannot adapt it")
            owner, _, name = site.path.rpartition(".")
            target = f"{owner}.lora_{name}"
            module = ctx.model.module.get_submodule(owner)
            position = [n for n, _ in module.named_parameters(recurse=False)].index(name)
            adapter = ExpertLora(assignment.rule.config, site.shape, device=weight.device,
                                 dtype=weight.dtype, position=position,
                                 transposed=bool(getattr(module, "is_transposed", False)))
            for node in nodes:
                splice(gm, node, None, target, adapter, METHOD)
            row = report(site, "lora/expert", assignment, adapter)
            ctx.sites.append({**row, "shape": "×".join(map(str, site.shape))})
        return PassResult(gm, {"expert_lora_inserted": len(chosen)})
