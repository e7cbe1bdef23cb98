"""spec.lower: configs from options, every E2xx check located exactly, all problems at once."""
from pathlib import Path

import pytest

from adaptc.errors import SpecError
from adaptc.methods import AdapterConfig, LoraConfig, MixtureConfig
from adaptc.spec import compile_spec, lower, parse_spec
from adaptc.spec.ast import Span


def problems(text: str) -> list:
    with pytest.raises(SpecError) as caught:
        compile_spec(text, "t.adapt")
    return caught.value.diagnostics


def only_problem(text: str):
    (diagnostic,) = problems(text)
    return diagnostic


# ---- successful lowering ----------------------------------------------------------------

def test_defaults_and_given_values():
    plan = compile_spec("q_proj,v_proj: lora r=16 alpha=32 rslora\nffn.*: adapter")
    lora, adapter = plan.rules
    assert lora.config == LoraConfig(r=16, alpha=32.0, dropout=0.0, rslora=True)
    assert type(lora.config.alpha) is float
    assert adapter.config == AdapterConfig()
    assert plan.mixture is None


def test_every_key_of_every_method():
    plan = compile_spec("a: lora r=4 alpha=0.5 dropout=0.1 rslora=false\n"
                        "b: adapter bottleneck=16 activation=gelu placement='parallel'\n"
                        "mixture moe k=1 experts=[2, 4, 8] router=soft balance=0")
    assert plan.rules[0].config == LoraConfig(r=4, alpha=0.5, dropout=0.1, rslora=False)
    assert plan.rules[1].config == AdapterConfig(bottleneck=16, activation="gelu",
                                                 placement="parallel")
    assert plan.mixture.config == MixtureConfig(k=1, experts=[2, 4, 8], router="soft", balance=0.0)


def test_rules_keep_statement_index_targets_and_statement():
    spec = parse_spec("mixture moe\nq_proj[0:2]: lora\nq_proj: lora r=4")
    plan = lower(spec)
    assert plan.spec is spec
    assert [rule.index for rule in plan.rules] == [1, 2]
    first = plan.rules[0]
    assert first.statement is spec.statements[1]
    assert first.targets == spec.statements[1].targets
    assert plan.mixture.statement is spec.statements[0]
    assert plan.mixture.config == MixtureConfig()


def test_same_targets_in_two_statements_is_not_an_error():
    """Override (a later statement wins per module) is the compiler's business."""
    plan = compile_spec("q_proj: lora r=4\nq_proj: lora r=8")
    assert [rule.config.r for rule in plan.rules] == [4, 8]


def test_span_of_points_at_value_or_method():
    rule = compile_spec("q: lora r=4").rules[0]
    assert rule.span_of("r") == Span(1, 11, 1, 12)
    assert rule.span_of("alpha") == Span(1, 4, 1, 8)


def test_strings_and_names_are_interchangeable_for_choices():
    names = compile_spec("a: adapter activation=silu").rules[0].config
    strings = compile_spec('a: adapter activation="silu"').rules[0].config
    assert names == strings


def test_experts_accepts_an_int_or_a_list():
    assert compile_spec("a: lora\nmixture moe experts=6").mixture.config.experts == 6
    assert compile_spec("a: lora\nmixture moe experts=[4,8]").mixture.config.experts == [4, 8]


# ---- every E2xx code, located exactly ---------------------------------------------------

# (spec text, code, line, column, end column, fragment of the message)
INVALID = [
    # E201 unknown method / mixture kind
    ("q: lorra r=8", "E201", 1, 4, 9, "unknown method 'lorra'; did you mean 'lora'?"),
    ("q: lora\nmixture mo k=2", "E201", 2, 9, 11, "unknown mixture kind 'mo'; did you mean 'moe'?"),
    ("q: prefixx", "E201", 1, 4, 11, "unknown method 'prefixx'; did you mean 'prefix'?"),
    ("q: LoRA", "E201", 1, 4, 8, "unknown method 'LoRA'; did you mean 'lora'?"),  # case-blind
    ("q: lora init=PiSSA", "E204", 1, 14, 19, "'PiSSA' is not a valid init; did you mean 'pissa'?"),
    # E202 unknown key
    ("q: lora alpah=16", "E202", 1, 9, 14, "unknown key 'alpah' for lora; did you mean 'alpha'?"),
    ("q: adapter\n  ffn: adapter size=4", "E202", 2, 16, 20, "unknown key 'size' for adapter"),
    ("q: lora\nmixture moe topk=2", "E202", 2, 13, 17, "unknown key 'topk' for moe"),
    # E203 wrong type
    ("q: lora r=8.5", "E203", 1, 11, 14, "r expects an integer, got float 8.5"),
    ("q: lora r=true", "E203", 1, 11, 15, "r expects an integer, got bool true"),
    ("q: lora r", "E203", 1, 9, 10, "r expects an integer, got bool true"),
    ("q: lora r='8'", "E203", 1, 11, 14, "r expects an integer, got string '8'"),
    ("q: lora alpha=high", "E203", 1, 15, 19, "alpha expects a number, got name high"),
    ("q: lora rslora=1", "E203", 1, 16, 17, "rslora expects true or false, got int 1"),
    ("q: lora rslora=yes", "E203", 1, 16, 19, "rslora expects true or false, got name yes"),
    ("q: adapter activation=3", "E203", 1, 23, 24,
     "activation expects a name or a string, got int 3"),
    ("q: adapter placement=[a]", "E203", 1, 22, 25, "got list [a]"),
    ("q: lora\nmixture moe experts=[]", "E203", 2, 21, 23,
     "experts expects an integer or a non-empty list of integers, got list []"),
    ("q: lora\nmixture moe experts=[2, 2.5]", "E203", 2, 25, 28, "got float 2.5"),
    ("q: lora\nmixture moe experts=two", "E203", 2, 21, 24, "got name two"),
    # E204 out of range / not a valid choice
    ("q: lora dropout=1.0", "E204", 1, 17, 20, "dropout must be in [0, 1), got 1.0"),
    ("q: lora dropout=-0.1", "E204", 1, 17, 21, "dropout must be in [0, 1), got -0.1"),
    ("q: lora r=0", "E204", 1, 11, 12, "r must be >= 1, got 0"),
    ("q: lora alpha=-2", "E204", 1, 15, 17, "alpha must be >= 0, got -2"),
    ("q: lora alpha=1e999", "E204", 1, 15, 20, "alpha must be a finite number, got inf"),
    ("q: adapter bottleneck=0", "E204", 1, 23, 24, "bottleneck must be >= 1, got 0"),
    ("q: adapter activation=gleu", "E204", 1, 23, 27,
     "'gleu' is not a valid activation; did you mean 'gelu'?"),
    ("q: adapter placement='inside'", "E204", 1, 22, 30, "'inside' is not a valid placement"),
    ("q: lora init=svd", "E204", 1, 14, 17, "'svd' is not a valid init"),
    ("q: lora init='\\n'", "E204", 1, 14, 18, "'\\n' is not a valid init"),  # escaped, one line
    ("q: lora\nmixture moe router=hard", "E204", 2, 20, 24, "'hard' is not a valid router"),
    ("q: lora\nmixture moe experts=[2, 0]", "E204", 2, 25, 26, "experts must be >= 1, got 0"),
    ("q: lora\nmixture moe balance=-1.5", "E204", 2, 21, 25, "balance must be >= 0, got -1.5"),
    ("q: vera seed=18446744073709551616", "E204", 1, 14, 34,  # torch's seeds end at 2^64 - 1
     "seed must be in [0, 18446744073709551615], got 18446744073709551616"),
    # E205 the config's own check(): at the key's value, or the kind if the key took its default
    ("q: lora\nmixture moe k=5", "E205", 2, 15, 16, "k=5 exceeds the number of experts (4)"),
    ("q: lora\nmixture moe experts=1", "E205", 2, 9, 12, "k=2 exceeds the number of experts (1)"),
    ("q: lora\nmixture moe k=3 experts=[4, 2]", "E205", 2, 15, 16,
     "k=3 exceeds the number of experts (2)"),
    ("q: lora alpha=0 init=pissa", "E205", 1, 15, 16, "init=pissa needs alpha > 0"),
    ("q: adalora", "E205", 1, 4, 11, "adalora needs total_step > 0"),
    ("q: adalora total_step=10 tinit=10", "E205", 1, 32, 34, "leaves no budgeting phase"),
    ("q: lora\nmixture loramoe experts=4 knowledge=4", "E205", 2, 37, 38,
     "knowledge=4 leaves no task experts"),
    # E206 duplicate key
    ("q: lora r=4 r=8", "E206", 1, 13, 14, "duplicate key 'r'"),
    ("q: lora\nmixture moe k=1 router=soft k=1", "E206", 2, 29, 30, "duplicate key 'k'"),
    # E207 mixture problems
    ("q: lora\nmixture moe\nmixture moe k=1", "E207", 3, 1, 12, "only one mixture statement"),
    ("ffn: adapter\nmixture moe", "E207", 2, 1, 12,
     "a mixture needs at least one 'lora' or 'ia3' statement"),
    ("mixture moe", "E207", 1, 1, 12, "at least one 'lora' or 'ia3' statement"),
    ("q: lora init=pissa\nmixture moe", "E207", 1, 14, 19,
     "init=pissa cannot be used with a mixture statement"),
    ("q: lora freeze_a\nmixture moe", "E207", 1, 9, 17,
     "freeze_a=true cannot be used with a mixture statement"),
    # E208 empty spec
    ("", "E208", 1, 1, 2, "the spec has no statements"),
    ("# nothing yet\n\n;\n", "E208", 1, 1, 2, "the spec has no statements"),
    # prefix and prompt methods: token ids or a name for init, ranges, choices
    ("q: prompt init=[1, -1]", "E204", 1, 20, 22, "init must be >= 0, got -1"),
    ("q: prompt init=1.5", "E203", 1, 16, 19,
     "init expects a name or a non-empty list of integers, got float 1.5"),
    ("q: prompt init=[1, a]", "E203", 1, 20, 21, "got name a"),
    ("q: prompt init=foo", "E204", 1, 16, 19, "'foo' is not a valid init"),
    ("q: ptuning encoder=gru", "E204", 1, 20, 23, "'gru' is not a valid encoder"),
    ("q: prefix tokens=0", "E204", 1, 18, 19, "tokens must be >= 1, got 0"),
    ("q: ptuning2 projection=4", "E202", 1, 13, 23, "unknown key 'projection' for ptuning2"),
    # E209 combinations (more in test_combine.py)
    ("q: lora gate\nmixture moe", "E209", 2, 9, 12, "a mixture cannot turn gated LoRA into experts"),
]


@pytest.mark.parametrize("text, code, line, column, end_column, fragment", INVALID)
def test_invalid_specs(text, code, line, column, end_column, fragment):
    diagnostic = only_problem(text)
    assert (diagnostic.code, diagnostic.line, diagnostic.column, diagnostic.end_column) == (
        code, line, column, end_column)
    assert fragment in diagnostic.message
    assert diagnostic.path == "t.adapt"


def test_integer_too_large_for_a_float():
    diagnostic = only_problem("q: lora alpha=" + "9" * 400)
    assert (diagnostic.code, diagnostic.column) == ("E204", 15)
    assert diagnostic.message.startswith("alpha must be a finite number")


def test_every_semantic_code_is_exercised():
    assert {case[1] for case in INVALID} == {f"E20{i}" for i in range(1, 10)}


# ---- notes --------------------------------------------------------------------------------

def test_unknown_method_lists_known_ones():
    from adaptc.methods import METHODS
    assert only_problem("q: bottleneck").notes == (f"known methods: {', '.join(sorted(METHODS))}",)
    assert {"adapter", "lora"} <= set(METHODS)


def test_unknown_kind_lists_known_ones():
    assert only_problem("q: lora\nmixture experts").notes == ("known mixture kinds: loramoe, moe",)


def test_unknown_key_lists_valid_keys():
    assert only_problem("q: lora rank=8").notes == (
        "valid keys for lora: r, alpha, dropout, rslora, init, freeze_a, dora, gate",)
    assert only_problem("*.bias: train lr=2").notes == ("train takes no keys",)  # was "...: "


def test_invalid_choice_lists_choices():
    assert only_problem("q: adapter activation=swish").notes == (
        "activation must be one of: relu, gelu, silu, tanh",)


def test_duplicate_key_points_to_the_first():
    assert only_problem("q: lora\nv: lora r=4 alpha=1 r=8").notes == (
        "first given at line 2, column 9",)


def test_second_mixture_names_the_first_line():
    assert only_problem("q: lora\n\nmixture moe\nmixture moe").notes == (
        "the first mixture statement is on line 3",)


def test_rendered_semantic_error():
    text = "q_proj: lora r=8 dropout=1.0\n"
    with pytest.raises(SpecError) as caught:
        compile_spec(text, "card.adapt")
    assert str(caught.value) == (
        "card.adapt:1:26: error[E204]: dropout must be in [0, 1), got 1.0\n"
        "   1 | q_proj: lora r=8 dropout=1.0\n"
        "     |                          ^^^")



def test_an_empty_file_is_located_like_a_comment_only_one():
    """An empty source rendered as an unreadable file's, without the line and column."""
    with pytest.raises(SpecError) as caught:
        compile_spec("", "empty.adapt")
    assert str(caught.value).startswith("empty.adapt:1:1: error[E208]: the spec has no "
                                        "statements\n   1 | \n     | ^\n")


# ---- everything at once -------------------------------------------------------------------

def test_all_problems_are_collected_and_sorted():
    text = ("mixture moe k=9\n"
            "q_proj: lora r=0 rank=2 r=3\n"
            "ffn: adaptr bogus=1\n"
            "mixture soup\n")
    found = [(d.code, d.line, d.column) for d in problems(text)]
    assert found == [
        ("E205", 1, 15),  # k=9 > 4 experts
        ("E204", 2, 16),  # r=0
        ("E202", 2, 18),  # rank
        ("E206", 2, 25),  # r again
        ("E201", 3, 6),   # adaptr
        ("E207", 4, 1),   # second mixture
        ("E201", 4, 9),   # soup
    ]


def test_unknown_method_does_not_report_its_options():
    assert [d.code for d in problems("q: lorra bogus=1 r=0")] == ["E201"]


def test_good_statements_do_not_hide_bad_ones():
    found = problems("a: lora r=4\nb: lora r=-1\nc: adapter\nd: adapter bottleneck=0.5")
    assert [(d.code, d.line) for d in found] == [("E204", 2), ("E203", 4)]


def test_many_errors_show_the_first_twenty_and_count_the_rest():
    """A generated spec with hundreds of mistakes prints twenty diagnostics and a count, not a
    screenful per line; `diagnostics` still holds every one."""
    with pytest.raises(SpecError) as err:
        compile_spec("".join("q_proj: lora r=0\n" for _ in range(25)))
    assert len(err.value.diagnostics) == 25
    message = str(err.value)
    assert message.count("error[E204]") == 20 and "<spec>:20:16:" in message
    assert "<spec>:21:" not in message
    assert message.endswith("... and 5 more errors not shown")


def test_language_doc_shows_the_configs_repr():
    """docs/LANGUAGE.md's "Using it from Python" prints the plan's config; it lacked `gate`."""
    doc = (Path(__file__).parents[2] / "docs" / "LANGUAGE.md").read_text(encoding="utf-8")
    shown = doc.split("plan.rules[0].config")[1].split("# ", 1)[1].split("\n")[0]
    plan = compile_spec("q_proj,v_proj: lora r=8 alpha=16", "inline.adapt")
    assert shown == repr(plan.rules[0].config)
