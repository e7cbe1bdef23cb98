"""The validated form of a spec that the compiler consumes (output of `spec.lower`)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from adaptc.spec.ast import Attach, Mixture, Span, Spec, Target

if TYPE_CHECKING:
    from adaptc.methods.options import MethodConfig


@dataclass(frozen=True)
class Rule:
    """A validated attach statement: where (targets) and what (a method config)."""

    index: int  # position among the spec's statements; later rules override earlier ones
    targets: tuple[Target, ...]
    config: MethodConfig  # the method's options dataclass
    statement: Attach

    def span_of(self, key: str) -> Span:
        """Where `key` was written, or the method name when the key took its default."""
        return option_span(self.statement, key, self.statement.method_span)


@dataclass(frozen=True)
class MixtureRule:
    """A validated `mixture` statement."""

    config: object  # MixtureConfig
    statement: Mixture

    def span_of(self, key: str) -> Span:
        """Where `key` was written, or the mixture kind when the key took its default."""
        return option_span(self.statement, key, self.statement.kind_span)


def option_span(statement: Attach | Mixture, key: str, default: Span) -> Span:
    """The span of the value written for `key` in `statement`, else `default`."""
    return next((opt.value.span for opt in statement.options if opt.key == key), default)


@dataclass(frozen=True)
class Plan:
    """A whole validated spec: attach rules in order and at most one mixture."""

    spec: Spec
    rules: tuple[Rule, ...]
    mixture: MixtureRule | None
