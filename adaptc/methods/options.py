"""Declaring a method's spec keys once, as dataclass fields, so validation and docs derive from them.

A method config is a frozen dataclass whose fields are its spec keys. `option()` attaches
the documentation and the allowed range or choices; `spec.lower` reads the field types
(int, float, bool, str, `int | list[int]` or `str | list[int]`) and this metadata to check user input.
"""
from __future__ import annotations

from dataclasses import field
from typing import Any, ClassVar, Protocol


def option(default: Any, doc: str, *, low: float | None = None, high: float | None = None,
           high_open: bool = False, choices: tuple[str, ...] | None = None) -> Any:
    """A spec key with its default, a one-line doc, and its allowed range (inclusive unless open)."""
    meta = {"doc": doc, "low": low, "high": high, "high_open": high_open, "choices": choices}
    return field(default=default, metadata=meta)


class MethodConfig(Protocol):
    """What every method config provides besides its option fields."""

    method: ClassVar[str]  # the name used in specs
    adapts: ClassVar[tuple[str, ...]]  # site kinds it attaches to: linear, module, attention, embedding

    def check(self) -> list[tuple[str, str]]:
        """Cross-key problems as (key, message); empty when the config is consistent."""
        ...
