"""The spec grammar (`adapt.lark`, package data) and its cached LALR parser.

First stage of the pipeline: text → **Lark tree** → AST (`spec.parse`) → Plan (`spec.lower`).
`explain` turns a Lark syntax error into a sentence in user words by matching it against
the known-bad snippets of `grammar.examples`.
"""
from __future__ import annotations

from functools import cache
from importlib.resources import files

from lark import Lark, UnexpectedCharacters, UnexpectedInput

from adaptc.grammar.examples import KNOWN_BAD

__all__ = ["explain", "parser"]


@cache
def parser() -> Lark:
    """Built once per process. Strict LALR: a grammar conflict or terminal collision fails
    at load time (so in CI), never as an ambiguous parse in a user's hands."""
    grammar = files(__package__).joinpath("adapt.lark").read_text(encoding="utf-8")
    return Lark(grammar, parser="lalr", propagate_positions=True, strict=True,
                maybe_placeholders=True)


def explain(error: UnexpectedInput) -> str | None:
    """The message of the known-bad snippet that fails like `error`, or None.

    Lark compares parser states including stack depth, so an error in a second statement
    or a third option would never match a one-line example. We re-key `error.state` (and
    each example's) to: the LALR state, the tokens the parser would accept there (which
    tells a value in a list from a value after `key=`), and for lexer errors the offending
    character (so `r=@` is not taken for an unclosed string).
    """
    error.state = _where(error)
    return error.match_examples(_probe, KNOWN_BAD, token_type_match_fallback=True,
                                use_accepts=False)


def _where(error: UnexpectedInput) -> tuple[int, frozenset[str], str | None]:
    char = error.char if isinstance(error, UnexpectedCharacters) else None
    return error.state.position, frozenset(error.interactive_parser.accepts()), char


def _probe(snippet: str) -> None:
    """The parse function handed to `match_examples`: raises the snippet's (cached) error."""
    raise _failure(snippet).with_traceback(None)


@cache
def _failure(snippet: str) -> UnexpectedInput:
    try:
        parser().parse(snippet)
    except UnexpectedInput as error:
        error.state = _where(error)
        return error
    raise ValueError(f"known-bad example parses without error: {snippet!r}")
