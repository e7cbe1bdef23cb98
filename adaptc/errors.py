"""The exception types adaptc raises to users.

Every user-facing failure is an `AdaptcError` with a stable code; the CLI prints its
message and exits non-zero without a traceback. Spec problems carry rendered diagnostics
(file:line:col, source line, caret); model problems name the module or tensor.
"""
from __future__ import annotations

import logging
import unicodedata
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass


class AdaptcError(Exception):
    """Base class of every error meant for the user; `code` is stable across releases."""

    code = "E000"


@dataclass(frozen=True)
class Diagnostic:
    """One located problem in a spec file: where, what, and optional follow-up notes.
    `source` is None for a file that could not be read (nothing to point at)."""

    path: str
    source: str | None
    line: int
    column: int
    end_column: int
    code: str
    message: str
    notes: tuple[str, ...] = ()

    def render(self) -> str:
        """`path:line:col: error[CODE]: message`, the source line, a caret under the span."""
        if self.source is None:  # the file could not be read: nothing to point at
            return "\n".join([f"{self.path}: error[{self.code}]: {self.message}"]
                             + [f"   = note: {note}" for note in self.notes])
        lines = self.source.split("\n")  # as the parser counts lines: splitlines() also
        # breaks at form feeds and U+2028 in comments, and showed an earlier line
        text = lines[self.line - 1].removesuffix("\r") if 0 < self.line <= len(lines) else ""
        text = "".join(map(printable, text))
        span = text[self.column - 1:self.end_column - 1]
        width = max(1, sum(map(cells, span)) if span else self.end_column - self.column)
        gutter = f"{self.line:>4} | "
        out = [
            f"{self.path}:{self.line}:{self.column}: error[{self.code}]: {self.message}",
            f"{gutter}{text}",
            " " * (len(gutter) - 2) + "| " + indent(text[:self.column - 1]) + "^" * width,
        ]
        out += [f"   = note: {note}" for note in self.notes]
        return "\n".join(out)


def printable(char: str) -> str:
    """A control character (NUL, ESC: a binary file given as the spec) shown as U+FFFD, one
    cell, so the terminal neither acts on it nor moves the caret; tabs are kept."""
    return "\ufffd" if char != "\t" and unicodedata.category(char) == "Cc" else char


def indent(prefix: str) -> str:
    """Blanks as wide as `prefix` on a terminal, so the caret stays under its column: its
    tabs kept, and each other character as many blanks as the cells it takes."""
    return "".join("\t" if char == "\t" else " " * cells(char) for char in prefix)


def cells(char: str) -> int:
    """Terminal cells a character takes: two when wide (CJK, full-width), none for a
    combining mark, one otherwise."""
    if unicodedata.combining(char):
        return 0
    return 2 if unicodedata.east_asian_width(char) in "WF" else 1


class SpecError(AdaptcError):
    """A spec that does not parse or does not validate; holds one or more diagnostics. The
    message renders the first SHOWN of them (a generated spec can hold thousands of errors,
    and the later ones often follow from the first) and counts the rest; `diagnostics` holds
    them all."""

    code = "E100"
    SHOWN = 20

    def __init__(self, diagnostics: list[Diagnostic]):
        self.diagnostics = list(diagnostics)
        rendered = [d.render() for d in self.diagnostics[:self.SHOWN]]
        hidden = len(self.diagnostics) - self.SHOWN
        if hidden > 0:
            rendered.append(f"... and {hidden} more error{'s' * (hidden != 1)} not shown")
        super().__init__("\n".join(rendered))

    @property
    def first(self) -> Diagnostic:
        return self.diagnostics[0]


class ModelError(AdaptcError):
    """A model that cannot be built, loaded or traced; the message names the part at fault."""

    code = "E400"


class WeightsError(AdaptcError):
    """Adapter or checkpoint tensors that are missing, extra, of the wrong shape or dtype, or
    not finite."""

    code = "E500"


class ArtifactError(AdaptcError):
    """An output directory that cannot be written or an artifact that cannot be read."""

    code = "E600"


class InteropError(AdaptcError):
    """A PEFT adapter directory adaptc cannot read or a compiled module it cannot write as one
    without changing the model; the message names the option, module or method at fault."""

    code = "E800"


class PassError(AdaptcError):
    """A compiler pass failed; names the pass and those that ran before it, chains the cause."""

    code = "E700"

    def __init__(self, pass_name: str, ran_before: list[str], cause: BaseException):
        self.pass_name = pass_name
        self.ran_before = list(ran_before)
        before = ", ".join(ran_before) or "none"
        super().__init__(f"pass '{pass_name}' failed (after: {before}): {cause}")


class AdaptcWarning(UserWarning):
    """Something adaptc does as asked but the user should know of (a KV cache longer than a
    rotary model's trained positions); the CLI prints it as one `warning: ...` line."""


def first_line(err: BaseException) -> str:
    """The first line of an exception's message (torch's run to pages), or its type's name."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


@contextmanager
def held_log_records(name: str) -> Iterator[list[logging.LogRecord]]:
    """Hold back what logger `name` logs inside the block, for a caller that reports a
    failure as its own error: torch.export.load logs the traceback of a failed read as a
    warning (then fails with "check the warnings above"), transformers' from_pretrained a
    table of missing and misshapen tensors. When the block succeeds, the held records are
    logged as they would have been; when it raises, they are dropped."""
    logger, records = logging.getLogger(name), []
    handler = logging.Handler()
    handler.emit = records.append
    propagate, logger.propagate = logger.propagate, False
    logger.addHandler(handler)
    try:
        yield records
    finally:
        logger.removeHandler(handler)
        logger.propagate = propagate
    for record in records:
        logger.handle(record)
