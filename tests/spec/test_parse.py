"""spec.parse: every construct of the language, and the spans of the nodes it builds."""
import pytest

from adaptc.grammar import parser
from adaptc.spec import parse_spec
from adaptc.spec.ast import Attach, LayerSelect, Mixture, Span, Value


def only(text: str) -> Attach | Mixture:
    statements = parse_spec(text).statements
    assert len(statements) == 1
    return statements[0]


def values_of(statement: Attach | Mixture) -> dict:
    return {opt.key: opt.value.plain() for opt in statement.options}


def test_parser_is_built_once():
    assert parser() is parser()


def test_readme_card():
    text = "q_proj,v_proj: lora r=8 alpha=16; ffn.*: adapter bottleneck=64; mixture moe k=2"
    spec = parse_spec(text, "card.adapt")
    first, second, third = spec.statements
    assert [t.pattern for t in first.targets] == ["q_proj", "v_proj"]
    assert (first.method, values_of(first)) == ("lora", {"r": 8, "alpha": 16})
    assert (second.method, values_of(second)) == ("adapter", {"bottleneck": 64})
    assert isinstance(third, Mixture) and third.kind == "moe"
    assert spec.path == "card.adapt"


# ---- separators, comments, line endings -----------------------------------------------

@pytest.mark.parametrize("text", [
    "a: lora\nb: adapter",
    "a: lora;b: adapter",
    "a: lora ; b: adapter ;",
    ";;\n\na: lora\n\n;\nb: adapter\n\n",
    "# header\na: lora  # trailing comment\n  # indented comment\nb: adapter # end",
    "a: lora\r\nb: adapter\r\n",
    "\ta: lora\t;\t b: adapter",
])
def test_separators_comments_and_blank_lines(text):
    statements = parse_spec(text).statements
    assert [s.method for s in statements] == ["lora", "adapter"]


@pytest.mark.parametrize("text", ["", "\n\n", ";", " ; ;\n", "# only a comment", "# c\r\n\r\n"])
def test_empty_specs_parse_to_no_statements(text):
    assert parse_spec(text).statements == ()


def test_crlf_keeps_columns():
    second = parse_spec("a: lora\r\nbb: adapter bottleneck=4\r\n").statements[1]
    assert second.method_span == Span(2, 5, 2, 12)
    assert second.options[0].value.span == Span(2, 24, 2, 25)


# ---- values ---------------------------------------------------------------------------

@pytest.mark.parametrize("literal, kind, value", [
    ("8", "int", 8),
    ("-3", "int", -3),
    ("+4", "int", 4),
    ("0.5", "float", 0.5),
    ("-2.5", "float", -2.5),
    ("1e-3", "float", 1e-3),
    ("2E4", "float", 2e4),
    (".5", "float", 0.5),
    ("3.", "float", 3.0),
    ("1.5e2", "float", 150.0),
    ("gelu", "name", "gelu"),
    ("_x1", "name", "_x1"),
    ("true", "bool", True),
    ("false", "bool", False),
    ('"hello world"', "string", "hello world"),
    ("'single'", "string", "single"),
    ('"say \\"hi\\""', "string", 'say "hi"'),
    ("'it\\'s'", "string", "it's"),
    ('"a\\\\b\\tc\\nd"', "string", "a\\b\tc\nd"),
    ('"# not a comment; nor a separator"', "string", "# not a comment; nor a separator"),
    ('""', "string", ""),
])
def test_scalar_values(literal, kind, value):
    (opt,) = only(f"q: lora v={literal}").options
    assert (opt.value.kind, opt.value.value) == (kind, value)
    assert type(opt.value.value) is type(value)


def test_lists_empty_nested_and_mixed():
    values = values_of(only("q: lora e=[] n=[1, [2, 3], []] m=[a, 'b', 1.5, true] s=[ 4 ]"))
    assert values == {"e": [], "n": [1, [2, 3], []], "m": ["a", "b", 1.5, True], "s": [4]}


def test_list_items_are_values_with_spans():
    value = only("q: lora e=[1, [x]]").options[0].value
    assert value.kind == "list" and value.span == Span(1, 11, 1, 19)
    one, inner = value.value
    assert one == Value(1, Span(1, 12, 1, 13), "int")
    assert inner.kind == "list" and inner.span == Span(1, 15, 1, 18)
    assert inner.value == [Value("x", Span(1, 16, 1, 17), "name")]


def test_bare_flag_means_true_at_the_key():
    opt = only("q: lora rslora r=4").options[0]
    assert opt.key == "rslora"
    assert opt.value == Value(True, Span(1, 9, 1, 15), "bool")
    assert opt.span == Span(1, 9, 1, 15)


def test_keys_may_repeat_in_the_ast():
    """Duplicates are a semantic error (E206), reported by lower, not the parser."""
    assert [o.key for o in only("q: lora r=1 r=2").options] == ["r", "r"]


def test_spaces_around_equals_and_commas():
    assert values_of(only("q: lora r = 8 e = [ 1 , 2 ]")) == {"r": 8, "e": [1, 2]}


# ---- targets and layer selections -----------------------------------------------------

@pytest.mark.parametrize("pattern", ["q_proj", "ffn.*", "model.layers.*.mlp", "attn.q", "*_proj",
                                     "*", "_private", "Layer0.fc1", "mixture.gate", "mixture_x"])
def test_target_patterns(pattern):
    (target,) = only(f"{pattern}: lora").targets
    assert target.pattern == pattern and target.layers is None


@pytest.mark.parametrize("selection, start, stop, indices", [
    ("[1:3]", 1, 3, None),
    ("[:3]", None, 3, None),
    ("[2:]", 2, None, None),
    ("[:]", None, None, None),
    ("[-2:]", -2, None, None),
    ("[0:-1]", 0, -1, None),
    ("[ 1 : 3 ]", 1, 3, None),
    ("[3]", None, None, (3,)),
    ("[-1]", None, None, (-1,)),
    ("[0, 2, -1]", None, None, (0, 2, -1)),
])
def test_layer_selections(selection, start, stop, indices):
    (target,) = only(f"q_proj{selection}: lora").targets
    layers = target.layers
    assert (layers.start, layers.stop, layers.indices) == (start, stop, indices)
    assert layers.span == Span(1, 7, 1, 7 + len(selection))
    assert target.span == Span(1, 1, 1, 7 + len(selection))


def test_layer_select_picks_like_python():
    select = only("q[1:-1]: lora").targets[0].layers
    assert select.pick(5) == {1, 2, 3}
    assert LayerSelect(None, None, (0, -1, 9), Span(1, 1, 1, 2)).pick(4) == {0, 3}


def test_multiple_targets_with_selections():
    targets = only("q_proj[0:2], v_proj, ffn.*[5] : lora").targets
    assert [(t.pattern, t.layers is not None) for t in targets] == [
        ("q_proj", True), ("v_proj", False), ("ffn.*", True)]
    assert [t.span for t in targets] == [Span(1, 1, 1, 12), Span(1, 14, 1, 20), Span(1, 22, 1, 30)]


# ---- mixture --------------------------------------------------------------------------

def test_mixture_statement():
    mixture = only("mixture moe k=2 experts=[2, 4] router=soft")
    assert isinstance(mixture, Mixture)
    assert mixture.kind == "moe"
    assert values_of(mixture) == {"k": 2, "experts": [2, 4], "router": "soft"}
    assert mixture.kind_span == Span(1, 9, 1, 12)
    assert mixture.span == Span(1, 1, 1, 43)


def test_mixture_is_a_keyword_only_at_statement_start():
    attach = only("q: lora mixture=1")
    assert attach.options[0].key == "mixture"


# ---- spans of every node kind ----------------------------------------------------------

def test_spans_on_a_later_line():
    text = "# lora on attention\n  q_proj,v_proj[:4]: lora r=16 dropout=0.05 name='x y'"
    attach = parse_spec(text).statements[0]
    assert attach.span == Span(2, 3, 2, 55)
    assert [t.span for t in attach.targets] == [Span(2, 3, 2, 9), Span(2, 10, 2, 20)]
    assert attach.method_span == Span(2, 22, 2, 26)
    r, dropout, name = attach.options
    assert (r.span, r.value.span) == (Span(2, 27, 2, 28), Span(2, 29, 2, 31))
    assert (dropout.span, dropout.value.span) == (Span(2, 32, 2, 39), Span(2, 40, 2, 44))
    assert (name.span, name.value.span) == (Span(2, 45, 2, 49), Span(2, 50, 2, 55))


def test_spec_keeps_path_and_source():
    spec = parse_spec("a: lora\n", "x/y.adapt")
    assert (spec.path, spec.source) == ("x/y.adapt", "a: lora\n")
    assert parse_spec("a: lora").path == "<spec>"
