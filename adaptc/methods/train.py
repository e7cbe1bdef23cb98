"""`train`: selected base parameters become trainable — BitFit (Ben Zaken et al. 2022,
arXiv:2106.10199: `*.bias: train`) and LayerNorm/RMSNorm tuning (Zhao et al. 2023,
arXiv:2312.11420, PEFT's `LNTuningConfig`: `*norm*: train`).

    y = f(x; θ_frozen, θ_sel)     θ_sel: the selected parameters, trained from their values

The graph reads a trainable copy of each selected parameter, held by a `TrainedParameters`
module inside the owning module (`model.norm.trained.weight`: `train` is taken by
nn.Module.train). The user's tensors are never modified and the originals leave the compiled
module, so the total count does not grow (PEFT's LN tuning keeps both: its total is larger
by the trainable count).
There is nothing to fold when merging: the trained copies simply stay in the graph.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn


@dataclass(frozen=True)
class TrainConfig:
    method: ClassVar[str] = "train"
    adapts: ClassVar[tuple[str, ...]] = ("parameter",)

    def check(self) -> list[tuple[str, str]]:
        return []


class TrainedParameters(nn.Module):
    """Trainable copies of some of one module's parameters, under their own names
    (`weight`, `bias`); shapes are those of the originals. `undecayed` names the copies that
    take no weight decay (biases, nn.LayerNorm's tensors), as PEFT's and the HF Trainer's
    optimizer groups leave them undecayed."""

    def __init__(self, originals: dict[str, torch.Tensor], undecayed: tuple[str, ...] = ()):
        super().__init__()
        for name, tensor in originals.items():
            self.register_parameter(name, nn.Parameter(tensor.detach().clone()))
        self.undecayed_parameters = undecayed

    def adapter_parameters(self) -> dict[str, nn.Parameter]:
        return dict(self.named_parameters(recurse=False))

    @property
    def fast_parameters(self) -> tuple[str, ...]:
        """LoRA+: the 1-D tensors (norm weights, biases) get ratio × lr, as PEFT's
        `create_loraplus_optimizer` groups them with B; matrices keep the base rate."""
        return tuple(name for name, p in self.named_parameters(recurse=False) if p.ndim == 1)
