"""Target resolution: spec patterns → sites, with role aliases and "did you mean" suggestions.

A pattern is matched against module paths segment by segment from the end: a bare name
matches a path suffix at dot boundaries (`q_proj` ~ `model.layers.3.self_attn.q_proj`) and
`*` globs within a segment. Role aliases (`attn.q`, `ffn.*`, ...) expand per model family (or
per naming scheme, for families without a table) so one spec ports across architectures.
Later statements override earlier ones per module and method; different methods on one
module compose (LoRA inside the layer, adapter after it).
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass
from fnmatch import fnmatchcase

from adaptc.errors import Diagnostic, SpecError
from adaptc.frontend.sites import Site, stack_depths, stack_of
from adaptc.spec.ast import Span, Target
from adaptc.spec.ir import Plan, Rule

def role_table(attn: str, qkv: str | tuple[str, str, str], o: str, ffn: str,
               gate_up_down: tuple[str | None, str, str], embed: str) -> dict[str, list[str]]:
    """One family's role aliases from its module names. `qkv` is one fused projection or the
    q, k, v projections; `gate_up_down` the FFN's (a fused gate/up projection named twice; no
    gate: None). `attn` and `ffn` are where a block-level adapter goes: the attention and FFN
    modules, or their output linears where the module also adds the residual (BERT)."""
    q, k, v = (qkv, qkv, qkv) if isinstance(qkv, str) else qkv
    gate, up, down = gate_up_down
    table = {"attn": [attn], "attn.q": [q], "attn.k": [k], "attn.v": [v], "attn.o": [o],
             "attn.*": list(dict.fromkeys((q, k, v, o))), "ffn": [ffn], "ffn.up": [up],
             "ffn.down": [down], "ffn.*": list(dict.fromkeys(n for n in (gate, up, down) if n)),
             "embed": [embed]}
    if isinstance(qkv, str):
        table["attn.qkv"] = [qkv]
    if gate:
        table["ffn.gate"] = [gate]
    return table


def fused_qkv_aliases(attention: str, embed: str) -> dict[str, list[str]]:
    """GPT-NeoX (Pythia), BLOOM and Falcon: one fused `query_key_value` under `attention`,
    an FFN of `dense_h_to_4h` and `dense_4h_to_h`."""
    return role_table(attention, f"{attention}.query_key_value", f"{attention}.dense", "mlp",
                      (None, "mlp.dense_h_to_4h", "mlp.dense_4h_to_h"), embed)


def separate(attention: str, q: str, k: str, v: str) -> tuple[str, str, str]:
    return f"{attention}.{q}", f"{attention}.{k}", f"{attention}.{v}"


LLAMA_QKV = separate("self_attn", "q_proj", "k_proj", "v_proj")
LLAMA_ALIASES = role_table("self_attn", LLAMA_QKV, "self_attn.o_proj", "mlp",
                           ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"), "embed_tokens")
GPT2_ALIASES = role_table("attn", "attn.c_attn", "attn.c_proj", "mlp",
                          (None, "mlp.c_fc", "mlp.c_proj"), "wte")
# BertOutput adds the residual and normalises: `ffn` is its dense, Houlsby's adapter position
BERT_ALIASES = role_table("attention.output.dense",
                          separate("attention.self", "query", "key", "value"),
                          "attention.output.dense", "layer.*.output.dense",
                          (None, "intermediate.dense", "layer.*.output.dense"),
                          "embeddings.word_embeddings")
ALIASES = {
    "llama": LLAMA_ALIASES, "mistral": LLAMA_ALIASES, "qwen2": LLAMA_ALIASES,
    "gpt2": GPT2_ALIASES, "bert": BERT_ALIASES,
    # OPT has no FFN module: `ffn` is its output linear fc2, as BERT's output.dense
    "opt": role_table("self_attn", LLAMA_QKV, "self_attn.out_proj", "layers.*.fc2",
                      (None, "layers.*.fc1", "layers.*.fc2"), "decoder.embed_tokens"),
    "gpt_neox": fused_qkv_aliases("attention", "embed_in"),
    "bloom": fused_qkv_aliases("self_attention", "word_embeddings"),
    "falcon": fused_qkv_aliases("self_attention", "word_embeddings"),
    "phi3": role_table("self_attn", "self_attn.qkv_proj", "self_attn.o_proj", "mlp",
                       ("mlp.gate_up_proj", "mlp.gate_up_proj", "mlp.down_proj"), "embed_tokens"),
    "phi": role_table("self_attn", LLAMA_QKV, "self_attn.dense", "mlp",
                      (None, "mlp.fc1", "mlp.fc2"), "embed_tokens"),
    "gptj": role_table("attn", separate("attn", "q_proj", "k_proj", "v_proj"), "attn.out_proj",
                       "mlp", (None, "mlp.fc_in", "mlp.fc_out"), "wte"),
    "mpt": role_table("attn", "attn.Wqkv", "attn.out_proj", "ffn",
                      (None, "ffn.up_proj", "ffn.down_proj"), "wte"),
    "distilbert": role_table("attention", separate("attention", "q_lin", "k_lin", "v_lin"),
                             "attention.out_lin", "ffn", (None, "ffn.lin1", "ffn.lin2"),
                             "embeddings.word_embeddings"),
    "deberta-v2": role_table("attention.output.dense",
                             separate("attention.self", "query_proj", "key_proj", "value_proj"),
                             "attention.output.dense", "layer.*.output.dense",
                             (None, "intermediate.dense", "layer.*.output.dense"),
                             "embeddings.word_embeddings"),
    "modernbert": role_table("attn", "attn.Wqkv", "attn.Wo", "mlp",
                             ("mlp.Wi", "mlp.Wi", "mlp.Wo"), "embeddings.tok_embeddings"),
}
# Encoder-decoders: `attn.q` ... name the projections of every attention, cross-attention
# included (PEFT's defaults for T5 and BART); `attn` is the self-attention's output.
T5_FFN = ["DenseReluDense.wi", "DenseReluDense.wi_0", "DenseReluDense.wi_1", "DenseReluDense.wo"]
ALIASES["t5"] = {
    **{f"attn.{p}": [f"SelfAttention.{p}", f"EncDecAttention.{p}"] for p in "qkvo"},
    "attn": ["SelfAttention.o"],
    "attn.*": [f"{a}.{p}" for a in ("SelfAttention", "EncDecAttention") for p in "qkvo"],
    "ffn": ["DenseReluDense"], "ffn.gate": [T5_FFN[1]], "ffn.up": [T5_FFN[0], T5_FFN[2]],
    "ffn.down": [T5_FFN[3]], "ffn.*": T5_FFN, "embed": ["shared"],
}
ALIASES["bart"] = {
    **{f"attn.{p}": [f"self_attn.{p}_proj", f"encoder_attn.{p}_proj"] for p in "qkv"},
    "attn": ["self_attn"], "attn.o": ["self_attn.out_proj", "encoder_attn.out_proj"],
    "attn.*": [f"{a}.{p}" for a in ("self_attn", "encoder_attn")
               for p in ("q_proj", "k_proj", "v_proj", "out_proj")],
    "ffn": ["layers.*.fc2"], "ffn.up": ["fc1"], "ffn.down": ["fc2"], "ffn.*": ["fc1", "fc2"],
    "embed": ["shared"],
}
# Where absolute positions are looked up (GPT-2; BERT, RoBERTa; OPT; rotary models are found
# by their *RotaryEmbedding module instead); prefix methods shift positions by the prefix length.
POSITION_TABLES = ("wpe", "embeddings.position_embeddings", "decoder.embed_positions")
# For methods that rewrite the attention op (prefix, ptuning2), `attn` names the module that
# computes it; where that differs from the table above (BERT's `attn` is its output dense).
ATTENTION_OP_ALIASES = {family: {"attn": ["attention.self"]} for family in ("bert", "deberta-v2")}
ATTENTION_OP_ALIASES["t5"] = {"attn": ["SelfAttention"]}
# A family without a table of its own takes the first whose signature module it has:
# Qwen3, Gemma, OLMo, Granite, ... name their layers like Llama, RoBERTa and ELECTRA like BERT.
SIGNATURES = (("llama", "self_attn.o_proj"), ("gpt2", "attn.c_attn"),
              ("bert", "attention.self.query"))


@dataclass(frozen=True)
class Assignment:
    """One method placed on one site by one rule (after overrides)."""

    site: Site
    method: str
    rule: Rule
    target: Target


def matches(pattern: str, path: str) -> bool:
    """Suffix match at dot boundaries with per-segment globs."""
    want, have = pattern.split("."), path.split(".")
    return len(want) <= len(have) and all(
        fnmatchcase(seg, pat) for seg, pat in zip(have[-len(want):], want))


def owner_matches(pattern: str, path: str) -> bool:
    """A parameter path matches when the pattern matches it or a module that owns it:
    `*.bias` ~ `encoder.layer.0.output.dense.bias`, `*norm*` ~ `model.norm.weight`."""
    parts = path.split(".")
    return any(matches(pattern, ".".join(parts[:end])) for end in range(len(parts), 0, -1))


def naming(family: str | None, sites: list[Site]) -> str | None:
    """The alias table's key for a model: its own family's, or the one its module names fit."""
    if family in ALIASES:
        return family
    return next((known for known, signature in SIGNATURES
                 if any(matches(signature, s.path) for s in sites)), None)


def expand(pattern: str, family: str | None, adapts: tuple[str, ...] = ()) -> list[str]:
    if "attention" in adapts and pattern in ATTENTION_OP_ALIASES.get(family or "", {}):
        return ATTENTION_OP_ALIASES[family][pattern]
    return ALIASES.get(family or "", {}).get(pattern, [pattern])


def resolve(plan: Plan, sites: list[Site], family: str | None,
            params: list[Site] | None = None) -> list[Assignment]:
    """Assign methods to sites; collect every located problem into one SpecError.

    Methods that adapt parameters (`train`) are matched against `params`, the parameter
    table, where a pattern names a parameter or any module that owns it."""
    family = naming(family, sites)
    params = params or []
    stacks = tuple(p for p in params if p.expert_stack)
    chosen: dict[tuple[str, str], Assignment] = {}
    problems: list[Diagnostic] = []
    for rule in plan.rules:
        pool = params if "parameter" in rule.config.adapts else sites
        experts = stacks if getattr(type(rule.config), "adapts_experts", False) else ()
        for target in rule.targets:
            found = match_target(plan, rule, target, pool, family, problems, experts)
            for site in found:
                chosen[(site.path, rule.config.method)] = Assignment(site, rule.config.method,
                                                                     rule, target)
    problems += shape_problems(plan, list(chosen.values()))
    problems += layer_conflicts(plan, list(chosen.values()))
    problems += expert_problems(plan, list(chosen.values()))
    if problems:
        raise SpecError(problems)
    order = {s.path: i for i, s in enumerate(sites + params)}
    return sorted(chosen.values(), key=lambda a: (order[a.site.path], a.method))


def match_target(plan: Plan, rule: Rule, target: Target, sites: list[Site], family: str | None,
                 problems: list[Diagnostic],
                 experts: tuple[Site, ...] = ()) -> list[Site]:
    """The sites of `sites` a target selects; a pattern that names no module but names expert
    stacks (`experts.gate_up_proj`) selects those when the method adapts them (lora). A layer
    selection counts layers in each block stack: `[-1]` is the encoder's last layer and the
    decoder's, whatever their depths."""
    patterns = expand(target.pattern, family, rule.config.adapts)
    test = owner_matches if "parameter" in rule.config.adapts else matches
    found = [s for s in sites if any(test(p, s.path) for p in patterns)]
    if not found:
        found = [s for s in experts if any(matches(p, s.path) for p in patterns)]
    if not found:
        problems.append(no_match(plan, target, patterns, sites, family))
        return []
    if target.layers is not None:
        depths = stack_depths(sites)
        named = {stack_of(s.path): depths.get(stack_of(s.path), 0) for s in found}
        found = [s for s in found if s.layer in target.layers.pick(named[stack_of(s.path)])]
        if not found:
            has = " and ".join(f"{stack} 0..{depth - 1}" if len(named) > 1 else f"0..{depth - 1}"
                               for stack, depth in named.items() if depth)
            where = f"the model has layers {has}" if has else "it is in no layer"
            problems.append(diag(plan, target.layers.span, "E304",
                                 f"layer selection picks no layer of '{target.pattern}' ({where})"))
            return []
    usable = [s for s in found if s.kind in rule.config.adapts or "module" in rule.config.adapts
              or s in experts]
    globbed = "*" in target.pattern or len(patterns) > 1 or len(found) > 1
    refused = [s for s in found if s not in usable]
    if not usable or (refused and not globbed):
        problems.append(diag(plan, target.span, "E302",
                             f"{rule.config.method} cannot adapt {refused[0].describe()}: "
                             f"it adapts {' and '.join(rule.config.adapts)} layers"))
        return []
    return usable


def no_match(plan: Plan, target: Target, patterns: list[str], sites: list[Site],
             family: str | None) -> Diagnostic:
    segments = {seg for s in sites for seg in s.path.split(".")[-2:] if not seg.isdigit()}
    aliases = {alias for alias, expansion in ALIASES.get(family or "", {}).items()
               if any(matches(p, s.path) for p in expansion for s in sites)}
    names = sorted((segments | aliases) - {target.pattern})
    close = difflib.get_close_matches(target.pattern, names, n=3, cutoff=0.5)
    hint = f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""
    kinds = ("linear", "parameter")
    suffixes = [s.path for s in sites if s.layer in (None, 0) and s.kind in kinds]
    nearest = difflib.get_close_matches(target.pattern, suffixes, n=5, cutoff=0.0)
    what = "parameter" if sites and sites[0].kind == "parameter" else "module"
    notes = [f"nearest {what} names: {', '.join(nearest)}"] if nearest else []
    notes[:0] = tied_notes(patterns, sites) + bias_notes(patterns, sites, what)
    if patterns != [target.pattern]:
        notes.insert(0, f"'{target.pattern}' stands for {', '.join(patterns)} in this model")
    elif family not in ALIASES and any(target.pattern in table for table in ALIASES.values()):
        notes.insert(0, f"'{target.pattern}' is a role alias, and this model has no alias "
                        "table (its family has none, and its module names are not Llama's, "
                        "GPT-2's or BERT's): write the module names")
    return diag(plan, target.span, "E301", f"'{target.pattern}' matches no {what}{hint}",
                tuple(notes))


def ffn_input_module(site_path: str, family: str | None) -> str | None:
    """Where the `ffn` alias names the FFN's output linear (BERT's and DeBERTa's output.dense,
    OPT's and BART's fc2), the path of the FFN's first linear in the same layer: its input
    is the FFN's input, which a parallel adapter at `ffn` reads (He et al. 2022). None
    where `ffn` is the FFN module itself (its input is the FFN's already)."""
    table = ALIASES.get(family or "", {})
    ffn, up = table.get("ffn", []), table.get("ffn.up", [])
    if len(up) != 1 or not any(matches(p, site_path) for p in ffn) or "." not in site_path:
        return None
    segments = site_path.split(".")
    layer = max((i for i, s in enumerate(segments) if s.isdigit()), default=None)
    if layer is None:
        return None
    return ".".join(segments[:layer + 1] + [up[0].rsplit("*.", 1)[-1]])


def bias_notes(patterns: list[str], sites: list[Site], what: str) -> list[str]:
    """For a parameter pattern naming biases (BitFit's `*.bias`) on a model that has none
    (Llama, Mistral): say so, rather than leave the nearest names to tell it."""
    names_bias = any("bias" in p.rsplit(".", 1)[-1] for p in patterns)
    if what != "parameter" or not names_bias or any(s.path.endswith("bias") for s in sites):
        return []
    return ["this model has no bias parameters (its linear layers and norms are bias-free): "
            "BitFit has nothing to train here; train the norms or use another method"]


def tied_notes(patterns: list[str], sites: list[Site]) -> list[str]:
    """For a parameter pattern that names only the second path of a tied tensor (GPT-2's and
    T5's `lm_head`, PEFT's usual modules_to_save): the path that selects it."""
    return [f"{alias} is {s.path} (tied): select it as '{s.path.rsplit('.', 1)[0]}'; "
            "training it trains every use of the tensor"
            for s in sites for alias in s.aliases if any(owner_matches(p, alias) for p in patterns)]


def shape_problems(plan: Plan, assignments: list[Assignment]) -> list[Diagnostic]:
    """Ranks that exceed a site's dimensions (E303) and prompt token ids beyond the
    vocabulary (E306), reported once per rule."""
    problems, seen = [], set()
    for a in assignments:
        found = rank_problem(plan, a) or vocab_problem(plan, a)
        if found and a.rule.index not in seen:
            seen.add(a.rule.index)
            problems.append(found)
    return problems


def layer_conflicts(plan: Plan, assignments: list[Assignment]) -> list[Diagnostic]:
    """E305: two methods that each rewrite a layer's own computation (`rewrites_layer`:
    lora, ia3, vera, ...) on one linear layer; reported once per pair of statements."""
    by_site: dict[str, list[Assignment]] = {}
    for a in assignments:
        if getattr(type(a.rule.config), "rewrites_layer", False):
            by_site.setdefault(a.site.path, []).append(a)
    problems, seen = [], set()
    for path, found in by_site.items():
        rules = tuple(sorted({a.rule.index for a in found}))
        if len(found) < 2 or rules in seen:
            continue
        seen.add(rules)
        later = max(found, key=lambda a: a.rule.index)
        others = ", ".join(f"{a.method} (line {a.rule.statement.span.line})"
                           for a in found if a is not later)
        problems.append(diag(plan, later.target.span, "E305",
                             f"'{path}' gets {later.method} here and {others}: a linear layer "
                             "takes at most one of the weight-space methods",
                             (f"weight-space methods: {', '.join(weight_space_methods())}",)))
    return problems


def weight_space_methods() -> list[str]:
    from adaptc.methods import METHODS
    return sorted(name for name, cls in METHODS.items() if getattr(cls, "rewrites_layer", False))


def expert_problems(plan: Plan, assignments: list[Assignment]) -> list[Diagnostic]:
    """E302: the LoRA options an expert stack cannot take (there is no per-layer input to
    drop out or gate, and DoRA and PiSSA are defined on one matrix), and a mixture, which
    turns LoRA on linear layers into routed experts; reported once per statement."""
    problems, seen = [], set()
    for a in assignments:
        if not a.site.expert_stack or a.rule.index in seen:
            continue
        seen.add(a.rule.index)
        config = a.rule.config
        refused = [key for key, bad in (("dropout", config.dropout > 0), ("gate", config.gate),
                                        ("dora", config.dora), ("init", config.init == "pissa"))
                   if bad]
        if refused:
            problems.append(diag(plan, a.rule.span_of(refused[0]), "E302",
                                 f"lora on the expert stack {a.site.describe()} takes no "
                                 f"{refused[0]}={getattr(config, refused[0])}"))
        elif plan.mixture is not None:
            problems.append(diag(plan, a.target.span, "E302",
                                 f"lora on the expert stack {a.site.describe()} cannot join "
                                 "the mixture statement: a mixture routes LoRA on linear layers"))
    return problems


def rank_problem(plan: Plan, a: Assignment) -> Diagnostic | None:
    r = getattr(a.rule.config, "r", None)
    bounded = getattr(type(a.rule.config), "rank_bound", True)
    if r is None or not bounded or not (a.site.kind == "linear" or a.site.expert_stack):
        return None
    limit = (min(a.site.shape[1:]) if a.site.expert_stack
             else min(a.site.in_features, a.site.out_features))
    if r <= limit:
        return None
    sides = "min(d₁, d₂)" if a.site.expert_stack else "min(in, out)"
    return diag(plan, a.rule.span_of("r"), "E303", f"r={r} exceeds {sides}={limit} of "
                f"{a.site.describe()}; need 1 <= r <= {limit}")


def vocab_problem(plan: Plan, a: Assignment) -> Diagnostic | None:
    init = getattr(a.rule.config, "init", None)
    if not isinstance(init, list) or a.site.kind != "embedding" or max(init) < a.site.in_features:
        return None
    return diag(plan, a.rule.span_of("init"), "E306", f"init token id {max(init)} is not in the "
                f"vocabulary of {a.site.describe()}; need ids < {a.site.in_features}")


def diag(plan: Plan, span: Span, code: str, message: str, notes: tuple[str, ...] = ()) -> Diagnostic:
    return Diagnostic(plan.spec.path, plan.spec.source, span.line, span.column,
                      span.end_column if span.end_line == span.line else span.column + 1,
                      code, message, notes)
