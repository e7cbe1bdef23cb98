"""The one interface every compiler pass implements, and the context passes share.

A pass takes the GraphModule and the compile context and returns a `PassResult`: the
module and counts of what it did (`lora_inserted=64`) that tests assert and the CLI
prints. Analyses are stored on nodes under `adaptc.*` meta keys.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path
from typing import Protocol

import torch
from torch import nn
from torch.fx import GraphModule, Node

from adaptc.errors import SpecError, first_line
from adaptc.frontend.models import LoadedModel
from adaptc.frontend.targets import Assignment, diag
from adaptc.frontend.trace import sequence_limit
from adaptc.methods.options import output_options
from adaptc.spec.ir import Plan

# node.meta keys written by passes
SITE = "adaptc.site"          # on a linear node: the Site it implements
METHODS = "adaptc.methods"    # on a linear node: {method: Assignment} to insert there
INSERTED = "adaptc.inserted"  # on nodes a pass added: the method name
# gm.meta key: {base parameter name: name of the graph tensor that now stands in for it}
MERGED = "adaptc.merged"


@dataclass
class CompileContext:
    """What passes may read besides the graph: the validated spec, the model, the assignments."""

    plan: Plan
    model: LoadedModel
    assignments: list[Assignment]
    mode: str = "train"
    n_layers: int = 0  # depth of the whole model (site layers count from 0)
    depths: dict[str | None, int] = field(default_factory=dict)  # layers per block stack
    sites: list[dict] = field(default_factory=list)  # per inserted adapter, for reports
    adapters: str | Path | None = None  # infer mode: trained adapter weights (.safetensors)
    merge: bool = True  # infer mode: fold weight-space updates into the base weights
    fuse_projections: bool = False  # infer mode: one GEMM for linears sharing an input
    adapter_prefix: str = ""  # module path of the adapted model inside the traced one
    partial: bool = False  # the graph is part of the model (an encoder-decoder's decoding
    # graphs): load the adapter file's tensors it has, prefix only the attentions it calls
    loaded_adapters: frozenset[str] = frozenset()  # the names load_adapters copied
    positions_input: str | None = None  # cached decoding: the input of absolute positions
    table_positions: int = 0  # rows of the position table that virtual tokens take
    model_parameters: int = 0  # elements of the base model's parameters (`build_sized`)

    def user_modules(self) -> frozenset[int]:
        """Ids of the user's modules: passes never bind tensors into them (`bind`)."""
        return frozenset(id(m) for m in self.model.module.modules())


@dataclass
class PassResult:
    module: GraphModule
    counts: dict[str, int] = field(default_factory=dict)


class Pass(Protocol):
    name: str

    def run(self, gm: GraphModule, ctx: CompileContext) -> PassResult: ...


def assigned(gm: GraphModule, method: str) -> Iterator[tuple[Node, Assignment]]:
    """(node, assignment) for every node of `gm` assigned `method`, over a snapshot of the
    node list so that the pass may insert nodes as it goes."""
    for node in list(gm.graph.nodes):
        assignment = node.meta.get(METHODS, {}).get(method)
        if assignment is not None:
            yield node, assignment


def record_merge(gm: GraphModule, layer: str, operand: str, target: str) -> None:
    """Note that the base parameter `<layer>.<operand>` is now read as `target` (a merged
    weight, a trained copy): the hf/ export writes `target` under the base name."""
    gm.meta.setdefault(MERGED, {})[f"{layer}.{operand}" if layer else operand] = target


def misplaced(ctx: CompileContext, span, message: str) -> SpecError:
    """E302 at `span` of the spec: a statement the model cannot take where it puts it, which
    shows only in the traced graph (a flattened input, a parameter nothing reads), so the
    user is sent to the line to change rather than to a module path alone."""
    return SpecError([diag(ctx.plan, span, "E302", message)])


def take_positions(ctx: CompileContext, rule, tokens: int) -> None:
    """Count `tokens` virtual tokens (a prompt's or a prefix's) against the rows of the
    model's learned position table (`ctx.table_positions`, which bounds the compiled module's
    inputs): a prompt and a prefix both take theirs. E307 at the statement's `tokens` when
    they take every row, leaving the module no input length it accepts."""
    limit = sequence_limit(ctx.model)
    if ctx.table_positions + tokens >= limit:
        taken = f" (besides the prefix's {ctx.table_positions})" if ctx.table_positions else ""
        raise SpecError([diag(ctx.plan, rule.span_of("tokens"), "E307",
                              f"tokens={tokens} virtual tokens{taken} take all {limit} rows of "
                              f"the model's position table, leaving none for the input; need "
                              f"tokens < {limit - ctx.table_positions}")])
    ctx.table_positions += tokens


# E308: one adapter module (a site's, or a statement's shared one) may hold at most as many
# elements as the larger of the base model's parameters and this floor (64 MiB in float32),
# so a tiny test model still takes the usual sizes
ADAPTER_FLOOR = 2 ** 24


def build_sized(ctx: CompileContext, rule, option: str, where: str,
                make: Callable[..., nn.Module], device, dtype) -> nn.Module:
    """`make(device=..., dtype=...)`: an adapter for `where` whose size is set by `option` of
    `rule` (a statement or the mixture statement). Built on `meta` first, which allocates
    nothing: E308 at the option when it holds more elements than the larger of the base
    model's parameters and ADAPTER_FLOOR, or a tensor of it more bytes than torch can count
    (2^63); E308 too when allocating it fails (out of memory)."""
    setting = f"{option}={getattr(rule.config, option)}"
    try:
        probe = make(device=torch.device("meta"), dtype=dtype)
    except (RuntimeError, TypeError) as err:  # "Storage size calculation overflowed", or a
        if "overflow" not in str(err).lower():  # size beyond int64 ("Overflow when unpacking")
            raise
        raise SpecError([diag(ctx.plan, rule.span_of(option), "E308",
                              f"{setting} gives the {rule.config.method} of {where} a tensor "
                              "of more than 2^63 bytes, beyond what torch can hold")]) from err
    elements = sum(t.numel() for t in chain(probe.parameters(), probe.buffers()))
    if not ctx.model_parameters:
        ctx.model_parameters = sum(p.numel() for p in ctx.model.module.parameters())
    limit = max(ctx.model_parameters, ADAPTER_FLOOR)
    if elements > limit:
        raise SpecError([diag(ctx.plan, rule.span_of(option), "E308",
                              f"{setting} gives the {rule.config.method} of {where} "
                              f"{elements:,} elements; an adapter may hold at most {limit:,} "
                              f"(the larger of the model's {ctx.model_parameters:,} "
                              f"parameters and {ADAPTER_FLOOR:,})")])
    try:
        return make(device=device, dtype=dtype)
    except (RuntimeError, MemoryError) as err:
        if not out_of_memory(err):
            raise
        raise SpecError([diag(ctx.plan, rule.span_of(option), "E308",
                              f"cannot allocate the {rule.config.method} of {where} "
                              f"({setting}, {elements:,} elements) on {device}: "
                              f"{first_line(err)}")]) from err


def out_of_memory(err: BaseException) -> bool:
    """torch's failed allocations: MemoryError, torch.OutOfMemoryError (CUDA), and the CPU
    allocator's RuntimeError ("DefaultCPUAllocator: can't allocate memory")."""
    return (isinstance(err, (MemoryError, torch.OutOfMemoryError))
            or "allocate memory" in str(err))


def report(site, method: str, assignment, adapter, *configs) -> dict:
    """One row of the compile report: where, what, from which line, how many parameters, and
    the options that change what the adapter computes (of its statement and of `configs`,
    a mixture's), which saved adapter files record."""
    config = assignment.rule.config
    return {"path": site.path, "method": method, "line": assignment.rule.statement.span.line,
            "type": site.type_name, "in": site.in_features, "out": site.out_features,
            "params": adapter_size(adapter),
            "options": {c.method: output_options(c) for c in (config, *configs)}}


def adapter_size(adapter) -> int:
    """Elements of the adapter's own parameters: the `params` of its compile report row."""
    return sum(p.numel() for p in adapter.adapter_parameters().values())
