"""Declaring a method's spec keys once, as dataclass fields, so validation and docs derive from them.

A method config is a frozen dataclass whose fields are its spec keys. `option()` attaches
the documentation and the allowed range or choices; `spec.lower` reads the field types
(int, float, bool, str, `int | list[int]` or `str | list[int]`) and this metadata to check user input.
"""
from __future__ import annotations

from dataclasses import field, fields
from typing import Any, ClassVar, Protocol


def option(default: Any, doc: str, *, low: float | None = None, high: float | None = None,
           high_open: bool = False, choices: tuple[str, ...] | None = None,
           training: bool = False) -> Any:
    """A spec key with its default, a one-line doc, and its allowed range (inclusive unless open).
    `training`: the key shapes only training (dropout, schedules, loss weights, initial values),
    so adapters trained under one value load into a module compiled with another."""
    meta = {"doc": doc, "low": low, "high": high, "high_open": high_open, "choices": choices,
            "training": training}
    return field(default=default, metadata=meta)


def output_options(config: Any) -> dict[str, Any]:
    """The keys of a method config that change what trained adapters compute (not `training`
    ones): two modules agreeing on them give the same outputs from the same adapter tensors."""
    return {f.name: getattr(config, f.name) for f in fields(config)
            if not f.metadata.get("training")}


class MethodConfig(Protocol):
    """What every method config provides besides its option fields."""

    method: ClassVar[str]  # the name used in specs
    adapts: ClassVar[tuple[str, ...]]  # site kinds it attaches to: linear, module, attention, embedding

    def check(self) -> list[tuple[str, str]]:
        """Cross-key problems as (key, message); empty when the config is consistent."""
        ...
