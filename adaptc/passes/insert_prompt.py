"""Pass: prompt tuning and P-tuning as a rewrite at the word-embedding output.

    ids, mask          →  pad(ids, n zeros on the left), pad(mask, n ones on the left)
    E = embedding(ids) →  <embed>.prompt(E) = [T ; E[:, n:]]
    outputs [B, S, …]  →  outputs[:, n:]                  (logits / hidden states of real tokens)

Padding the token inputs first, rather than concatenating after the embedding, keeps the
traced shape arithmetic right: every size, position and mask the graph derives from the
inputs (`sym_size(attention_mask, 1)`, `arange(seq)`, the causal mask) now reads n + S, so
the virtual tokens get positions 0 … n-1 and the real tokens n … n+S-1, exactly as when
PEFT feeds `inputs_embeds = [T ; E]` with a mask of n leading ones. Outputs without a
sequence dimension (BERT's pooler, which reads the first position: a virtual token, as in
PEFT) are left as they are.

An encoder-decoder's virtual tokens go before the encoder's input: only the inputs over its
sequence are padded and only the outputs over it sliced; the decoder's keep their length.

Cached decoding (`ctx.positions_input`, adaptc.decode) pads nothing: the decoder puts n
placeholder ids before the prompt, and the prompt module writes T over the rows whose
position (the `cache_position` input) is below n, so only the prefill call carries them.
"""
from __future__ import annotations

import torch
from torch.fx import GraphModule, Node

from adaptc.frontend.targets import Assignment
from adaptc.methods.prompt import PromptEmbedding, PromptEncoder
from adaptc.passes.base import (
    INSERTED,
    CompileContext,
    PassResult,
    build_sized,
    misplaced,
    report,
    take_positions,
)
from adaptc.passes.graph import (VIEWS, graph_input, in_module, mark_inserted,
                                 reads_position_table)

aten = torch.ops.aten
PROMPT_METHODS = ("prompt", "ptuning")
MASK_INPUT = "attention_mask"  # padded with ones; other token-shaped inputs with zeros


class InsertPrompt:
    name = "insert_prompt"

    def run(self, gm: GraphModule, ctx: CompileContext) -> PassResult:
        todo = [a for a in ctx.assignments if a.method in PROMPT_METHODS]
        if not todo:
            return PassResult(gm, {"prompt_inserted": 0})
        if len(todo) > 1:
            paths = ", ".join(a.site.path for a in todo)
            raise misplaced(ctx, todo[1].target.span,
                            f"virtual tokens go before one input embedding; the spec puts "
                            f"them on {len(todo)} modules ({paths})")
        assignment = todo[0]
        weight = ctx.model.module.get_submodule(assignment.site.path).weight
        found = embedding_lookup(gm, assignment.site.path, weight)
        if isinstance(found, str):
            raise misplaced(ctx, assignment.target.span,
                            f"module '{assignment.site.path}' reads '{found}'; an "
                            "encoder-decoder's virtual tokens go before the encoder's input "
                            "(target the 'embed' role)")
        if found is None:
            raise misplaced(ctx, assignment.target.span,
                            "virtual tokens need the word embedding that reads the token ids; "
                            f"module '{assignment.site.path}' is not one (target the 'embed' "
                            "role)")
        lookup, ids = found
        tokens = assignment.rule.config.tokens
        positions = graph_input(gm, ctx.positions_input) if ctx.positions_input else None
        if positions is None and reads_position_table(gm):
            take_positions(ctx, assignment.rule, tokens)
        output, owner = module_output(lookup)
        weight = gm.get_parameter(lookup.args[0].target)
        if output is not lookup and not weight.is_meta:  # the rows as the module returns them
            with torch.no_grad():
                weight = ctx.model.module.get_submodule(owner)(
                    torch.arange(weight.shape[0], device=weight.device))
        module = build(ctx, assignment, weight)
        sliced = 0 if positions else extend_inputs(gm, ids, tokens)
        splice_prompts(gm, output, f"{assignment.site.path}.prompt", module, assignment.method,
                       positions)
        row = report(assignment.site, f"{assignment.method}[{tokens}]", assignment, module)
        ctx.sites.append({**row, "shape": f"{tokens}×{lookup.meta['val'].shape[-1]}"})
        return PassResult(gm, {"prompt_inserted": 1, "outputs_sliced": sliced})


def embedding_lookup(gm: GraphModule, path: str,
                     weight: torch.Tensor) -> tuple[Node, Node] | str | None:
    """The aten.embedding node of module `path` (or of a module tied to it: an
    encoder-decoder's `shared` is traced as `encoder.embed_tokens` and `decoder.embed_tokens`)
    and the token-id input it reads, directly or through views (GPT-2 reads
    `input_ids.view(-1, seq)`). Of several, the one that reads `input_ids`: virtual tokens go
    before the encoder's input, as Lester et al. put them before T5's. None when there is not
    exactly one; the input's name when `path` names only lookups of another input (T5's
    `decoder.embed_tokens` reads `decoder_input_ids`)."""
    found = []
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target == aten.embedding.default and (
                in_module(node, path) or reads_tensor(gm, node.args[0], weight)):
            ids = node.args[1]
            while ids.op == "call_function" and ids.target in VIEWS:
                ids = ids.args[0]
            if ids.op == "placeholder":
                found.append((node, ids))
    if len(found) > 1:
        named = [pair for pair in found if in_module(pair[0], path)]
        found = [pair for pair in found if pair[1].target == "input_ids"]
        if named and not any(pair in found for pair in named):
            return named[0][1].target
    return found[0] if len(found) == 1 else None


def module_output(lookup: Node) -> tuple[Node, str | None]:
    """The output of the embedding module `lookup` runs in, and that module's path: BART's
    (scale_embedding), M2M100's and Gemma 3's embeddings multiply the rows by √D inside the
    module, and PEFT's virtual tokens replace that output (its `inputs_embeds`), unscaled."""
    stack = list(lookup.meta.get("nn_module_stack", {}).values())
    owner = stack[-1][0] if stack else None
    node = lookup
    while owner is not None and len(node.users) == 1 and in_module(next(iter(node.users)), owner):
        node = next(iter(node.users))
    return node, owner


def reads_tensor(gm: GraphModule, node: Node, tensor: torch.Tensor) -> bool:
    return node.op == "get_attr" and gm.get_parameter(node.target) is tensor


def build(ctx: CompileContext, assignment: Assignment, weight: torch.Tensor
          ) -> PromptEmbedding | PromptEncoder:
    config = assignment.rule.config
    where = f"'{assignment.site.path}'"
    if config.method == "ptuning":
        option = "hidden" if config.hidden > config.tokens else "tokens"
        return build_sized(ctx, assignment.rule, option, where,
                           lambda **kw: PromptEncoder(config, weight.shape[1], **kw),
                           weight.device, weight.dtype)
    return build_sized(ctx, assignment.rule, "tokens", where,
                       lambda device, dtype: PromptEmbedding(
                           config, weight if device == weight.device else weight.to("meta")),
                       weight.device, weight.dtype)


def extend_inputs(gm: GraphModule, ids: Node, tokens: int) -> int:
    """Pad every [batch, seq] input on the left by `tokens`; slice sequence outputs back.
    Returns the number of outputs sliced."""
    graph = gm.graph
    seq = ids.meta["val"].shape[1]
    inputs = [n for n in graph.nodes if n.op == "placeholder" and token_shaped(n, seq)]
    for node in inputs:
        fill = 1 if node.target == MASK_INPUT else 0
        with graph.inserting_after(inputs[-1]):
            padded = graph.call_function(aten.constant_pad_nd.default, (node, [tokens, 0], fill))
        padded.meta[INSERTED] = "prompt"
        node.replace_all_uses_with(
            padded, delete_user_cb=lambda user, padded=padded: keeps_original(user, padded))
    return slice_outputs(gm, seq, tokens)


def token_shaped(node: Node, seq) -> bool:
    """A [batch, seq] input over the token ids' sequence dim. Only the sequence symbol is
    compared: exported with `Dim.AUTO` (see frontend/trace.py), inputs can carry batch
    symbols of their own."""
    val = node.meta.get("val")
    return isinstance(val, torch.Tensor) and val.dim() == 2 and str(val.shape[1]) == str(seq)


def keeps_original(user: Node, padded: Node) -> bool:
    """Export's input guards check the inputs as given; everything else reads the padded."""
    return user is not padded and not (user.op == "call_module" and user.target == "_guards_fn")


def splice_prompts(gm: GraphModule, lookup: Node, target: str, module, method: str,
                   positions: Node | None = None) -> None:
    gm.add_submodule(target, module)
    with gm.graph.inserting_after(lookup):
        call = gm.graph.call_module(target, (lookup,) if positions is None else (lookup, positions))
    mark_inserted(call, lookup, method)
    call.meta["val"] = lookup.meta.get("val")
    lookup.replace_all_uses_with(call, delete_user_cb=lambda user: user is not call)


def slice_outputs(gm: GraphModule, seq, tokens: int) -> int:
    """outputs[:, n:] for every output whose dim 1 is the input sequence."""
    output = next(n for n in gm.graph.nodes if n.op == "output")
    sliced = 0
    for node in output.all_input_nodes:
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor) and val.dim() >= 2 and str(val.shape[1]) == str(seq):
            with gm.graph.inserting_before(output):
                real = gm.graph.call_function(aten.slice.Tensor, (node, 1, tokens))
            real.meta[INSERTED] = "prompt"
            output.replace_input_with(node, real)
            sliced += 1
    return sliced
