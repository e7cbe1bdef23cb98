"""Runs an ordered list of passes; optionally lints and dumps the graph after each one.

Verification (`graph.lint()` + recompile) after every pass is on when `verify=True` or
ADAPTC_VERIFY=1 (the tests turn it on); ADAPTC_DUMP=DIR (or `dump_dir`) writes the
generated code after each pass as DIR/NN_<pass>.py so a user can see what each pass changed.
A run's first dump removes the NN_*.py files an earlier run left there (another pipeline's
numbering would mix with this one's); other files in DIR stay.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from torch.fx import GraphModule

from adaptc.errors import AdaptcError, PassError
from adaptc.passes.base import CompileContext, Pass


@dataclass
class PassManager:
    passes: list[Pass]
    verify: bool = field(default_factory=lambda: os.environ.get("ADAPTC_VERIFY") == "1")
    dump_dir: str | None = field(default_factory=lambda: os.environ.get("ADAPTC_DUMP"))

    def describe(self) -> str:
        return "\n".join(f"{i:2d}. {p.name}" for i, p in enumerate(self.passes, 1))

    def run(self, gm: GraphModule, ctx: CompileContext) -> tuple[GraphModule, dict[str, int]]:
        """Run every pass in order; user errors pass through, anything else becomes PassError."""
        counts: dict[str, int] = {}
        ran: list[str] = []
        for index, step in enumerate(self.passes, 1):
            try:
                result = step.run(gm, ctx)
                if self.verify:
                    result.module.graph.lint()
                    result.module.recompile()
            except AdaptcError:
                raise
            except Exception as err:
                raise PassError(step.name, ran, err) from err
            gm = result.module
            counts.update(result.counts)
            ran.append(step.name)
            if self.dump_dir:
                self.dump(gm, index, step.name)
        return gm, counts

    def dump(self, gm: GraphModule, index: int, name: str) -> None:
        folder = Path(self.dump_dir)
        try:
            folder.mkdir(parents=True, exist_ok=True)
            if index == 1:
                for stale in folder.glob("[0-9][0-9]_*.py"):
                    stale.unlink()
            (folder / f"{index:02d}_{name}.py").write_text(gm.code)
        except OSError as err:
            raise AdaptcError(f"{folder}: cannot write the graph dump: {err.strerror}") from err
