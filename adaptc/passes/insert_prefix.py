"""Pass: prefix tuning and P-tuning v2 as a rewrite of each adapted layer's attention op.

    prefix = adaptc.prefix_<rule>()                       once per forward, [L, 2, P, H_kv, d]
    sdpa(q, k, v, mask)  →  k', v', mask' = <attn>.prefix(q, k, v, mask, prefix[l])
                            sdpa(q, k', v', mask')
    positions            →  positions + P                 where they enter RoPE or the table

One `PrefixEncoder` per statement holds the prefixes of the layers that statement won; each
adapted attention module gets a `PrefixAttention` that prepends its layer's slice (and, for
UniPELT's gated prefix, holds the layer's gate, fed the input of the attention's projections).
Positions shift by P once for the whole model, so all prefix statements of a spec use the
same number of tokens (checked in `spec.lower`); in an encoder-decoder only the decoder's
shift, and only when a self-attention of the decoder has a prefix (a cross-attention's keys
are the encoder's, whose positions stay). T5 has no positions to shift: its self-attentions
add a relative position bias, and the prefix columns get the bias of keys at 0 … P-1 seen
from queries at P … P+S-1 (`RelativePositions`); in cached decoding (`ctx.positions_input`)
from P plus the positions the graph is given.

With `ctx.partial` (an encoder-decoder's decoding graphs, adaptc.decode_seq2seq) a statement
keeps all of its layers' prefixes, and only the attentions this graph calls are rewritten.
"""
from __future__ import annotations

import operator
from itertools import groupby

from torch.fx import GraphModule, Node

from adaptc.adapters import ENCODERS
from adaptc.errors import ModelError
from adaptc.frontend.targets import Assignment
from adaptc.frontend.trace import is_encoder_decoder
from adaptc.methods.prefix import PrefixAttention, PrefixEncoder, RelativePositions
from adaptc.passes.base import (
    INSERTED,
    CompileContext,
    PassResult,
    adapter_size,
    build_sized,
    misplaced,
    report,
    take_positions,
)
from adaptc.passes.graph import (
    VIEWS,
    attention_op,
    graph_input,
    in_module,
    is_linear,
    linear_input,
    mark_inserted,
    reads_position_table,
    sdpa_arg,
    set_sdpa_arg,
    shift_positions,
)

PREFIX_METHODS = ("prefix", "ptuning2")


class InsertPrefix:
    name = "insert_prefix"

    def run(self, gm: GraphModule, ctx: CompileContext) -> PassResult:
        todo = [a for a in ctx.assignments if a.method in PREFIX_METHODS]
        if not todo:
            return PassResult(gm, {"prefix_inserted": 0})
        todo.sort(key=lambda a: a.rule.index)
        ops = {a.site.path: attention_op(gm, a.site.path) for a in todo
               if not ctx.partial or any(in_module(n, a.site.path) for n in gm.graph.nodes)}
        selves = [path for path, op in ops.items() if not is_cross_attention(op)]
        relative = {path: relative_positions(gm, ctx, path) for path in selves}
        relative = {path: found for path, found in relative.items() if found}
        within = decoder_stacks(selves) if is_encoder_decoder(ctx.model) else None
        if relative:  # positions enter through the bias of the prefix columns
            within = []
        tokens = todo[0].rule.config.tokens
        table = reads_position_table(gm, within)
        for _, group in groupby(todo, key=lambda a: a.rule.index):
            self.insert_rule(gm, ctx, list(group), ops, relative)
        shifted = shift_positions(gm, tokens, "prefix", within) if within != [] else 0
        if shifted and table:
            take_positions(ctx, todo[0].rule, tokens)
        return PassResult(gm, {"prefix_inserted": len(ops)})

    def insert_rule(self, gm: GraphModule, ctx: CompileContext, group: list[Assignment],
                    ops: dict[str, Node],
                    relative: dict[str, tuple[RelativePositions, Node]]) -> None:
        rule = group[0].rule
        keys = {a.site.path: sdpa_arg(ops[a.site.path], "key").meta["val"] for a in group
                if a.site.path in ops}
        if not keys:  # all in the other graph (ctx.partial)
            return
        key = next(iter(keys.values()))
        heads, head_dim = int(key.shape[1]), int(key.shape[-1])
        other = next((path for path, k in keys.items()
                      if (int(k.shape[1]), int(k.shape[-1])) != (heads, head_dim)), None)
        if other:
            raise misplaced(ctx, rule.statement.method_span,
                            f"this {rule.config.method} statement adapts attentions of "
                            f"different shapes ({group[0].site.path}: {heads} heads of "
                            f"{head_dim}; {other}: {int(keys[other].shape[1])} of "
                            f"{int(keys[other].shape[-1])}); write one statement for each")
        target = f"{ENCODERS}.{rule.config.method}_{rule.index}"
        width, layers = kv_heads(ctx, heads) * head_dim, len(group)
        projection = getattr(rule.config, "projection", 0)
        # the larger of the prefix tensors [P, ·] and the MLP [h, ·] sets the size
        option = "projection" if projection * (1 + 2 * layers) > rule.config.tokens else "tokens"
        encoder = build_sized(ctx, rule, option, f"'{target}' ({layers} layers)",
                              lambda **kw: PrefixEncoder(rule.config, layers,
                                                         kv_heads(ctx, heads), head_dim, **kw),
                              key.device, key.dtype)
        source = encoder_node(gm, target, encoder, rule.config.method)
        ctx.sites.append({"path": target, "method": f"{rule.config.method}[{rule.config.tokens}]",
                          "line": rule.statement.span.line, "in": None, "out": None,
                          "shape": "×".join(map(str, encoder.shape)),
                          "params": adapter_size(encoder), "shared": True})
        queries = graph_input(gm, ctx.positions_input) if ctx.positions_input else None
        for layer, assignment in enumerate(group):
            if assignment.site.path not in ops:  # in the other graph (ctx.partial)
                continue
            hidden = attention_input(gm, assignment.site.path) if rule.config.gate else None
            width = int(hidden.meta["val"].shape[-1]) if hidden is not None else 0
            positions, table = relative.get(assignment.site.path, (None, None))
            attention = PrefixAttention(width, device=key.device, dtype=key.dtype,
                                        relative=positions)
            rewrite(gm, ops[assignment.site.path], f"{assignment.site.path}.prefix", attention,
                    source, layer, rule.config.method, hidden, table,
                    queries if positions is not None else None)
            ctx.sites.append(report(assignment.site, rule.config.method, assignment, attention))


def relative_positions(gm: GraphModule, ctx: CompileContext, path: str
                       ) -> tuple[RelativePositions, Node] | None:
    """For a self-attention that adds T5's relative position bias: how it buckets relative
    positions, and the graph's read of its stack's bias table (block 0 holds it, the other
    blocks reuse block 0's bias); None for attentions without one."""
    module = ctx.model.module.get_submodule(path)
    if not hasattr(module, "relative_attention_num_buckets"):
        return None
    parts = path.split(".")
    stack = ".".join(parts[:next((i for i, part in enumerate(parts) if part.isdigit()),
                                 len(parts)) - 1])
    tables = [n for n in gm.graph.nodes if n.op == "get_attr" and n.target.startswith(stack)
              and n.target.endswith("relative_attention_bias.weight")]
    if len(tables) != 1:
        raise ModelError(f"'{path}' adds a relative position bias, and the traced graph has "
                         f"{len(tables)} bias tables under '{stack}' (need one) for its "
                         "prefix columns")
    positions = RelativePositions(type(module)._relative_position_bucket,
                                  module.relative_attention_num_buckets,
                                  module.relative_attention_max_distance, not module.is_decoder)
    return positions, tables[0]


def is_cross_attention(op: Node) -> bool:
    """Keys over another sequence than the queries (an encoder-decoder's cross-attention):
    their traced lengths are different symbols."""
    query, key = (sdpa_arg(op, name).meta["val"] for name in ("query", "key"))
    return str(query.shape[2]) != str(key.shape[2]) and not isinstance(key.shape[2], int)


def decoder_stacks(paths: list[str]) -> list[str]:
    """The decoders (`model.decoder`) whose self-attentions carry a prefix: their positions
    shift, as transformers shifts a decoder's past a P-token cache. An encoder's do not:
    an encoder takes no cache, so its tokens keep positions 0 … S-1 with a prefix too."""
    stacks = {".".join(parts[:parts.index("decoder") + 1])
              for parts in (path.split(".") for path in paths) if "decoder" in parts}
    return sorted(stacks)


def kv_heads(ctx: CompileContext, heads: int) -> int:
    """Key/value heads (GQA) from the model config, else the attention op's head count."""
    config = getattr(ctx.model.module, "config", None)
    found = getattr(config, "num_key_value_heads", None) or heads
    if heads % found:
        raise ModelError(f"attention has {heads} heads, not a multiple of num_key_value_heads="
                         f"{found}")
    return found


def encoder_node(gm: GraphModule, target: str, encoder: PrefixEncoder, method: str) -> Node:
    """Register the encoder and call it once, right after the graph's inputs."""
    gm.add_submodule(target, encoder)
    last_input = [n for n in gm.graph.nodes if n.op == "placeholder"][-1]
    with gm.graph.inserting_after(last_input):
        node = gm.graph.call_module(target, ())
    node.meta[INSERTED] = method
    return node


def attention_input(gm: GraphModule, path: str) -> Node:
    """What the attention module projects into queries, keys and values: the input of its
    first linear op (the gate of a gated prefix reads it), as [batch, seq, features]: GPT-2's
    Conv1D reads a flattened view of it, on which the gate's mean over the sequence failed."""
    for node in gm.graph.nodes:
        if is_linear(node) and in_module(node, path):
            x = linear_input(node)
            if (x.meta["val"].dim() == 2 and x.target in VIEWS
                    and x.args[0].meta["val"].dim() == 3):
                return x.args[0]
            return x
    raise ModelError(f"module '{path}' has no linear projection to read a prefix gate's input from")


def rewrite(gm: GraphModule, op: Node, target: str, attention: PrefixAttention, source: Node,
            layer: int, method: str, hidden: Node | None = None,
            table: Node | None = None, queries: Node | None = None) -> None:
    """sdpa(q, k, v, mask) → sdpa(q, k', v', mask') with k', v', mask' from `attention`
    (which reads the relative bias `table` where the attention has one, and the queries'
    positions from `queries` when the graph takes them as an input: cached decoding)."""
    gm.add_submodule(target, attention)
    graph = gm.graph
    args = [sdpa_arg(op, name) for name in ("query", "key", "value", "attn_mask")]
    causal = bool(sdpa_arg(op, "is_causal", False))
    with graph.inserting_before(op):
        prefix = graph.call_function(operator.getitem, (source, layer))
        call = graph.call_module(target, (*args, prefix, causal, hidden, table, queries))
        parts = [graph.call_function(operator.getitem, (call, i)) for i in range(3)]
    for new in (prefix, call, *parts):
        mark_inserted(new, op, method)
    set_sdpa_arg(op, "key", parts[0])
    set_sdpa_arg(op, "value", parts[1])
    set_sdpa_arg(op, "attn_mask", parts[2])
    if causal:
        set_sdpa_arg(op, "is_causal", False)
