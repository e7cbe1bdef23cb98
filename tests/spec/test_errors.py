"""Syntax errors: E101 (character), E102 (token), E103 (end of input), located and in user words."""
from pathlib import Path

import pytest
from lark import Lark, LarkError

from adaptc.errors import AdaptcError, SpecError
from adaptc.grammar import parser
from adaptc.grammar.examples import KNOWN_BAD, TERMINAL_WORDS
from adaptc.spec import load_spec, parse_spec

# (spec text, code, line, column, fragment of the message)
MALFORMED = [
    # missing colon, missing method, missing value
    ("q_proj lora r=8", "E102", 1, 8, "expected ':' after the targets, found 'lora'"),
    ("q_proj[1:2] lora", "E102", 1, 13, "expected ':' after the targets"),
    ("q_proj", "E103", 1, 7, "expected ':' after the targets, found the end of input"),
    ("q_proj:", "E103", 1, 8, "expected a method name after ':'"),
    ("q_proj: 8", "E102", 1, 9, "expected a method name after ':', found '8'"),
    ("q_proj: lora r=", "E103", 1, 16, "expected a value after '=', found the end of input"),
    ("q_proj: lora r=\nv_proj: lora", "E102", 1, 16,
     "expected a value after '=', found the end of the line"),
    ("q_proj: lora r=  # why\n", "E102", 1, 23, "expected a value after '='"),
    ("q_proj: lora r= ; v: lora", "E102", 1, 17, "expected a value after '=', found ';'"),
    ("q_proj: lora r==8", "E102", 1, 16, "'==' is not an operator"),
    ("q: lora r 8", "E102", 1, 11, "expected '=' or another option, found '8'"),
    ("q: lora r=8 ,", "E102", 1, 13, "expected key=value options, ';' or a newline, found ','"),
    ("q: lora = 3", "E102", 1, 9, "expected key=value options"),
    # lists
    ("q: lora e=[1, 2", "E103", 1, 16, "unclosed list: expected ']'"),
    ("q: lora e=[1, 2\nv: lora", "E102", 1, 16, "unclosed list"),
    ("q: lora e=[", "E103", 1, 12, "unclosed list"),
    ("q: lora e=[[1]", "E103", 1, 15, "unclosed list"),
    ("q: lora e=[1 2]", "E102", 1, 14, "expected ',' between list items, found '2'"),
    ("q: lora e=[1,]", "E102", 1, 14, "trailing ',' in a list"),
    ("q: lora e=[,]", "E102", 1, 12, "expected a value or ']' in the list"),
    ("q: lora e=" + "[" * 33 + "]" * 33, "E101", 1, 43, "lists nested more than 32 deep"),
    ("q: lora e=" + "[" * 600 + "]" * 600, "E101", 1, 43, "nested"),  # was a RecursionError
    # strings
    ('q: lora s="abc', "E101", 1, 11, 'unclosed string: add the closing "'),
    ("a: lora\nb: lora s='abc\nc: lora", "E101", 2, 11, "unclosed string: add the closing '"),
    ("q: lora s='a\\qb'", "E101", 1, 13, "unknown escape '\\q'"),
    ("q: lora s='it''s'", "E102", 1, 15, "found \"'s'\""),
    # targets and layer selections
    ("q_proj,: lora", "E102", 1, 8, "expected a target pattern after ',', found ':'"),
    ("q_proj, ,v_proj: lora", "E102", 1, 9, "expected a target pattern after ','"),
    ("q_proj[]: lora", "E102", 1, 8, "empty layer selection"),
    ("q_proj[a]: lora", "E102", 1, 8, "expected a layer index or slice after '['"),
    ("q_proj[1 2]: lora", "E102", 1, 10, "expected ':', ',' or ']' after the layer index"),
    ("q_proj[1:2 lora", "E102", 1, 12, "expected ']' to close the layer selection"),
    ("q_proj[1:2:3]: lora", "E102", 1, 11, "expected ']' to close the layer selection"),
    ("q_proj[1,]: lora", "E102", 1, 10, "expected a layer index after ','"),
    # statement starts
    ("8: lora", "E102", 1, 1, "expected a target pattern (like q_proj) or 'mixture'"),
    ("a: lora\n8: lora", "E102", 2, 1, "at the start of a statement, found '8'"),
    ("a: lora; 9: lora", "E102", 1, 10, "at the start of a statement, found '9'"),
    ("a: lora\nb: adapter\n  -1: lora", "E102", 3, 3, "found '-1'"),
    ("mixture", "E103", 1, 8, "expected a mixture kind after 'mixture'"),
    ("mixture: lora", "E102", 1, 8, "'mixture' (a keyword at the start of a statement)"),
    # unexpected characters
    ("q: lora r=@", "E101", 1, 11, "unexpected character '@'; expected a name, an integer"),
    ("q@: lora", "E101", 1, 2, "unexpected character '@'; expected ':', ',' or '['"),
    ("a: lora\n  b: lora r=8 $", "E101", 2, 15,
     "expected a name, ';', a newline or the end of input"),
    ("q-proj: lora", "E101", 1, 2, "unexpected character '-'"),
    # literals that run into a name (the lexer would split them into a value and a flag)
    ("q: lora r=8alpha=16", "E101", 1, 11, "'8alpha' is not a number"),
    ("q: lora r=0x10", "E101", 1, 11, "'0x10' is not a number"),
    ("q: lora alpha=1.5e3b", "E101", 1, 15, "'1.5e3b' is not a number"),
    ("q: lora init='x'y", "E101", 1, 14, "\"'x'y\" is not a string"),
    # errors on a later line, CRLF
    ("a: lora\r\nb lora\r\n", "E102", 2, 3, "expected ':' after the targets"),
    ("# header\n\nq_proj: lora\nv_proj: adapter bottleneck=", "E103", 4, 28, "expected a value"),
]


@pytest.mark.parametrize("text, code, line, column, fragment", MALFORMED)
def test_malformed_specs(text, code, line, column, fragment):
    with pytest.raises(SpecError) as caught:
        parse_spec(text, "bad.adapt")
    (diagnostic,) = caught.value.diagnostics
    assert (diagnostic.code, diagnostic.line, diagnostic.column) == (code, line, column)
    assert fragment in diagnostic.message
    assert diagnostic.path == "bad.adapt"


def test_known_bad_table_has_many_cases():
    assert len(MALFORMED) >= 25


# ---- the known-bad snippet table ------------------------------------------------------

LABELLED = [(label, snippet) for label, snippets in KNOWN_BAD.items() for snippet in snippets]


@pytest.mark.parametrize("label, snippet", LABELLED)
@pytest.mark.parametrize("before", ["", "a: lora r=1 rslora\n", "x: lora; mixture moe k=1;"])
def test_each_example_gets_its_own_message(label, snippet, before):
    """The table is consistent: no label shadows another, wherever the statement sits."""
    with pytest.raises(SpecError) as caught:
        parse_spec(before + snippet)
    assert caught.value.first.message.startswith(label)


def test_every_terminal_has_a_user_word():
    terminals = {t.name for t in parser().terminals} - set(parser().ignore_tokens)
    assert terminals | {"$END"} == set(TERMINAL_WORDS)


def documented_mistakes() -> list[tuple[str, str]]:
    """The rows of the 'Common syntax mistakes' table in docs/LANGUAGE.md."""
    doc = (Path(__file__).parents[2] / "docs" / "LANGUAGE.md").read_text(encoding="utf-8")
    table = doc.split("Common syntax mistakes")[1].split("\n## ")[0]
    rows = [line.split(" | ") for line in table.splitlines() if line.startswith("| `")]
    return [(wrote.strip("| `"), message.strip(" |")) for wrote, message in rows]


@pytest.mark.parametrize("text, message", documented_mistakes())
def test_documented_messages_are_the_real_ones(text, message):
    with pytest.raises(SpecError) as caught:
        parse_spec(text)
    assert caught.value.first.message.startswith(message)


def test_documentation_lists_the_mistakes():
    assert len(documented_mistakes()) >= 10


# ---- what the error looks like ---------------------------------------------------------

def test_rendered_diagnostic():
    with pytest.raises(SpecError) as caught:
        parse_spec("q_proj: lora r=8\nv_proj lora\n", "specs/card.adapt")
    assert str(caught.value) == (
        "specs/card.adapt:2:8: error[E102]: expected ':' after the targets, found 'lora'\n"
        "   2 | v_proj lora\n"
        "     |        ^^^^")


def test_errors_are_spec_errors_not_lark_errors():
    for text, *_ in MALFORMED:
        with pytest.raises(SpecError) as caught:
            parse_spec(text)
        assert isinstance(caught.value, AdaptcError)
        assert not isinstance(caught.value, LarkError)
        assert caught.value.__cause__ is None and caught.value.__suppress_context__


def test_transformer_errors_are_unwrapped():
    """An error raised in a Transformer callback surfaces as SpecError, not lark's VisitError."""
    with pytest.raises(SpecError) as caught:
        parse_spec('a: lora\nb: adapter note="x\\z"')
    diagnostic = caught.value.first
    assert (diagnostic.code, diagnostic.line, diagnostic.column, diagnostic.end_column) == (
        "E101", 2, 19, 21)
    assert "known escapes" in diagnostic.notes[0]


def test_grammar_is_strict_lalr():
    lark = parser()
    assert isinstance(lark, Lark)
    assert (lark.options.parser, lark.options.strict, lark.options.propagate_positions) == (
        "lalr", True, True)


# ---- reading files ---------------------------------------------------------------------

def test_load_spec_reads_utf8_with_bom(tmp_path):
    path = tmp_path / "card.adapt"
    path.write_bytes("\ufeffq_proj: lora r=4\r\n".encode())
    spec = load_spec(path)
    assert spec.path == str(path)
    assert spec.statements[0].options[0].value.value == 4


@pytest.mark.parametrize("newline", ["\n", "\r\n", "\r"])
def test_load_spec_reads_every_newline_convention(tmp_path, newline):
    path = tmp_path / "card.adapt"
    path.write_bytes(f"q_proj: lora r=4{newline}v_proj: lora r=2{newline}".encode())
    spec = load_spec(path)
    assert spec.source == "q_proj: lora r=4\nv_proj: lora r=2\n"
    assert [s.span.line for s in spec.statements] == [1, 2]
    path.write_bytes(f"q_proj: lora{newline}# caf".encode() + b"\xe9" + newline.encode())
    with pytest.raises(SpecError) as caught:
        load_spec(path)
    assert (caught.value.first.line, caught.value.first.column) == (2, 6)


def test_load_spec_missing_file(tmp_path):
    path = tmp_path / "nope.adapt"
    with pytest.raises(SpecError) as caught:
        load_spec(path)
    diagnostic = caught.value.first
    assert (diagnostic.code, diagnostic.line, diagnostic.column) == ("E100", 1, 1)
    assert str(path) in diagnostic.message and "No such file" in diagnostic.message


def test_load_spec_not_utf8_points_at_the_byte(tmp_path):
    """Line and column of the first bad byte, counted in characters after a BOM and UTF-8
    text on its line."""
    path = tmp_path / "latin.adapt"
    path.write_bytes("\ufeffq_proj: lora\n# café\nv_proj: lora # é ".encode() + b"\xe9\n")
    with pytest.raises(SpecError) as caught:
        load_spec(path)
    assert (caught.value.first.line, caught.value.first.column) == (3, 18)
    path.write_bytes("\ufeff# café\n".encode() + b"q: lora # caf\xe9\n")
    with pytest.raises(SpecError) as caught:
        load_spec(path)
    assert str(caught.value) == (
        f"{path}:2:14: error[E100]: cannot read spec file '{path}': it is not UTF-8 text "
        "(byte 0xe9)\n"
        "   2 | q: lora # caf\ufffd\n"
        "     |              ^")


def test_rendered_line_is_the_parsers_line():
    """A comment holding a line separator (U+2028, a form feed) is one line to the parser;
    str.splitlines() split it and showed 'b' under line 2."""
    with pytest.raises(SpecError) as caught:
        parse_spec("# a\u2028b\fc\r\nv_proj lora\n", "x.adapt")
    assert str(caught.value).splitlines()[1] == "   2 | v_proj lora"


def test_caret_under_a_column_after_tabs():
    """One space per tab put the caret left of the token wherever a terminal expands tabs."""
    with pytest.raises(SpecError) as caught:
        parse_spec("\tq_proj\tlora\n", "x.adapt")
    assert str(caught.value).splitlines()[1:3] == ["   1 | \tq_proj\tlora",
                                                   "     | \t      \t^^^^"]


def test_caret_under_a_column_after_wide_characters():
    """A CJK character takes two terminal cells: one blank each put the caret left of the
    token after it, and a caret one cell per character under it too short."""
    from adaptc.spec import compile_spec
    with pytest.raises(SpecError) as caught:
        compile_spec('q_proj: lora init="设定" r=0\n')
    lines = str(caught.value).splitlines()
    assert lines[2] == "     | " + " " * 18 + "^" * 6  # under "设定", 6 cells wide
    assert lines[6] == "     | " + " " * 27 + "^"  # 25 characters, 27 cells, then r's value


def test_control_characters_in_the_shown_line_are_replaced(tmp_path):
    """A binary file given as the spec: its NUL and ESC bytes are shown as U+FFFD, so the
    terminal does not act on them and the caret stays under the bad byte."""
    path = tmp_path / "binary.adapt"
    path.write_bytes(b"\x7fELF\x02\x01\x00\x1b[2J\xd0\n")
    with pytest.raises(SpecError) as caught:
        load_spec(path)
    shown = str(caught.value).splitlines()
    assert shown[1] == "   1 | \ufffdELF\ufffd\ufffd\ufffd\ufffd[2J\ufffd"
    assert shown[2] == "     |            ^"
