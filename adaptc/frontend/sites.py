"""The site table: every submodule a spec can target, read from the model's module tree.

Target resolution runs on this table, before and independently of tracing, so that
patterns, layer selections and shape checks are answered from module paths alone.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

LAYER_INDEX = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")


@dataclass(frozen=True)
class Site:
    """A named submodule and its kind: "linear" (nn.Linear, GPT-2 Conv1D; in/out are its
    features), "embedding" (nn.Embedding; in/out are vocabulary size and width), "attention"
    (a module whose class name ends in `Attention`: where prefix methods rewrite the attention
    op), else "module"; or, in the parameter table, a parameter (`kind` "parameter",
    `out_features` its size, `shape` its shape, `aliases` the other paths of a tied tensor,
    which `named_parameters` lists once: GPT-2's `lm_head.weight` for `transformer.wte.weight`)."""

    path: str
    type_name: str
    kind: str
    in_features: int | None
    out_features: int | None
    layer: int | None
    shape: tuple[int, ...] = ()
    aliases: tuple[str, ...] = ()

    def describe(self) -> str:
        shape = f" {self.in_features}→{self.out_features}" if self.kind == "linear" else ""
        shape = f" {self.in_features}×{self.out_features}" if self.kind == "embedding" else shape
        shape = f" {'×'.join(map(str, self.shape))}" if self.kind == "parameter" else shape
        return f"{self.path} ({self.type_name}{shape})"

    @property
    def expert_stack(self) -> bool:
        """A 3-D parameter [experts, d₁, d₂]: a mixture-of-experts layer's weights (Mixtral's
        `experts.gate_up_proj` in transformers 5), which `lora` adapts per expert."""
        return self.kind == "parameter" and len(self.shape) == 3


def linear_shape(module: nn.Module) -> tuple[int, int] | None:
    """(in, out) of a dense projection, or None; Conv1D stores its weight as [in, out]."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    weight = getattr(module, "weight", None)
    if type(module).__name__ == "Conv1D" and weight is not None and weight.dim() == 2:
        return weight.shape[0], weight.shape[1]
    return None


def site_kind(module: nn.Module) -> tuple[str, tuple[int, int] | None]:
    """The kind of a module and its (in, out) shape where it has one."""
    shape = linear_shape(module)
    if shape:
        return "linear", shape
    if isinstance(module, nn.Embedding):
        return "embedding", (module.num_embeddings, module.embedding_dim)
    if type(module).__name__.endswith("Attention"):
        return "attention", None
    return "module", None


def site_table(model: nn.Module) -> list[Site]:
    """All named submodules in definition order (the root excluded)."""
    sites = []
    for path, module in model.named_modules():
        if not path:
            continue
        kind, shape = site_kind(module)
        index = LAYER_INDEX.search(path)
        sites.append(Site(path, type(module).__name__, kind,
                          shape[0] if shape else None, shape[1] if shape else None,
                          int(index.group(1)) if index else None))
    return sites


def parameter_table(model: nn.Module) -> list[Site]:
    """Every parameter (tied ones once, their other paths as `aliases`) as a site of kind
    "parameter", for `train` statements."""
    paths: dict[int, list[str]] = {}
    for path, param in model.named_parameters(remove_duplicate=False):
        paths.setdefault(id(param), []).append(path)
    sites = []
    for path, param in model.named_parameters():
        index = LAYER_INDEX.search(path)
        aliases = tuple(p for p in paths[id(param)] if p != path)
        sites.append(Site(path, "Parameter", "parameter", None, param.numel(),
                          int(index.group(1)) if index else None, tuple(param.shape), aliases))
    return sites


def layer_count(sites: list[Site]) -> int:
    layers = [s.layer for s in sites if s.layer is not None]
    return max(layers) + 1 if layers else 0


def stack_of(path: str) -> str | None:
    """The block stack a path's layer index counts in (`model.decoder.layers`), or None."""
    index = LAYER_INDEX.search(path)
    return path[:index.start()] if index else None


def stack_depths(sites: list[Site]) -> dict[str | None, int]:
    """Layers per block stack: an encoder-decoder's encoder and decoder may differ in depth
    (DistilBART: 12 and 6), and `[-1]` is the last layer of each."""
    depths: dict[str | None, int] = {}
    for s in sites:
        if s.layer is not None:
            stack = stack_of(s.path)
            depths[stack] = max(depths.get(stack, 0), s.layer + 1)
    return depths
