"""AST → Plan: check each statement against the method registries and build its config.

Pipeline: text → Lark tree → AST (`spec.parse`) → **Plan** (here) → compiler passes.
Everything the spec alone can tell is checked here: known methods and keys, value types,
ranges and choices, each config's own `check()`, the mixture rules, and which statements
may share a spec (`spec.combine`). Checks that need
the model (rank vs. layer width, patterns that match nothing) happen later in the compiler;
so does the override rule (a later statement wins per module). All problems are collected
and raised as one `SpecError`, sorted by position.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from collections.abc import Callable, Mapping
from functools import cache
from typing import Any

from adaptc.errors import Diagnostic, SpecError
from adaptc.methods import METHODS, MIXTURES
from adaptc.spec import combine
from adaptc.spec.ast import Attach, Mixture, Option, Span, Spec, Value
from adaptc.spec.ir import MixtureRule, Plan, Rule

__all__ = ["lower"]


def lower(spec: Spec) -> Plan:
    """Validate `spec`; raise one SpecError listing every problem found."""
    problems = _Problems(spec)
    if not spec.statements:
        problems.add(Span(1, 1, 1, 2), "E208", "the spec has no statements",
                     ("an attach statement looks like: q_proj,v_proj: lora r=8",))
    rules = [_attach_rule(index, statement, problems)
             for index, statement in enumerate(spec.statements) if isinstance(statement, Attach)]
    mixture = _mixture_rule(spec, problems)
    if mixture is not None:
        _mixture_lora_options([r for r in rules if r is not None], problems)
    combine.check([rule for rule in rules if rule is not None], mixture, problems.add)
    problems.raise_if_any()
    return Plan(spec, tuple(rules), mixture)


def _attach_rule(index: int, statement: Attach, problems: _Problems) -> Rule | None:
    """None when the statement has problems (they are in `problems`, raised by `lower`)."""
    config = _config(METHODS, "method", statement.method, statement.method_span,
                     statement.options, problems)
    if config is None:
        return None
    rule = Rule(index, statement.targets, config, statement)
    problems.check(config, rule.span_of)
    return rule


def _mixture_rule(spec: Spec, problems: _Problems) -> MixtureRule | None:
    """The first `mixture` statement; later ones are E207, as is a spec without `lora` or
    `ia3`."""
    mixtures = [s for s in spec.statements if isinstance(s, Mixture)]
    if not mixtures:
        return None
    first = mixtures[0]
    for extra in mixtures[1:]:
        problems.add(_head(extra), "E207", "a spec can have only one mixture statement",
                     (f"the first mixture statement is on line {first.span.line}",))
    if not any(isinstance(s, Attach) and s.method in ("lora", "ia3") for s in spec.statements):
        problems.add(_head(first), "E207", "a mixture needs at least one 'lora' or 'ia3' "
                     "statement", ("the mixture turns the spec's LoRA sites into LoRA experts "
                                   "(MoLoRA) and its IA3 sites into IA3 vectors (MoV)",))
    rule = None
    for statement in mixtures:
        config = _config(MIXTURES, "mixture kind", statement.kind, statement.kind_span,
                         statement.options, problems)
        if config is not None:
            checked = MixtureRule(config, statement)
            problems.check(config, checked.span_of)
            rule = rule or checked
    return rule


# LoRA options a mixture of experts does not implement: its experts are plain LoRA.
_FLOAT32_MAX = 3.4028234663852886e38  # torch.finfo(torch.float32).max, without torch
_NOT_IN_MIXTURES = {"init": "kaiming", "freeze_a": False, "dora": False}


def _mixture_lora_options(rules: list[Rule], problems: _Problems) -> None:
    """E207 at each LoRA option a mixture statement would otherwise silently ignore."""
    for rule in rules:
        if rule.config.method != "lora":
            continue
        for key, plain in _NOT_IN_MIXTURES.items():
            value = getattr(rule.config, key, plain)
            if value != plain:
                shown = str(value).lower() if isinstance(value, bool) else value
                problems.add(rule.span_of(key), "E207", f"{key}={shown} cannot be used with a "
                             "mixture statement", ("mixture experts are plain LoRA "
                                                   f"({key}={str(plain).lower()})",))


def _head(statement: Mixture) -> Span:
    """`mixture KIND`: where a problem with the whole mixture statement is shown."""
    return Span(statement.span.line, statement.span.column,
                statement.kind_span.end_line, statement.kind_span.end_column)


# ---- one statement: method lookup, then its options --------------------------------------

def _config(registry: Mapping[str, type], what: str, name: str, name_span: Span,
            options: tuple[Option, ...], problems: _Problems) -> Any | None:
    """The config instance, or None when the name or any option is wrong (E201-E206)."""
    cls = registry.get(name)
    if cls is None:
        problems.add(name_span, "E201", f"unknown {what} '{name}'{_did_you_mean(name, registry)}",
                     (f"known {what}s: {', '.join(sorted(registry))}",))
        return None
    values = _values(cls, name, options, problems)
    return None if values is None else cls(**values)


def _values(cls: type, name: str, options: tuple[Option, ...],
            problems: _Problems) -> dict[str, Any] | None:
    fields = _fields(cls)
    values: dict[str, Any] = {}
    first: dict[str, Option] = {}
    for option in options:
        if option.key in first:
            earlier = first[option.key].span
            problems.add(option.span, "E206", f"duplicate key '{option.key}'",
                         (f"first given at line {earlier.line}, column {earlier.column}",))
            continue
        first[option.key] = option
        if option.key not in fields:
            problems.add(option.span, "E202", f"unknown key '{option.key}' for {name}"
                         f"{_did_you_mean(option.key, fields)}",
                         (f"valid keys for {name}: {', '.join(fields)}" if fields
                          else f"{name} takes no keys",))
            continue
        try:
            values[option.key] = _convert(option, *fields[option.key])
        except _Invalid as bad:
            problems.add(bad.span, bad.code, bad.message, bad.notes)
    return values if len(values) == len(options) else None  # None: some option was reported


@cache
def _fields(cls: type) -> dict[str, tuple[Any, Mapping[str, Any]]]:
    """Spec keys of a method config: name → (resolved type, `option()` metadata)."""
    hints = typing.get_type_hints(cls)
    return {f.name: (hints[f.name], f.metadata) for f in dataclasses.fields(cls)}


def _did_you_mean(word: str, choices: typing.Iterable[str]) -> str:
    """Compared case-blind (`LoRA` → 'lora'); names themselves are case-sensitive."""
    by_lower = {choice.lower(): choice for choice in choices}
    close = difflib.get_close_matches(word.lower(), list(by_lower), n=1)
    return f"; did you mean '{by_lower[close[0]]}'?" if close else ""


# ---- one value: type (E203), then range or choice (E204) ---------------------------------

class _Invalid(Exception):
    """A bad value, raised by the converters and caught per option in `_values`."""

    def __init__(self, code: str, message: str, span: Span, notes: tuple[str, ...] = ()):
        super().__init__(message)
        self.code, self.message, self.span, self.notes = code, message, span, notes


def _convert(option: Option, hint: Any, meta: Mapping[str, Any]) -> Any:
    value = _CONVERTERS[hint](option.key, option.value)
    _check_allowed(option.key, option.value, meta)
    return value


def _wrong_type(key: str, wanted: str, node: Value) -> _Invalid:
    return _Invalid("E203", f"{key} expects {wanted}, got {node.kind} {_shown(node)}", node.span)


def _of_kind(key: str, node: Value, kinds: tuple[str, ...], wanted: str) -> Any:
    """The node's value when its kind is one of `kinds`; E203 saying `wanted` otherwise."""
    if node.kind not in kinds:
        raise _wrong_type(key, wanted, node)
    return node.value


def _as_int(key: str, node: Value) -> int:
    return _of_kind(key, node, ("int",), "an integer")


def _as_float(key: str, node: Value) -> float:
    number = _of_kind(key, node, ("int", "float"), "a number")
    try:
        value = float(number)
    except OverflowError:  # an int literal beyond float range
        raise _Invalid("E204", f"{key} must be a finite number, got {node.value}",
                       node.span) from None
    if math.isfinite(value) and abs(value) > _FLOAT32_MAX:  # inf: _check_range says so
        # adapters compute in float32 (or the model's float16/bfloat16): alpha=1e308 made
        # the LoRA scale inf, and the compiled model's outputs NaN from the start (inf · B=0)
        raise _Invalid("E204", f"{key} must be within float32's range (magnitude at most "
                       f"{_FLOAT32_MAX:.4g}: adapters compute in float32), got {_shown(node)}",
                       node.span)
    return value


def _as_bool(key: str, node: Value) -> bool:
    return _of_kind(key, node, ("bool",), "true or false")


def _as_str(key: str, node: Value) -> str:
    return _of_kind(key, node, ("name", "string"), "a name or a string")


def _as_int_or_ints(key: str, node: Value) -> int | list[int]:
    if node.kind == "int":
        return node.value
    return _as_ints(key, node, "an integer or a non-empty list of integers")


def _as_name_or_ints(key: str, node: Value) -> str | list[int]:
    if node.kind in ("name", "string"):
        return node.value
    return _as_ints(key, node, "a name or a non-empty list of integers")


def _as_ints(key: str, node: Value, wanted: str) -> list[int]:
    """A non-empty list of integers; E203 saying `wanted` (the option's whole type) otherwise,
    at the list or at its first item that is not an integer."""
    if node.kind != "list" or not node.value:
        raise _wrong_type(key, wanted, node)
    for item in node.value:
        if item.kind != "int":
            raise _wrong_type(key, wanted, item)
    return node.plain()


_CONVERTERS: dict[Any, Callable[[str, Value], Any]] = {
    int: _as_int, float: _as_float, bool: _as_bool, str: _as_str, int | list[int]: _as_int_or_ints,
    str | list[int]: _as_name_or_ints,
}


def _check_allowed(key: str, node: Value, meta: Mapping[str, Any]) -> None:
    """Range for numbers (each item of a list), choices for names and strings."""
    if node.kind == "list":
        for item in node.value:
            _check_allowed(key, item, meta)
    elif meta["choices"] is not None and node.kind in ("name", "string"):
        _check_choice(key, node, meta["choices"])
    elif node.kind in ("int", "float"):
        _check_range(key, node, meta["low"], meta["high"], meta["high_open"])


def _check_choice(key: str, node: Value, choices: tuple[str, ...]) -> None:
    if node.value not in choices:
        raise _Invalid("E204", f"{node.value!r} is not a valid {key}"
                       f"{_did_you_mean(node.value, choices)}",
                       node.span, (f"{key} must be one of: {', '.join(choices)}",))


def _check_range(key: str, node: Value, low: float | None, high: float | None,
                 high_open: bool) -> None:
    value = node.value
    if isinstance(value, float) and not math.isfinite(value):
        raise _Invalid("E204", f"{key} must be a finite number, got {_shown(node)}", node.span)
    too_low = low is not None and value < low
    too_high = high is not None and (value >= high if high_open else value > high)
    if too_low or too_high:
        raise _Invalid("E204", f"{key} must be {_range_words(low, high, high_open)}, "
                       f"got {_shown(node)}", node.span)


def _range_words(low: float | None, high: float | None, high_open: bool) -> str:
    """`in [0, 1)`, `>= 1`, `<= 4` or `< 4`."""
    if low is not None and high is not None:
        return f"in [{_bound(low)}, {_bound(high)}{')' if high_open else ']'}"
    if low is not None:
        return f">= {_bound(low)}"
    return f"{'<' if high_open else '<='} {_bound(high)}"


def _bound(number: float) -> str:
    """An int bound in full (`:g` shows 2**64 - 1 as 1.84467e+19), a float as `:g`."""
    return str(number) if isinstance(number, int) else f"{number:g}"


def _shown(node: Value) -> str:
    """A value as the user would write it."""
    if node.kind == "bool":
        return "true" if node.value else "false"
    if node.kind == "string":
        return repr(node.value)
    if node.kind == "list":
        return "[" + ", ".join(_shown(item) for item in node.value) + "]"
    return str(node.value)


# ---- collecting diagnostics --------------------------------------------------------------

class _Problems:
    """Every diagnostic found in one spec; raised together at the end of `lower`."""

    def __init__(self, spec: Spec):
        self.spec = spec
        self.found: list[Diagnostic] = []

    def add(self, span: Span, code: str, message: str, notes: tuple[str, ...] = ()) -> None:
        end = span.end_column if span.end_line == span.line else span.column + 1
        self.found.append(Diagnostic(self.spec.path, self.spec.source, span.line, span.column,
                                     end, code, message, tuple(notes)))

    def check(self, config: Any, span_of: Callable[[str], Span]) -> None:
        """E205 for each cross-key problem the config reports, at the key it names."""
        for key, message in config.check():
            self.add(span_of(key), "E205", message)

    def raise_if_any(self) -> None:
        if self.found:
            raise SpecError(sorted(self.found, key=lambda d: (d.line, d.column, d.code)))
