"""The compiler driver: spec + model → validated plan → site assignments → traced graph →
passes → GraphModule with a compile report attached (`gm.meta["adaptc.report"]`): trainable
in train mode, merged and fused for inference in infer mode.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from itertools import chain
from pathlib import Path

import torch
from torch import nn
from torch.fx import GraphModule

from adaptc.errors import AdaptcError
from adaptc.frontend.models import LoadedModel, load_model, wrap
from adaptc.frontend.sites import layer_count, parameter_table, site_table, stack_depths
from adaptc.frontend.targets import resolve
from adaptc.frontend.trace import InputCheck, sequence_limit, trace
from adaptc.methods.quantize import Nf4Weight
from adaptc.passes import CompileContext, PassManager, default_pipeline
from adaptc.passes.base import MERGED
from adaptc.passes.fuse_projections import graph_tensor
from adaptc.pickling import compiled_module
from adaptc.spec import compile_spec, load_spec, lower
from adaptc.spec.ir import Plan

REPORT = "adaptc.report"
MODES = ("train", "infer")


@dataclass
class CompileReport:
    """What a compilation did: per-site rows, pass counts, parameter totals."""

    spec_path: str
    spec_source: str
    model: str
    mode: str
    sites: list[dict]
    counts: dict[str, int]
    trainable: int
    total: int
    pipeline: list[str] = field(default_factory=list)
    max_tokens: int | None = None  # longest token input: positions less virtual tokens'

    def peft_line(self) -> str:
        """The total in PEFT's `print_trainable_parameters` format."""
        share = 100 * self.trainable / self.total if self.total else 0.0
        return (f"trainable params: {self.trainable:,} || all params: {self.total:,} || "
                f"trainable%: {share:.4f}")


def as_plan(spec: str | Path | Plan) -> Plan:
    """A Plan from a Plan, a path to a .adapt file, or spec text."""
    if isinstance(spec, Plan):
        return spec
    if isinstance(spec, Path) or (isinstance(spec, str) and "\n" not in spec
                                  and spec.endswith(".adapt")):
        return lower(load_spec(str(spec)))
    if not isinstance(spec, str):
        raise TypeError(f"spec must be spec text, a path to a .adapt file or a Plan, "
                        f"got {type(spec).__name__}")
    return compile_spec(spec, "<string>")


def as_model(model: str | nn.Module | LoadedModel, example_inputs: dict | None) -> LoadedModel:
    if isinstance(model, LoadedModel):
        return model
    if isinstance(model, (str, Path)):
        return load_model(str(model))
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a preset name, a checkpoint directory or an "
                        f"nn.Module, got {type(model).__name__}")
    return wrap(model, example_inputs=example_inputs)


def prepare(model, spec, mode: str, example_inputs: dict | None = None,
            inside: str = "") -> CompileContext:
    """Everything before tracing: the plan, the model, and where each method goes.

    `inside` is where the user's model sits in a wrapper (cached decoding: "model."): the
    spec is resolved against the model's own module names, which its errors show as
    `compile` and `adaptc inspect` do, and the sites then take the wrapper's paths."""
    if mode not in MODES:
        raise AdaptcError(f"unknown mode '{mode}': choose one of {', '.join(MODES)}")
    plan, loaded = as_plan(spec), as_model(model, example_inputs)
    root = loaded.module.get_submodule(inside.removesuffix(".")) if inside else loaded.module
    sites = site_table(root)
    assignments = resolve(plan, sites, loaded.family, parameter_table(root))
    if inside:
        assignments = [replace(a, site=replace(a.site, path=inside + a.site.path))
                       for a in assignments]
    depths = {None if stack is None else inside + stack: depth
              for stack, depth in stack_depths(sites).items()}
    return CompileContext(plan, loaded, assignments, mode, layer_count(sites), depths)


def run_pipeline(gm: GraphModule, ctx: CompileContext, verify: bool | None = None,
                 dump_dir: str | Path | None = None) -> GraphModule:
    manager = PassManager(default_pipeline(ctx.mode, ctx.merge, ctx.fuse_projections))
    if verify is not None:
        manager.verify = verify
    if dump_dir is not None:
        manager.dump_dir = str(dump_dir)
    gm, counts = manager.run(gm, ctx)
    if ctx.mode == "infer":  # the inserted adapters' dropout is for training
        for module in gm.modules():  # (export's modules may refuse eval())
            module.training = False
    counts.update(stored_weight_bytes(gm, ctx))
    trainable = sum(p.numel() for p in gm.parameters() if p.requires_grad)
    gm.meta[REPORT] = CompileReport(ctx.plan.spec.path, ctx.plan.spec.source, ctx.model.source, ctx.mode, ctx.sites,
                                    counts, trainable, parameter_count(gm),
                                    [p.name for p in manager.passes],
                                    sequence_limit(ctx.model) - ctx.table_positions)
    return gm


def stored_weight_bytes(gm: GraphModule, ctx: CompileContext) -> dict[str, int]:
    """`weight_bytes_after`: what the finished module stores for the `quantize`d layers'
    weights, read from it rather than from quantize_weights, since later passes replace them
    (infer mode merges QLoRA and DoRA into dense copies). Per layer: its NF4 weight if it
    stayed 4-bit, the tensor standing in for its weight (`MERGED`, rows of a fused
    projection's), and its float weight where the module still holds it under one of its
    names (a tied embedding: export's tensors are not the model's objects, names are kept)."""
    paths = [row["path"] for row in ctx.sites if row["method"] == "quantize/nf4"]
    if not paths:
        return {}
    held = {name for name, _ in chain(gm.named_parameters(remove_duplicate=False),
                                      gm.named_buffers(remove_duplicate=False))}
    aliases: dict[int, set[str]] = {}  # the names the model holds each tensor under (tied)
    for name, tensor in ctx.model.module.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(tensor), set()).add(name)
    nf4 = {name: m for name, m in gm.named_modules() if isinstance(m, Nf4Weight)}
    stand_ins = gm.meta.get(MERGED, {})
    total = 0
    for path in paths:
        if f"{path}.nf4" in nf4:
            total += nf4[f"{path}.nf4"].stored_bytes()
        if f"{path}.weight" in stand_ins:
            total += tensor_bytes(graph_tensor(gm, stand_ins[f"{path}.weight"]))
        original = ctx.model.module.get_parameter(f"{path}.weight")
        total += tensor_bytes(original) * bool(aliases[id(original)] & held)
    return {"weight_bytes_after": total}


def tensor_bytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def parameter_count(gm: GraphModule) -> int:
    """All parameters as PEFT counts them: an NF4 weight by its original elements (PEFT counts
    bitsandbytes' packed Params4bit as two per byte), not dropped for living in buffers."""
    quantized = sum(math.prod(m.shape) for m in gm.modules() if isinstance(m, Nf4Weight))
    return sum(p.numel() for p in gm.parameters()) + quantized


def compile(model, spec, mode: str = "train", *, adapters: str | Path | None = None,
            merge: bool = True, fuse_projections: bool = False,
            example_inputs: dict | None = None, verify: bool | None = None,
            dump_dir: str | Path | None = None) -> GraphModule:
    """Compile `spec` onto `model` (a preset name, checkpoint dir, or nn.Module).

    mode="train" returns the unmerged graph: base parameters frozen, adapters trainable.
    mode="infer" builds the same graph from a fresh trace, loads `adapters` (a file written by
    `save_adapters`; without it the initial weights), merges LoRA into new weight parameters
    and fuses the other adapters into custom ops; nothing is trainable, and neither the
    user's model nor any train-mode module is modified. With `merge=False` the weight-space
    updates stay beside the base weights, which remain the user's tensors (no copies; a
    QLoRA base stays 4-bit): LoRA as linear ops whose sibling A matrices share one GEMM,
    the other weight-space methods as eager modules. `fuse_projections=True` makes linear
    layers that read the same input (q, k, v; gate, up) one GEMM over concatenated weights.
    `dump_dir` writes the graph after each pass there (as ADAPTC_DUMP does).
    """
    if adapters is not None and mode != "infer":
        raise AdaptcError("adapter weights are loaded in infer mode; for a train-mode module "
                          "call adaptc.load_adapters(module, path) after compiling")
    if mode != "infer" and (not merge or fuse_projections):
        raise AdaptcError("merge=False and fuse_projections=True are for mode='infer' (train "
                          "mode keeps the layers as traced)")
    ctx = prepare(model, spec, mode, example_inputs)
    ctx.adapters, ctx.merge, ctx.fuse_projections = adapters, merge, fuse_projections
    gm = run_pipeline(trace(ctx.model, training=mode == "train"), ctx, verify, dump_dir)
    gm = compiled_module(gm)  # the same module, which pickles
    taken = ctx.table_positions
    why = (f"the model's {sequence_limit(ctx.model)} positions"
           + (f", {taken} of them for the virtual tokens" if taken else ""))
    vocab_size = getattr(getattr(ctx.model.module, "config", None), "vocab_size", None)
    check = InputCheck(ctx.model.example_inputs, report_of(gm).max_tokens, why, vocab_size, gm)
    check.attach(gm)
    return gm


def report_of(gm: GraphModule) -> CompileReport:
    report = getattr(gm, "meta", {}).get(REPORT)
    if report is None:
        raise AdaptcError(f"{type(gm).__name__} has no compile report: report_of takes a module "
                          "adaptc.compile returned")
    return report
