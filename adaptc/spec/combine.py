"""Which statements may share a spec: the one combination table, checked by `spec.lower`.

Pipeline: text → AST → Plan (`spec.lower`, which calls `check` here) → compiler passes.
Methods stack when they rewrite different parts of the graph: LoRA inside linear layers,
adapters on module outputs, prefixes at the attention op, prompts at the input embedding,
a mixture in place of LoRA. Two that supply the same thing cannot: a forbidden pair is
reported (E209) at the method of the later statement, with a note naming the earlier one.
The same method twice is not a combination: the later statement wins where both apply.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

from adaptc.spec.ast import Span
from adaptc.spec.ir import MixtureRule, Rule

# Every pair of statement kinds; None: they stack; a string: why they cannot.
STACKING: dict[frozenset[str], str | None] = {
    frozenset(pair.split()): why for pair, why in {
        "lora adapter": None,
        "lora prefix": None,            # UniPELT (with gate), or plain
        "lora ptuning2": None,
        "lora prompt": None,
        "lora ptuning": None,
        "lora mixture": None,           # the mixture turns the LoRA sites into experts
        "adapter prefix": None,         # MAM adapter: parallel FFN adapter + prefix
        "adapter ptuning2": None,
        "adapter prompt": None,
        "adapter ptuning": None,
        "adapter mixture": None,
        "prefix ptuning2": "both supply the key/value prefix of the attention; keep one "
                           "(ptuning2 is prefix without reparameterisation)",
        "prefix prompt": None,          # prompt tokens are real tokens to the prefix
        "prefix ptuning": None,
        "prefix mixture": None,
        "ptuning2 prompt": None,
        "ptuning2 ptuning": None,
        "ptuning2 mixture": None,
        "prompt ptuning": "both supply the virtual tokens before the input; keep one "
                          "(ptuning is prompt with a prompt encoder)",
        "prompt mixture": None,
        "ptuning mixture": None,
        # ia3 and vera rewrite a linear layer like lora: together on one layer they are
        # refused per site (E305); on different layers, and with everything else, they stack.
        "ia3 vera": None,
        "ia3 lora": None,
        "vera lora": None,
        **{f"{method} {other}": None for method in ("ia3", "vera")
           for other in ("adapter", "prefix", "ptuning2", "prompt", "ptuning", "mixture")},
        # adalora is weight-space like lora (E305 per layer); quantize changes how a frozen
        # weight is stored and train which base tensors train: both stack with everything.
        **{f"{method} {other}": None for method in ("adalora", "quantize", "train")
           for other in ("lora", "ia3", "vera", "adapter", "prefix", "ptuning2", "prompt",
                         "ptuning", "mixture", "adalora", "quantize", "train")
           if method != other},
    }.items()
}

# Methods that prepend keys and values: the model's positions shift by one prefix length.
PREFIX_KINDS = ("prefix", "ptuning2")

Add = Callable[[Span, str, str, tuple[str, ...]], None]


def check(rules: Sequence[Rule], mixture: MixtureRule | None, add: Add) -> None:
    """Report every forbidden pair, prefix statements that disagree on tokens, and a mixture
    over gated (UniPELT) LoRA."""
    statements = [(rule.config.method, rule.statement.method_span) for rule in rules]
    if mixture is not None:
        statements.append(("mixture", mixture.statement.kind_span))
    statements.sort(key=lambda s: (s[1].line, s[1].column))
    first: dict[str, Span] = {}
    for kind, span in statements:
        for earlier, earlier_span in first.items():
            why = STACKING.get(frozenset((kind, earlier)))
            if kind != earlier and why:
                add(span, "E209", f"'{kind}' cannot be combined with '{earlier}': {why}",
                    (f"'{earlier}' is on line {earlier_span.line}",))
        first.setdefault(kind, span)
    for kind in PREFIX_KINDS:  # a mix of the two kinds is already forbidden above
        _same_tokens([r for r in rules if r.config.method == kind], add)
    gated = [r for r in rules if r.config.method == "lora" and r.config.gate]
    if mixture is not None and gated:
        add(mixture.statement.kind_span, "E209", "a mixture cannot turn gated LoRA into experts",
            (f"the LoRA statement on line {gated[0].statement.span.line} has 'gate'",))


def _same_tokens(rules: Sequence[Rule], add: Add) -> None:
    for rule in rules[1:]:
        if rule.config.tokens != rules[0].config.tokens:
            add(rule.span_of("tokens"), "E209",
                f"{rule.config.method} statements must use the same tokens ({rule.config.tokens} here, "
                f"{rules[0].config.tokens} on line {rules[0].statement.span.line})",
                ("the model's positions shift by the prefix length, which must be one number",))
