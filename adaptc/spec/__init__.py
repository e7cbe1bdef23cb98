"""The spec front end: `.adapt` text → AST → validated Plan for the compiler.

    text ──parse_spec──▶ Spec (AST, spans) ──lower──▶ Plan (Rules with method configs)

`compile_spec` runs both; `load_spec` reads a file first. Every problem is a `SpecError`
whose diagnostics point into the spec text.
"""
from __future__ import annotations

from pathlib import Path

from adaptc.errors import Diagnostic, SpecError
from adaptc.spec.ast import Spec
from adaptc.spec.ir import Plan
from adaptc.spec.lower import lower
from adaptc.spec.parse import parse_spec

__all__ = ["compile_spec", "load_spec", "lower", "parse_spec"]


def load_spec(path: str | Path) -> Spec:
    """Read and parse a spec file (UTF-8, an optional BOM is dropped)."""
    try:
        text = Path(path).read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as error:
        reason = error.strerror if isinstance(error, OSError) else "it is not UTF-8 text"
        raise SpecError([Diagnostic(str(path), "", 1, 1, 2, "E100",
                                    f"cannot read spec file '{path}': {reason}")]) from error
    return parse_spec(text, str(path))


def compile_spec(text: str, path: str = "<spec>") -> Plan:
    """Parse and validate spec text in one step."""
    return lower(parse_spec(text, path))
