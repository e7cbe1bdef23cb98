"""The spec AST: dataclasses named after grammar rules, each carrying its source span.

`spec.parse` builds these from the Lark tree; nothing else walks raw parse trees.
Semantic checks (`spec.lower`) and model-time checks report against these spans.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Span:
    """1-based line/column of the first character and the column just past the last."""

    line: int
    column: int
    end_line: int
    end_column: int


Scalar = int | float | str | bool


@dataclass(frozen=True)
class Value:
    """A literal option value: int, float, identifier or string (as str), bool, or a list."""

    value: Scalar | list["Value"]
    span: Span
    kind: str  # "int" | "float" | "name" | "string" | "bool" | "list"

    def plain(self):
        """The Python value, lists unwrapped recursively."""
        if self.kind == "list":
            return [item.plain() for item in self.value]
        return self.value


@dataclass(frozen=True)
class Option:
    """`key=value`, or a bare `key` which means `key=true`."""

    key: str
    value: Value
    span: Span  # the key's span


@dataclass(frozen=True)
class LayerSelect:
    """`[start:stop]` (Python slice, negatives count from the last layer) or `[i, j, ...]`."""

    start: int | None
    stop: int | None
    indices: tuple[int, ...] | None
    span: Span

    def pick(self, n_layers: int) -> set[int]:
        if self.indices is not None:
            return {i % n_layers for i in self.indices if -n_layers <= i < n_layers}
        return set(range(n_layers)[slice(self.start, self.stop)])


@dataclass(frozen=True)
class Target:
    """One comma-separated entry of an attach statement: a module pattern and layer selection."""

    pattern: str
    layers: LayerSelect | None
    span: Span


@dataclass(frozen=True)
class Attach:
    """`TARGETS: METHOD key=value ...`"""

    targets: tuple[Target, ...]
    method: str
    method_span: Span
    options: tuple[Option, ...]
    span: Span


@dataclass(frozen=True)
class Mixture:
    """`mixture KIND key=value ...`: turns the spec's LoRA sites into mixtures of experts."""

    kind: str
    kind_span: Span
    options: tuple[Option, ...]
    span: Span


Statement = Attach | Mixture


@dataclass(frozen=True)
class Spec:
    """A parsed spec file: its path and text (for diagnostics) and its statements in order."""

    path: str
    source: str
    statements: tuple[Statement, ...] = field(default_factory=tuple)
