"""The spec front end: `.adapt` text → AST → validated Plan for the compiler.

    text ──parse_spec──▶ Spec (AST, spans) ──lower──▶ Plan (Rules with method configs)

`compile_spec` runs both; `load_spec` reads a file first, `decode_spec` the bytes of one
(standard input). Every problem is a `SpecError` whose diagnostics point into the spec text.
"""
from __future__ import annotations

import codecs
from pathlib import Path

from adaptc.errors import Diagnostic, SpecError
from adaptc.spec.ast import Spec
from adaptc.spec.ir import Plan
from adaptc.spec.lower import lower
from adaptc.spec.parse import parse_spec

__all__ = ["compile_spec", "decode_spec", "load_spec", "lower", "parse_spec"]


def load_spec(path: str | Path) -> Spec:
    """Read and parse a spec file (UTF-8, an optional BOM is dropped)."""
    try:
        data = Path(path).read_bytes()
    except OSError as error:
        raise SpecError([Diagnostic(str(path), None, 1, 1, 2, "E100",
                                    f"cannot read spec file '{path}': {error.strerror}")]) from error
    return decode_spec(data, str(path))


def decode_spec(data: bytes, path: str) -> Spec:
    """Parse the bytes of a spec file, or of standard input, as `load_spec` reads files;
    `path` labels diagnostics."""
    # universal newlines, as read_text gives them: \r\n and a lone \r (old Mac files) end
    # lines (ASCII bytes, never inside a UTF-8 sequence, so a bad byte's line counts them)
    data = data.removeprefix(codecs.BOM_UTF8).replace(b"\r\n", b"\n").replace(b"\r", b"\n")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise SpecError([not_utf8(path, data, error)]) from None
    return parse_spec(text, path)


def not_utf8(path: str, data: bytes, error: UnicodeDecodeError) -> Diagnostic:
    """E100 at the first byte that is not UTF-8, shown in its line (bad bytes as U+FFFD)."""
    line_start = data.rfind(b"\n", 0, error.start) + 1
    line = data.count(b"\n", 0, error.start) + 1
    column = len(data[line_start:error.start].decode("utf-8")) + 1
    source = data.decode("utf-8", errors="replace")
    byte = data[error.start]
    return Diagnostic(path, source, line, column, column + 1, "E100",
                      f"cannot read spec file '{path}': it is not UTF-8 text (byte 0x{byte:02x})")


def compile_spec(text: str, path: str = "<spec>") -> Plan:
    """Parse and validate spec text in one step."""
    return lower(parse_spec(text, path))
