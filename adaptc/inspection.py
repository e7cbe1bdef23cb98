"""`adaptc inspect`: what a spec does to a model, as text.

A table of adapted sites (module → method, statement line, shapes, trainable parameters),
the total in PEFT's format, and one block's graph before and after the passes, side by side.
"""
from __future__ import annotations

import difflib

from torch.fx import GraphModule, Node

from adaptc.compiler import prepare, report_of, run_pipeline
from adaptc.errors import AdaptcError
from adaptc.frontend.sites import LAYER_INDEX
from adaptc.frontend.trace import trace
from adaptc.passes import CompileContext
from adaptc.passes.graph import in_module

COLUMN = 64


def inspect(model, spec, block: int | str = 0, example_inputs: dict | None = None) -> str:
    """`block`: a layer index in the model's first block stack (an encoder-decoder's encoder;
    negatives count from its last layer, as a spec's `[-1]` counts each stack on its own), or
    a block's module path, which reaches any stack (`decoder.block.0` of a T5)."""
    ctx = prepare(model, spec, "train", example_inputs)
    paths = [owner(a.site) for a in ctx.assignments]
    prefix = named_block(paths, block) if isinstance(block, str) else \
        indexed_block(ctx, paths, block)
    gm = trace(ctx.model, training=True)
    before = block_lines(gm, prefix)
    if isinstance(block, str) and not before:
        raise AdaptcError(f"block '{prefix}': no operation of the traced graph runs inside it "
                          "(a container such as a ModuleList runs none itself); "
                          f"{with_sites(paths)}")
    gm = run_pipeline(gm, ctx)
    report = report_of(gm)
    parts = [site_table(report.sites), report.peft_line()]
    if prefix:
        parts += ["", f"block {prefix}: original | rewritten",
                  side_by_side(before, block_lines(gm, prefix))]
    else:
        parts += ["", f"block {block}: no adapted module in this layer, so no graph to show"]
    return "\n".join(parts)


def indexed_block(ctx: CompileContext, paths: list[str], block: int) -> str | None:
    """The path of layer `block` of the first block stack (`model.encoder.layers.1`) when an
    adapted site lies in it; an index beyond that stack's depth is an error naming its range
    (and, on an encoder-decoder, how to reach the other stack)."""
    stacks = list(ctx.depths.items())
    if not stacks:
        return None
    stack, depth = stacks[0]
    if not -depth <= block < depth:
        where, hint = "", ""
        if len(stacks) > 1:
            other, size = stacks[1]
            where = f" in {stack}"
            hint = f"; a block's path reaches the others (--block {other}.{size - 1})"
        raise AdaptcError(f"block {block} is out of range: {ctx.model.source} has {depth} layers"
                          f"{where} (0..{depth - 1}, or -1 for the last){hint}")
    name = f"{stack}.{block % depth}"
    return name if holds(paths, name) else None


def holds(paths: list[str], block: str) -> bool:
    """Whether an adapted site is the block or lies inside it."""
    return any(path == block or path.startswith(f"{block}.") for path in paths)


def owner(site) -> str:
    """The module a site is: a trained parameter's (`classifier` for `classifier.weight`)."""
    return (site.path.rpartition(".")[0] or site.path) if site.kind == "parameter" else site.path


def named_block(paths: list[str], name: str) -> str:
    """`name` when it is an adapted site (`model.embed_tokens` under a prompt) or one lies
    inside it; else an error listing the blocks that hold one."""
    name = name.strip(".")
    if holds(paths, name):
        return name
    raise AdaptcError(f"block '{name}': no adapted module inside it{with_sites(paths, ' (')}")


def with_sites(paths: list[str], opening: str = "") -> str:
    """`blocks with one: model.layers.0, ...` (the first six), or the adapted modules when none
    lies in a numbered block (a prompt's word embedding); `opening` and a closing parenthesis
    around it when given."""
    blocks = list(dict.fromkeys(path[:found.end(1)] if (found := LAYER_INDEX.search(path))
                                else path for path in paths))
    if not blocks:
        return ""
    listed = ", ".join(blocks[:6]) + (", ..." if len(blocks) > 6 else "")
    return f"{opening}blocks with one: {listed}" + (")" if opening else "")


def site_table(rows: list[dict]) -> str:
    header = f"{'module':<48} {'method':<20} {'line':>4} {'in→out':>12} {'params':>12}"
    lines = [header, "-" * len(header)]
    for row in rows:
        shape = row.get("shape") or (f"{row['in']}→{row['out']}" if row["in"] is not None else "")
        lines.append(f"{row['path']:<48} {row['method']:<20} {row['line']:>4} {shape:>12} "
                     f"{row['params']:>12,}")
    return "\n".join(lines)


def block_lines(gm: GraphModule, prefix: str) -> list[tuple[str, str]]:
    """(node name, text) for the block's nodes, without export's runtime shape asserts."""
    return [(n.name, describe(n)) for n in gm.graph.nodes
            if prefix and in_module(n, prefix) and not str(n.target).startswith("aten._assert")]


def describe(node: Node) -> str:
    target = node.target if node.op == "call_module" else getattr(node.target, "__name__", node.target)
    target = str(target).replace(".default", "")
    args = ", ".join(str(a) for a in node.args)
    return f"{node.name} = {target}({args})"


def side_by_side(left: list[tuple[str, str]], right: list[tuple[str, str]]) -> str:
    """Align the listings by node name: `+` marks nodes the passes inserted, `~` nodes
    whose inputs they rewired."""
    out = []
    matcher = difflib.SequenceMatcher(a=[n for n, _ in left], b=[n for n, _ in right],
                                      autojunk=False)
    for tag, i1, i2, j1, j2 in matcher.get_opcodes():
        for k in range(max(i2 - i1, j2 - j1)):
            a = left[i1 + k][1] if i1 + k < i2 else ""
            b = right[j1 + k][1] if j1 + k < j2 else ""
            mark = "+" if not a else ("-" if not b else (" " if a == b else "~"))
            out.append(f"{clip(a):<{COLUMN}} {mark} {clip(b)}")
    return "\n".join(out)


def clip(text: str) -> str:
    return text if len(text) <= COLUMN else text[:COLUMN - 1] + "…"
