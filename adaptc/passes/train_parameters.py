"""Pass: the parameters selected by `train` statements become trainable copies.

    get_attr model.norm.weight  →  get_attr model.norm.trained.weight   (a trainable copy)

Graph reads are found by tensor identity, not by name (export may read a tied weight under
the other name: GPT-2's wte through `lm_head.weight`), and every read is redirected; the
copy is recorded as the parameter's stand-in (`base.record_merge`) for the hf/ export. Runs
after the insertion passes, so a selected weight that an adapter also reads (DoRA's
direction) is the trained one everywhere. A selected parameter the graph does not read (one
PiSSA replaced by its residual) is an error naming it.
"""
from __future__ import annotations

from torch import nn
from torch.fx import GraphModule, Node

from adaptc.methods.train import TrainedParameters
from adaptc.passes.base import INSERTED, CompileContext, PassResult, misplaced, record_merge
from adaptc.passes.graph import drop_attr


class TrainParameters:
    name = "train_parameters"

    def run(self, gm: GraphModule, ctx: CompileContext) -> PassResult:
        chosen = [a for a in ctx.assignments if a.method == "train"]
        if not chosen:
            return PassResult(gm, {"train_inserted": 0})
        readers = tensor_readers(gm)
        owners: dict[str, list] = {}
        for a in chosen:
            tensor = ctx.model.module.get_parameter(a.site.path)
            if not any(node.users for node in readers.get(id(tensor), [])):
                raise misplaced(ctx, a.target.span,
                                f"parameter '{a.site.path}' selected by `train` is not read by "
                                "the compiled graph (another method replaced it, e.g. "
                                "init=pissa)")
            owners.setdefault(a.site.path.rpartition(".")[0], []).append((a, tensor))
        for owner, found in owners.items():
            self.copy_owner(gm, ctx, owner, found, readers)
        return PassResult(gm, {"train_inserted": len(chosen)})

    def copy_owner(self, gm: GraphModule, ctx: CompileContext, owner: str, found: list,
                   readers: dict[int, list[Node]]) -> None:
        named = {a.site.path.rpartition(".")[2]: (a, tensor) for a, tensor in found}
        module = TrainedParameters({name: tensor for name, (_, tensor) in named.items()},
                                   undecayed_names(ctx.model.module.get_submodule(owner), named))
        target = f"{owner}.trained" if owner else "trained"
        gm.add_submodule(target, module)
        for name, (assignment, tensor) in named.items():
            old_nodes = readers[id(tensor)]
            with gm.graph.inserting_before(old_nodes[0]):
                new = gm.graph.get_attr(f"{target}.{name}")
            new.meta = {k: v for k, v in old_nodes[0].meta.items() if k in ("val", "tensor_meta")}
            new.meta[INSERTED] = "train"
            record_merge(gm, owner, name, f"{target}.{name}")
            for old in old_nodes:
                old.replace_all_uses_with(new)
                drop_attr(gm, old)
            ctx.sites.append({"path": assignment.site.path, "method": "train",
                              "line": assignment.rule.statement.span.line, "in": None,
                              "out": None, "params": tensor.numel()})


def undecayed_names(owner: nn.Module, names) -> tuple[str, ...]:
    """The selected tensors that take no weight decay: biases and nn.LayerNorm's tensors (PEFT's
    LoRA+ groups exempt the `nn.LayerNorm` type only, so RMSNorm weights are decayed there)."""
    return tuple(name for name in names if name == "bias" or isinstance(owner, nn.LayerNorm))


def tensor_readers(gm: GraphModule) -> dict[int, list[Node]]:
    """id(tensor) → the get_attr nodes that read it, under any of its names."""
    readers: dict[int, list[Node]] = {}
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            owner, _, name = node.target.rpartition(".")
            tensor = getattr(gm.get_submodule(owner) if owner else gm, name)
            readers.setdefault(id(tensor), []).append(node)
    return readers
