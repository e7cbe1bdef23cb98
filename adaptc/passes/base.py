"""The one interface every compiler pass implements, and the context passes share.

A pass takes the GraphModule and the compile context and returns a `PassResult`: the
module and counts of what it did (`lora_inserted=64`) that tests assert and the CLI
prints. Analyses are stored on nodes under `adaptc.*` meta keys.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from torch.fx import GraphModule

from adaptc.errors import SpecError
from adaptc.frontend.models import LoadedModel
from adaptc.frontend.targets import Assignment, diag
from adaptc.frontend.trace import sequence_limit
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


def record_merge(gm: GraphModule, layer: str, operand: str, target: str) -> None:
    """Note that the base parameter `<layer>.<operand>` is now read as `target` (a merged
    weight, a trained copy): the hf/ export writes `target` under the base name."""
    gm.meta.setdefault(MERGED, {})[f"{layer}.{operand}" if layer else operand] = target


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


def report(site, method: str, assignment, adapter) -> dict:
    """One row of the compile report: where, what, from which line, how many parameters."""
    return {"path": site.path, "method": method, "line": assignment.rule.statement.span.line,
            "type": site.type_name, "in": site.in_features, "out": site.out_features,
            "params": sum(p.numel() for p in adapter.adapter_parameters().values())}
