"""Loop-invariant code motion for a decoding step: split a graph into what depends on one
input alone (`source`: an encoder-decoder's encoder states) and what each step computes.

    step(ids, states, positions)  →  hoisted = source_graph(states)            once per source
                                     step_graph(ids, states, positions, *hoisted)   per token

The hoisted nodes are the tensor-valued, non-mutating nodes that read `source` (directly or
through others) and none of the `varying` inputs: for T5 and BART the cross-attention keys
and values of every layer, with whatever adapters the infer pipeline left on their
projections (unmerged LoRA, fused mixtures). The source graph computes the frontier, the
hoisted nodes some step node reads, and the step graph takes the frontier as extra inputs.
Shape arithmetic (SymInt nodes) is not hoisted: the step graph still reads `source` for it,
so its shape guards and symbolic sizes stay as exported. Both graphs take positional
arguments (plain fx codegen); the step graph returns its outputs as a tuple.
"""
from __future__ import annotations

import torch
from torch.fx import CodeGen, Graph, GraphModule, Node


def hoist_invariant(gm: GraphModule, source: str,
                    varying: tuple[str, ...]) -> tuple[GraphModule, GraphModule, int]:
    """(source graph, step graph, number of hoisted nodes) for `gm`, whose placeholders are
    named `source` and `varying` (keyword inputs of the exported graph, in their order)."""
    inputs = {n.target: n for n in gm.graph.nodes if n.op == "placeholder"}
    hoisted = invariant_nodes(gm, inputs[source], {inputs[name] for name in varying})
    frontier = [n for n in hoisted if any(user not in hoisted for user in n.users)]
    return (source_graph(gm, frontier),
            step_graph(gm, list(inputs.values()), frontier), len(hoisted))


def invariant_nodes(gm: GraphModule, source: Node, varying: set[Node]) -> set[Node]:
    """Pure nodes, shape arithmetic aside, that depend on `source` and on nothing in
    `varying`."""
    reads_source, varies, found = {source}, set(varying), set()
    for node in gm.graph.nodes:
        if node.op not in ("call_function", "call_module", "call_method"):
            continue
        operands = node.all_input_nodes
        if any(n in varies for n in operands) or mutates(node):
            varies.add(node)
        elif any(n in reads_source for n in operands):
            reads_source.add(node)
            if not computes_size(node):
                found.add(node)
    return found


def computes_size(node: Node) -> bool:
    """Shape arithmetic: a SymInt-valued node (nodes inserted without a traced value are
    taken as tensors unless they call a sym_* op; a split's value is a list of tensors)."""
    value = node.meta.get("val")
    if value is not None:
        return isinstance(value, (torch.SymInt, torch.SymFloat, torch.SymBool, int, float, bool))
    return "sym_" in str(node.target)


def mutates(node: Node) -> bool:
    """In-place ops and graph guards stay in the step graph (call_module `_guards_fn`)."""
    schema = getattr(node.target, "_schema", None)
    return (node.op == "call_module" and node.target == "_guards_fn") or bool(
        schema is not None and schema.is_mutable)


def source_graph(gm: GraphModule, frontier: list[Node]) -> GraphModule:
    """A graph computing `frontier` from `source` alone: the frontier's ancestors, copied."""
    needed = set(frontier)
    for node in reversed(gm.graph.nodes):
        if node in needed:
            needed.update(node.all_input_nodes)
    graph, env = Graph(), {}
    for node in gm.graph.nodes:
        if node in needed:
            env[node] = graph.node_copy(node, lambda n: env[n])
    graph.output(tuple(env[n] for n in frontier))
    return GraphModule(gm, graph)


def step_graph(gm: GraphModule, placeholders: list[Node], frontier: list[Node]) -> GraphModule:
    """`gm`'s graph reading the frontier from new inputs after its own; dead nodes removed."""
    graph = Graph()
    env = {}
    for node in placeholders:
        env[node] = graph.node_copy(node, lambda n: env[n])
    for i, node in enumerate(frontier):
        env[node] = graph.placeholder(f"hoisted_{i}")
        env[node].meta = dict(node.meta)
    for node in gm.graph.nodes:
        if node not in env:
            env[node] = graph.node_copy(node, lambda n: env[n])
    graph._codegen = CodeGen()
    step = GraphModule(gm, graph)
    step.graph.eliminate_dead_code()
    step.recompile()
    step.meta.update(gm.meta)  # the compile report
    return step
