"""Spec text → AST: run the Lark parser and turn its tree into `spec.ast` dataclasses.

Pipeline: text → Lark tree (`grammar.parser`) → **AST** (here) → Plan (`spec.lower`).
This is the only module that walks raw parse trees. Syntax errors leave here as a
`SpecError` with one located diagnostic (E101 unexpected character, E102 unexpected token,
E103 unexpected end of input); nothing Lark-specific escapes.
"""
from __future__ import annotations

import re
import sys

from lark import (Token, Transformer, Tree, UnexpectedCharacters, UnexpectedInput, UnexpectedToken,
                  v_args)
from lark.exceptions import VisitError
from lark.tree import Meta

from adaptc.errors import Diagnostic, SpecError
from adaptc.grammar import explain, parser
from adaptc.grammar.examples import TERMINAL_WORDS
from adaptc.spec.ast import Attach, LayerSelect, Mixture, Option, Span, Spec, Target, Value

__all__ = ["parse_spec"]

_WORD_TAIL = re.compile(r"[A-Za-z0-9_]+")
MAX_LIST_DEPTH = 32  # the tree is built recursively: ~500 levels hit Python's recursion limit
ESCAPES = {"n": "\n", "t": "\t", "\\": "\\", '"': '"', "'": "'"}


def parse_spec(text: str, path: str = "<spec>") -> Spec:
    """Parse spec text; `path` is only used to label diagnostics."""
    try:
        tree = parser().parse(text)
    except UnexpectedInput as error:
        raise SpecError([_syntax_diagnostic(error, text, path)]) from None
    _refuse_deep_lists(tree, text, path)
    try:
        statements = _Builder(path, text).transform(tree)
    except VisitError as error:  # keep our own error type, not Lark's wrapper
        raise error.orig_exc from None
    return Spec(path=path, source=text, statements=statements)


def _refuse_deep_lists(tree: Tree, text: str, path: str) -> None:
    """E101 at the first list nested deeper than MAX_LIST_DEPTH (walked with a stack, not
    recursion; `[[[…]]]` 500 deep was a RecursionError traceback from the transformer)."""
    stack = [(tree, 0)]
    while stack:
        node, depth = stack.pop()
        if not isinstance(node, Tree):
            continue
        depth += node.data == "list"
        if depth > MAX_LIST_DEPTH:
            meta = node.meta
            raise SpecError([Diagnostic(
                path, text, meta.line, meta.column, meta.column + 1, "E101",
                f"lists nested more than {MAX_LIST_DEPTH} deep")]) from None
        stack.extend((child, depth) for child in reversed(node.children))


def _span(node: Token | Meta) -> Span:
    return Span(node.line, node.column, node.end_line, node.end_column)


@v_args(inline=True)
class _Builder(Transformer):
    """One callback per grammar rule or alias (`int`, `flag`, ...), each returning its AST node."""

    def __init__(self, path: str, source: str):
        super().__init__()
        self.path, self.source = path, source

    def start(self, *statements) -> tuple:
        return statements

    @v_args(meta=True)
    def attach(self, meta: Meta, children: list) -> Attach:
        targets, method, *options = children
        return Attach(targets, str(method), _span(method), tuple(options), _span(meta))

    @v_args(meta=True)
    def mixture(self, meta: Meta, children: list) -> Mixture:
        _keyword, kind, *options = children
        return Mixture(str(kind), _span(kind), tuple(options), _span(meta))

    def targets(self, *targets: Target) -> tuple[Target, ...]:
        return targets

    @v_args(meta=True)
    def target(self, meta: Meta, children: list) -> Target:
        pattern, *layers = children
        return Target(str(pattern), layers[0] if layers else None, _span(meta))

    @v_args(meta=True)
    def layer_slice(self, meta: Meta, children: list) -> LayerSelect:
        start, stop = (None if bound is None else self._integer(bound) for bound in children)
        return LayerSelect(start, stop, None, _span(meta))

    @v_args(meta=True)
    def layer_list(self, meta: Meta, children: list) -> LayerSelect:
        return LayerSelect(None, None, tuple(self._integer(i) for i in children), _span(meta))

    def keyed(self, key: Token, value: Value) -> Option:
        return Option(str(key), value, _span(key))

    def flag(self, key: Token) -> Option:
        """A bare `key` means `key=true`; the value sits where the key was written."""
        return Option(str(key), Value(True, _span(key), "bool"), _span(key))

    def int(self, token: Token) -> Value:
        self._ends_cleanly(token, "a number", "numbers are decimal; separate options with spaces")
        return Value(self._integer(token), _span(token), "int")

    def float(self, token: Token) -> Value:
        self._ends_cleanly(token, "a number", "numbers are decimal; separate options with spaces")
        return Value(float(token), _span(token), "float")

    def name(self, token: Token) -> Value:
        if token in ("true", "false"):
            return Value(token == "true", _span(token), "bool")
        return Value(str(token), _span(token), "name")

    def string(self, token: Token) -> Value:
        self._ends_cleanly(token, "a string", "separate options with spaces")
        return Value(self._unescape(token), _span(token), "string")

    @v_args(meta=True)
    def list(self, meta: Meta, children: list) -> Value:
        items = [item for item in children if item is not None]  # `[]` gives one placeholder
        return Value(items, _span(meta), "list")

    def _integer(self, token: Token) -> int:
        """int(token), except that Python refuses a literal of more than
        sys.get_int_max_str_digits() digits (4300): that was a ValueError traceback."""
        try:
            return int(token)
        except ValueError:
            digits = len(token.lstrip("+-"))
            raise SpecError([Diagnostic(
                self.path, self.source, token.line, token.column, token.end_column, "E101",
                f"an integer of {digits} digits is too long to read "
                f"(at most {sys.get_int_max_str_digits()})")]) from None

    def _ends_cleanly(self, token: Token, what: str, hint: str) -> None:
        """A literal the lexer ended mid-word (`r=8alpha=16`, `r=0x10`) would otherwise
        split into a value and a bare flag; refuse it where it is written."""
        rest = _WORD_TAIL.match(self.source, token.end_pos)
        if rest is None:
            return
        word = str(token) + rest[0]
        raise SpecError([Diagnostic(
            self.path, self.source, token.line, token.column, token.column + len(word), "E101",
            f"{word!r} is not {what}", (hint,))])

    def _unescape(self, token: Token) -> str:
        """Strip the quotes and resolve `\\n \\t \\\\ \\" \\'`; any other escape is an error."""
        body = token[1:-1]
        for match in re.finditer(r"\\(.)", body):
            if match[1] not in ESCAPES:
                column = token.column + 1 + match.start()
                raise SpecError([Diagnostic(
                    self.path, self.source, token.line, column, column + 2, "E101",
                    f"unknown escape '\\{match[1]}' in a string",
                    ("known escapes: \\n \\t \\\\ \\\" \\'",))])
        return re.sub(r"\\(.)", lambda m: ESCAPES[m[1]], body)


def _syntax_diagnostic(error: UnexpectedCharacters | UnexpectedToken, text: str,
                       path: str) -> Diagnostic:
    """E101/E102/E103 at the offending character or token, in user words."""
    label = explain(error)
    if isinstance(error, UnexpectedCharacters):
        line, column, end = error.line, error.column, error.column + 1
        expected = _words(error.interactive_parser.accepts())
        message = label or f"unexpected character {error.char!r}; expected {expected}"
        return Diagnostic(path, text, line, column, end, "E101", message,
                          _lookalike(error.char))
    # Otherwise the LALR parser raised UnexpectedToken (type `$END` at the end of input).
    token = error.token
    message = label or f"expected {_words(error.accepts)}"
    if token.type == "$END":  # placed just past the last token, which it borrows its position from
        line, column = token.end_line, token.end_column
        return Diagnostic(path, text, line, column, column + 1, "E103", _found(message, token))
    line, column, end = _token_place(token, text)
    return Diagnostic(path, text, line, column, end, "E102", _found(message, token))


# characters a word processor or a copied web page puts where the spec wants ASCII
LOOKALIKES = {"\u201c": '"', "\u201d": '"', "\u201e": '"', "\u2018": "'", "\u2019": "'",
              "\u2212": "-", "\u2013": "-", "\u2014": "-", "\uff1a": ":", "\uff1b": ";",
              "\uff0c": ",", "\uff1d": "=", "\u00a0": "a space", "\u2009": "a space",
              "\u200a": "a space", "\u3000": "a space"}


def _lookalike(char: str) -> tuple[str, ...]:
    """A note for a character that looks like one the grammar takes (a typographic quote, a
    minus sign, a no-break space): the caret alone shows nothing wrong."""
    if char not in LOOKALIKES:
        return ()
    ascii_char = LOOKALIKES[char]
    shown = ascii_char if ascii_char == "a space" else f"'{ascii_char}'"
    return (f"{char!r} is U+{ord(char):04X}, which looks like {shown}; write {shown}",)


def _token_place(token: Token, text: str) -> tuple[int, int, int]:
    """Line, column and end column; a newline is shown just past the line's last character."""
    if token.type != "_NL":
        return token.line, token.column, token.end_column
    end_of_line = len(text.split("\n")[token.line - 1].rstrip("\r")) + 1
    return token.line, end_of_line, end_of_line + 1


def _found(message: str, token: Token) -> str:
    """`expected X` phrases say what came instead; whole-sentence messages stand alone."""
    if not message.startswith("expected"):
        return message
    ends = {"$END": "the end of input", "_NL": "the end of the line"}
    found = ends.get(token.type, repr(str(token)))
    return f"{message}, found {found}"


def _words(terminals: set[str]) -> str:
    words = [word for name, word in TERMINAL_WORDS.items() if name in terminals]
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " or " + words[-1]
