"""Pass (infer mode): GEMM results are added by the GEMM that computes them, in place.

    y = linear(x, W);  u = linear(h, s·B);  out = y + u       (an unmerged LoRA site)
      →  out = add_product_(linear(x, W), h, s·B)             y += h·(s·B)ᵀ: one addmm_
      or out = add_product_(linear(h, s·B), x, W)             u += x·Wᵀ (on a GPU)
    s = stream + linear(x, W)                                 (a residual add after o, down)
      →  s = add_product_(stream, x, W)                       stream += x·Wᵀ: one addmm_
    s = stream + (linear(x, W) + m)                           (m: a mixture's module call)
      →  s = add_product_(stream, x, W) + m                   lowered: the op's residual

`fuse_siblings` leaves each unmerged LoRA site as a B GEMM and an add: the GEMM writes the
update u, the add reads y and u back and writes the sum, four passes over an output-sized
tensor besides the base GEMM's one write. `addmm_` on y (cuBLAS / BLAS with β = 1) reads y
once and writes it once: at 8×512 tokens on the Llama-shaped 1.1B, the H200's device time
for all-linear r16 was 1.17× the base model's, and those passes over the seven projection
outputs of 22 layers are ~6.6 GB of the extra. A transformer block's residual adds are the
same pattern with the stream in y's place: the sublayer's last GEMM (o_proj, down_proj, their
LoRA updates after it) adds into the stream, which saves the add's three passes over the
hidden state, twice per layer, in the base model's own computation; where a mixture (or a
parallel adapter) sits on o_proj or down_proj, the sum is reassociated so the fused op reads
the updated stream as its residual and the block's add disappears. Each sum is rounded once,
in the GEMM's float32 accumulator, instead of twice.

On a GPU, of two GEMMs summed, the one with the shorter reduction writes its result and the
other adds into it (`by_reduction`): a GEMM reads the tensor it adds into in its epilogue,
which a long reduction (the base GEMM, K = d_in) can hide behind its arithmetic, while a
short one (a LoRA B GEMM, K = r) is all memory traffic, where the read is one more pass over
the output. Not yet timed on a GPU (benchmarks/unmerged_updates.py times both orders). On the
CPU, where the two differ by less than the measurements' noise, the B GEMM adds into y.

The left operand y must be a fresh result (a GEMM, an add, an embedding, a fused op) whose
every other reader, through anything that may alias it (views, no-op casts), runs before the
add, so updating it in place is invisible outside the rewrite; the right operand a chain of
bias-free GEMMs (linear, or a linear some updates were already added to) that nothing else
reads; all in one dtype, no broadcast. GPT-2's and BERT's projections have biases: there only
the LoRA updates accumulate. Export and torch.compile trace through `add_product_`
(functionalised to an out-of-place addmm).
"""
from __future__ import annotations

import torch
from torch.fx import GraphModule, Node

from adaptc.passes.base import INSERTED, CompileContext, PassResult
from adaptc.passes.bind_ops import computes_nothing
from adaptc.passes.graph import aten, attr_tensor, plain_add

FRESH_RESULTS = {  # ops whose output shares storage with none of their inputs
    aten.linear.default, aten.mm.default, aten.addmm.default, aten.add.Tensor, aten.sub.Tensor,
    aten.mul.Tensor, aten.div.Tensor, aten.pow.Tensor_Scalar, aten.mean.dim, aten.rsqrt.default,
    aten.embedding.default, aten._to_copy.default, aten.layer_norm.default,
    aten.native_layer_norm.default,
}


def add_product_(out: torch.Tensor, h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """out += h·weightᵀ in place (one GEMM reading out), for out [..., n], h [..., r],
    weight [n, r]; returns out."""
    out.view(-1, out.shape[-1]).addmm_(h.reshape(-1, h.shape[-1]), weight.t())
    return out


class AccumulateUpdates:
    name = "accumulate_updates"

    def run(self, gm: GraphModule, ctx: CompileContext) -> PassResult:
        counts = {"lora_updates_accumulated": 0, "stream_adds_accumulated": 0}
        earlier: set[Node] = set()
        for node in list(gm.graph.nodes):
            found = accumulation(gm, node, earlier)
            earlier.add(node)
            if found is None:
                continue
            target, terms, product, rest = found
            fused = target
            with gm.graph.inserting_before(node):
                for h, weight, source in terms:
                    fused = gm.graph.call_function(add_product_, (fused, h, weight))
                    fused.meta.update(node.meta)
                    fused.meta[INSERTED] = source.meta.get(INSERTED)
                    earlier.add(fused)
                if rest is not None:  # (y + m) → (stream + y) + m: m's add stays for lowering
                    fused = gm.graph.call_function(aten.add.Tensor, (fused, rest))
                    fused.meta.update(node.meta)
                    earlier.add(fused)
            chain = product.args[0] if rest is not None else product
            lora = lora_update(target) or lora_update(chain)
            counts["lora_updates_accumulated" if lora else "stream_adds_accumulated"] += 1
            node.replace_all_uses_with(fused)
            for done in [node, *([product] if rest is not None else []), *chain_nodes(chain)]:
                gm.graph.erase_node(done)
        gm.recompile()
        return PassResult(gm, counts)


def lora_update(node: Node) -> bool:
    """`node` is an unmerged LoRA update's B GEMM (each `add_product_` carries the mark of the
    GEMM it computes, so one adding a base GEMM into that update is unmarked)."""
    return node.target == aten.linear.default and node.meta.get(INSERTED) == "lora"


def accumulation(gm: GraphModule, add: Node, earlier: set[Node]
                 ) -> tuple[Node, list[tuple[Node, Node, Node]], Node, Node | None] | None:
    """(y, [(h, W, the GEMM node it came from), ...], the right operand, m) when `add` is
    y + Σ h·Wᵀ, or y + (Σ h·Wᵀ + m) with m an adapter's output (a mixture after o_proj or
    down_proj, still a module call here), and y can take the products in place; else None
    (m None when there is none). `earlier`: the nodes before `add`."""
    if not plain_add(add):
        return None
    for target, product in by_reduction(gm, add):
        rest = product.args[1] if plain_add(product) and len(product.users) == 1 \
            and product.args[1].op == "call_module" else None
        terms = product_terms(gm, product.args[0] if rest is not None else product)
        aliases = None if terms is None else writable_aliases(target, add, earlier)
        if aliases is None:
            continue
        value, out = target.meta["val"], add.meta.get("val")
        if isinstance(out, torch.Tensor) and out.shape == value.shape and rest not in aliases \
                and all(h not in aliases and fits(gm, h, w, value) for h, w, _ in terms):
            return target, terms, product, rest
    return None


INTO_SHORTER_ON = {"cuda"}  # device types where the shorter-reduction GEMM is added into


def by_reduction(gm: GraphModule, add: Node) -> list[tuple[Node, Node]]:
    """The (target, product) orders of `add`'s operands to try: on INTO_SHORTER_ON devices the
    one whose target is the GEMM with the shorter reduction first (an operand that is no
    linear counts as longest), elsewhere the add's own order."""
    def reduction(node: Node) -> float:
        weight = weight_of(gm, node.args[1]) if node.target == aten.linear.default else None
        if not isinstance(weight, torch.Tensor) or weight.device.type not in INTO_SHORTER_ON:
            return float("inf")
        return weight.shape[-1]
    a, b = add.args
    return sorted([(a, b), (b, a)], key=lambda pair: reduction(pair[0]))


def weight_of(gm: GraphModule, weight: Node) -> torch.Tensor | None:
    """The tensor (or its fake, where traced) a GEMM's weight operand stands for."""
    if not isinstance(weight, Node):
        return None
    return attr_tensor(gm, weight.target) if weight.op == "get_attr" else weight.meta.get("val")


def product_terms(gm: GraphModule, node: Node) -> list[tuple[Node, Node, Node]] | None:
    """[(h, W, GEMM node)] when `node` is a bias-free linear(h, W), or add_product_ of such a
    chain, read only by its one user; else None."""
    if node.op != "call_function" or len(node.users) != 1 or node.kwargs:
        return None
    if node.target == aten.linear.default and len(node.args) == 2:
        return [(node.args[0], node.args[1], node)]
    if node.target is add_product_:
        inner = product_terms(gm, node.args[0])
        return None if inner is None else [*inner, (node.args[1], node.args[2], node)]
    return None


def chain_nodes(product: Node) -> list[Node]:
    """The product chain's nodes, outermost first (erasable in that order)."""
    nodes = [product]
    while nodes[-1].target is add_product_:
        nodes.append(nodes[-1].args[0])
    return nodes


def writable_aliases(target: Node, add: Node, earlier: set[Node]) -> set[Node] | None:
    """The nodes sharing `target`'s storage when it is a fresh contiguous tensor (or a no-op
    cast of one: the stream in a float32 Llama) that nothing reads after `add`; else None."""
    root = storage_owner(target)
    fresh = root.op == "call_function" and (
        root.target in FRESH_RESULTS or root.target is add_product_
        or getattr(root.target, "namespace", None) == "adaptc")
    value = target.meta.get("val")
    if not fresh or not isinstance(value, torch.Tensor) or not value.is_contiguous():
        return None
    aliases = alias_closure(root)
    readers = {user for alias in aliases for user in alias.users}
    return aliases if all(r is add or r in earlier for r in readers) else None


def storage_owner(node: Node) -> Node:
    """The node whose result `node` is, seen through no-op casts and eval-mode dropout."""
    while node.op == "call_function" and computes_nothing(node):
        node = node.args[0]
    return node


def alias_closure(node: Node) -> set[Node]:
    """`node` and every node downstream that may share its storage (any op not known to
    return a fresh tensor: views, no-op casts, eval-mode dropout)."""
    seen, todo = {node}, [node]
    while todo:
        for user in todo.pop().users:
            if user not in seen and user.op == "call_function" \
                    and user.target not in FRESH_RESULTS and user.target is not add_product_ \
                    and getattr(user.target, "namespace", None) != "adaptc":
                seen.add(user)
                todo.append(user)
    return seen


def fits(gm: GraphModule, h: Node, weight: Node, out: torch.Tensor) -> bool:
    """Whether h·weightᵀ adds into `out` as is: weight [n, r] in out's dtype, and h (where
    traced: a pass's new nodes are not) in that dtype with out's leading shape."""
    w = weight_of(gm, weight)
    value = h.meta.get("val")
    return isinstance(w, torch.Tensor) and w.dtype == out.dtype and w.shape[0] == out.shape[-1] \
        and (not isinstance(value, torch.Tensor)
             or (value.dtype == out.dtype and value.shape[:-1] == out.shape[:-1]))
