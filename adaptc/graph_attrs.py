"""Binding tensors into a GraphModule at dotted paths (`model.layers.3.mlp.up_proj.weight`),
as `get_attr` nodes expect: owner modules are created on the way, a name is rebound."""
from __future__ import annotations

import torch
from torch import nn
from torch.fx import GraphModule


def bind(gm: GraphModule, target: str, tensor: torch.Tensor,
         protected: frozenset[int] = frozenset()) -> None:
    """Register `tensor` (a parameter, else a buffer) at `target`; refuse owners in `protected`
    (ids of modules that belong to the user's model, which must not change)."""
    owner_path, _, name = target.rpartition(".")
    try:
        owner = gm.get_submodule(owner_path) if owner_path else gm
    except AttributeError:
        gm.add_submodule(owner_path, nn.Module())
        owner = gm.get_submodule(owner_path)
    if id(owner) in protected:
        raise RuntimeError(f"{target}: the graph holds the user's module '{owner_path}'; "
                           "binding a tensor there would change the user's model")
    owner._parameters.pop(name, None)
    owner._buffers.pop(name, None)
    if isinstance(tensor, nn.Parameter):
        owner.register_parameter(name, tensor)
    else:
        owner.register_buffer(name, tensor)
