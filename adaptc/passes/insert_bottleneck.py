"""Pass: add a bottleneck adapter on the output of every module assigned `adapter`.

    sequential:  h = f(x);  h + <site>.adapter(h)
    parallel:    f(x) + <site>.adapter(x)   (at `ffn` where it names the FFN's output
                 linear, as BERT's output.dense: x is the FFN's input, He et al.)

A module's boundary is read from the nodes traced inside it (`nn_module_stack`): its output
is the one node used outside, its input the one floating-point tensor fed from outside.
Deeper modules are adapted first, so an adapter on a block wraps those inside it.
"""
from __future__ import annotations

from torch.fx import GraphModule, Node

from adaptc.errors import SpecError
from adaptc.frontend.targets import Assignment, diag, ffn_input_module
from adaptc.methods.bottleneck import BottleneckAdapter
from adaptc.passes.base import CompileContext, PassResult, build_sized, report
from adaptc.passes.graph import in_module, splice


class InsertBottleneck:
    name = "insert_bottleneck"

    def run(self, gm: GraphModule, ctx: CompileContext) -> PassResult:
        todo = [a for a in ctx.assignments if a.method == "adapter"]
        todo.sort(key=lambda a: -a.site.path.count("."))
        for assignment in todo:
            self.insert(gm, ctx, assignment)
        return PassResult(gm, {"adapter_inserted": len(todo)})

    def insert(self, gm: GraphModule, ctx: CompileContext, assignment) -> None:
        site, config = assignment.site, assignment.rule.config
        inside = [n for n in gm.graph.nodes if in_module(n, site.path)]
        members = set(inside)
        output = single(ctx, assignment, "output",
                        [n for n in inside if any(u not in members for u in n.users)])
        source = output
        if config.placement == "parallel":
            source = parallel_input(gm, ctx, assignment, inside, members, output)
        d_in, d_out = width(ctx, assignment, source), width(ctx, assignment, output)
        if config.gate and source.meta["val"].dim() != 3:
            raise refused(ctx, assignment, "gate", "its input is not [batch, seq, features] "
                          "in the traced graph; drop 'gate' there")
        like = output.meta["val"]
        adapter = build_sized(ctx, assignment.rule, "bottleneck", f"'{site.path}'",
                              lambda **kw: BottleneckAdapter(config, d_in, d_out, **kw),
                              like.device, like.dtype)
        splice(gm, output, source, f"{site.path}.adapter", adapter, "adapter", keep_users=members)
        row = report(site, f"adapter/{config.placement}", assignment, adapter)
        ctx.sites.append({**row, "in": d_in, "out": d_out})


def parallel_input(gm: GraphModule, ctx: CompileContext, assignment: Assignment,
                   inside: list[Node], members: set[Node], output: Node) -> Node:
    """What a parallel adapter reads: the module's input, or, where the `ffn` alias names
    the FFN's output linear (BERT's output.dense), the FFN's input (the first linear's)."""
    first = None
    if assignment.target.pattern == "ffn" and assignment.site.kind == "linear":
        first = ffn_input_module(assignment.site.path, ctx.model.family)
    if first is not None:
        inside = [n for n in gm.graph.nodes if in_module(n, first)]
        members = set(inside)
        output = single(ctx, assignment, "output",
                        [n for n in inside if any(u not in members for u in n.users)])
    return single(ctx, assignment, "tensor input", external_inputs(inside, members, output))


def external_inputs(inside: list[Node], members: set[Node], output: Node) -> list[Node]:
    """Floating tensors of the output's rank that the module reads from outside."""
    rank = output.meta["val"].dim()
    seen = []
    for node in inside:
        for arg in node.all_input_nodes:
            val = arg.meta.get("val")
            if arg in members or arg in seen or arg.op == "get_attr" or val is None:
                continue
            if getattr(val, "is_floating_point", lambda: False)() and val.dim() == rank:
                seen.append(arg)
    return seen


def single(ctx: CompileContext, assignment: Assignment, what: str, nodes: list[Node]) -> Node:
    if len(nodes) != 1 or "val" not in nodes[0].meta:
        raise refused(ctx, assignment, None, f"it has {len(nodes)} {what}s in the traced graph "
                      "(need exactly one); target one of its linear layers instead")
    return nodes[0]


def width(ctx: CompileContext, assignment: Assignment, node: Node) -> int:
    size = node.meta["val"].shape[-1]
    if not isinstance(size, int):
        raise refused(ctx, assignment, None, f"its feature dimension is not static ({size})")
    return size


def refused(ctx: CompileContext, assignment: Assignment, option: str | None,
            why: str) -> SpecError:
    """E302 at the statement's target (or at `option`): the module it names has no place
    for an adapter."""
    span = assignment.rule.span_of(option) if option else assignment.target.span
    return SpecError([diag(ctx.plan, span, "E302", f"adapter cannot adapt "
                           f"{assignment.site.describe()}: {why}")])
