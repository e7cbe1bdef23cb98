"""Pass (infer mode): fold every additive weight-space update into its base weight.

    linear(x, W₀, b) + <site>.lora(x)  →  linear(x, W', b),   W' = W₀ + s·B·A
    (and likewise <site>.vera: ΔW = Λ_b·B·Λ_d·A, <site>.adalora: ΔW = s·P·Λ·Q)
    W₀ + <experts>.lora_<name>()        →  W'  (an expert stack, W'[e] = W₀[e] + s·B[e]·A[e])

W' is computed in float32, or float64 for float64 weights (`methods.precision.wide`), and
cast once to W₀'s dtype; for GPT-2's Conv1D (`aten.addmm(b, x, W)` with W [in, out]) the update is transposed. W' is a
new parameter of the graph module: the base weights are the user's tensors (torch.export
shares them), so they are never written. W' takes W₀'s name when W₀ feeds only this linear
node, which keeps the module's state dict in the base model's names; a weight read elsewhere
too (tied embeddings) gets a new name beside it. `gm.meta["adaptc.merged"]` maps each base
parameter name (`<layer>.weight`) to the graph module's name for the tensor that now stands
in for it (`base.record_merge`; merge_scaling and train_parameters write it too), which is
how the hf/ export finds them.
"""
from __future__ import annotations

from collections import Counter

import torch
from torch import nn
from torch.fx import GraphModule, Node

from adaptc.errors import WeightsError
from adaptc.graph_attrs import bind
from adaptc.methods.precision import wide
from adaptc.methods.quantize import Nf4Weight
from adaptc.passes.base import INSERTED, CompileContext, PassResult, record_merge
from adaptc.passes.graph import LINEAR_OPS, aten
from adaptc.passes.insert_expert_lora import METHOD as EXPERTS  # W₀ + ΔW of an expert stack

ADDITIVE = ("lora", "vera", "adalora")  # y = W₀x + b + ΔW·x: ΔW folds into W₀


class MergeWeights:
    name = "merge_weights"

    def run(self, gm: GraphModule, ctx: CompileContext) -> PassResult:
        users = ctx.user_modules()
        names = Counter(id(p) for _, p in gm.named_parameters(remove_duplicate=False))
        tied = {key for key, n in names.items() if n > 1}
        counts = {f"{method}_merged": 0 for method in (*ADDITIVE, EXPERTS)}
        for call in additive_calls(gm):
            counts[f"{call.meta[INSERTED]}_merged"] += 1
            merge_site(gm, call, users, tied)
        for target in dict.fromkeys(n.target for n in gm.graph.nodes
                                    if n.op == "call_module" and n.meta.get(INSERTED) == EXPERTS):
            counts[f"{EXPERTS}_merged"] += 1
            merge_expert_stack(gm, target, users, tied)
        return PassResult(gm, counts)


def merge_expert_stack(gm: GraphModule, target: str, users: frozenset[int],
                       tied: set[int]) -> None:
    """Replace every `W₀ + <target>()` by a read of W' = W₀ + ΔW, folded in float32 (or wider) and cast
    once (named as W₀ when nothing else reads W₀, as merged linear weights are)."""
    calls = [n for n in gm.graph.nodes if n.op == "call_module" and n.target == target]
    adds = [next(iter(call.users)) for call in calls]
    reads = {add.args[0] for add in adds}
    base = gm.get_parameter(next(iter(reads)).target)
    owner, _, name = target.rpartition(".")
    original = f"{owner}.{name.removeprefix('lora_')}"
    alone = all(len(read.users) == 1 for read in reads) and id(base) not in tied
    merged = original if alone else f"{owner}.merged_{name.removeprefix('lora_')}"
    delta = gm.get_submodule(target).delta_weight().to(base.device)
    with torch.no_grad():
        folded = nn.Parameter((wide(base) + delta).to(base.dtype), requires_grad=False)
    refuse_overflow(folded, original, "lora")
    bind(gm, merged, folded, users)
    for add, call in zip(adds, calls):
        with gm.graph.inserting_before(add):
            fresh = gm.graph.get_attr(merged)
        fresh.meta = {k: v for k, v in add.meta.items() if k in ("val", "tensor_meta")}
        add.replace_all_uses_with(fresh)
        gm.graph.erase_node(add)
        gm.graph.erase_node(call)
    for read in reads:
        if not read.users:
            gm.graph.erase_node(read)
    gm.delete_submodule(target)
    record_merge(gm, owner, name.removeprefix("lora_"), merged)



def additive_calls(gm: GraphModule) -> list[Node]:
    """The call_module nodes of updates the insertion splice added to a linear output and
    that have a fixed ΔW (a gated LoRA update depends on the input: it stays unmerged)."""
    return [n for n in gm.graph.nodes if n.op == "call_module"
            and n.meta.get(INSERTED) in ADDITIVE
            and hasattr(gm.get_submodule(n.target), "delta_weight")
            and getattr(gm.get_submodule(n.target), "gate", None) is None]


def merge_site(gm: GraphModule, call: Node, users: frozenset[int], tied: set[int]) -> None:
    """Replace `linear + update(x)` by `linear` on a merged weight (recorded: record_merge).

    `users`: ids of the user's modules, which must never receive the merged weight;
    `tied`: ids of parameters registered under more than one name."""
    (add,) = call.users
    linear = add.args[0]
    if add.target != aten.add.Tensor or linear.op != "call_function" or linear.target not in LINEAR_OPS:
        raise RuntimeError(f"{call.target}: expected linear + update(x), found {add.format_node()}")
    position = LINEAR_OPS[linear.target][1]
    weight = linear.args[position]
    adapter = gm.get_submodule(call.target)
    target = merged_name(gm, weight, call.target, tied)
    folded = merged_weight(base_weight(gm, weight, call), adapter, linear.target)
    refuse_overflow(folded, call.target.rpartition(".")[0], call.meta[INSERTED])
    bind(gm, target, folded, users)
    if target != weight.target:
        with gm.graph.inserting_before(linear):
            fresh = gm.graph.get_attr(target)
        fresh.meta = {k: v for k, v in weight.meta.items() if k in ("val", "tensor_meta")}
        linear.update_arg(position, fresh)
    add.replace_all_uses_with(linear)
    gm.graph.erase_node(add)
    gm.graph.erase_node(call)
    gm.delete_submodule(call.target)
    if not weight.users:  # PiSSA's residual (gone with its adapter), a QLoRA NF4 weight
        gm.graph.erase_node(weight)
        if weight.op == "call_module":
            gm.delete_submodule(weight.target)
    record_merge(gm, call.target.rpartition(".")[0], "weight", target)


def base_weight(gm: GraphModule, weight: Node, call: Node) -> torch.Tensor:
    """The weight the linear reads: a parameter (PiSSA: the residual), or, for a `quantize`d
    layer, its NF4 weight dequantised — QLoRA merges into a dequantised copy (no
    re-quantisation, so the merged graph computes what the train-mode graph does)."""
    if weight.op == "get_attr":
        return gm.get_parameter(weight.target)
    if weight.op == "call_module" and isinstance(gm.get_submodule(weight.target), Nf4Weight):
        with torch.no_grad():
            return gm.get_submodule(weight.target)()
    raise RuntimeError(f"{call.target}: the base weight is computed ({weight.format_node()}), "
                       "not a parameter; it cannot be merged")


def merged_weight(base: torch.Tensor, adapter: nn.Module, op) -> nn.Parameter:
    """W₀ + ΔW in float32 or wider (`adapter.delta_weight()`, e.g. s·B·A), cast once to W₀'s dtype
    (transposed for addmm's [in, out])."""
    delta = adapter.delta_weight().to(base.device)
    if op == aten.addmm.default:
        delta = delta.t()
    with torch.no_grad():
        return nn.Parameter((wide(base) + delta).to(base.dtype), requires_grad=False)


def refuse_overflow(folded: torch.Tensor, site: str, method: str) -> None:
    """A merged weight with NaN or infinite values (adapter weights finite but so large that
    W₀ + ΔW overflows the weight's dtype, float16's 65504 first): the merge wrote it and
    an infer artifact was exported with NaN outputs ('max abs error nan')."""
    if not folded.is_meta and not torch.isfinite(folded).all():  # meta: shapes, no values
        raise WeightsError(f"{site}: merging its {method} update gives NaN or infinite "
                           f"weights in {str(folded.dtype).removeprefix('torch.')} (adapter "
                           "weights this large overflow the model's dtype)")


def merged_name(gm: GraphModule, weight: Node, adapter_target: str, tied: set[int]) -> str:
    """W₀'s own name when only this linear reads it, else a new name beside the adapter
    (also for a weight the adapter owns, PiSSA's residual, or one computed by NF4)."""
    own = weight.op == "get_attr" and not weight.target.startswith(adapter_target + ".")
    if own and len(weight.users) == 1 and id(gm.get_parameter(weight.target)) not in tied:
        return weight.target
    return f"{adapter_target.rpartition('.')[0]}.merged_weight"
