"""Pass (infer mode): copy trained adapter weights into the inserted adapters before they are
merged or fused. Without a weights file the adapters keep their initial values (LoRA's B and
a bottleneck's up-projection start at zero, so the result equals the base model).

The file is what `adaptc.save_adapters` wrote from a train-mode module of the same spec;
names and shapes must match exactly (`adaptc.adapters.load_adapters`); with
`ctx.partial` (an encoder-decoder's two decoding graphs share one file) each graph
takes the tensors it has.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

from torch.fx import GraphModule

from adaptc.adapters import adapter_state_dict, load_adapters
from adaptc.passes.base import CompileContext, PassResult


ADAPTERS_FILE = "adaptc.adapters_file"  # gm.meta: the file loaded (path, sha256), or absent


class LoadAdapters:
    name = "load_adapters"

    def run(self, gm: GraphModule, ctx: CompileContext) -> PassResult:
        if ctx.adapters is None:
            return PassResult(gm, {"adapter_tensors_loaded": 0})
        load_adapters(gm, ctx.adapters, ctx.adapter_prefix, partial=ctx.partial,
                      sites=ctx.sites)
        ctx.loaded_adapters = frozenset(adapter_state_dict(gm))
        gm.meta[ADAPTERS_FILE] = file_record(ctx.adapters)  # for report.json (export.py)
        return PassResult(gm, {"adapter_tensors_loaded": len(ctx.loaded_adapters)})


def file_record(path: str | Path) -> dict[str, str]:
    """The weights file as given and the sha256 of the bytes loaded from it, so a report names
    the exact weights an artifact was compiled with (the path alone may hold others later)."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return {"path": str(path), "sha256": digest.hexdigest()}
