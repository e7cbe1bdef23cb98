"""The compiler's passes. `default_pipeline` is the compiler in one readable list."""
from __future__ import annotations

from adaptc.passes.base import CompileContext, Pass, PassResult
from adaptc.passes.freeze_base import FreezeBase
from adaptc.passes.insert_adalora import InsertAdaLora
from adaptc.passes.insert_dora import InsertDora
from adaptc.passes.insert_ia3 import InsertIa3
from adaptc.passes.insert_bottleneck import InsertBottleneck
from adaptc.passes.insert_lora import InsertLora
from adaptc.passes.insert_mixture import InsertMixture
from adaptc.passes.insert_vera import InsertVera
from adaptc.passes.locate_sites import LocateSites
from adaptc.passes.manager import PassManager
from adaptc.passes.quantize_weights import QuantizeWeights
from adaptc.passes.train_parameters import TrainParameters
from adaptc.passes.verify import Verify


def default_pipeline(mode: str = "train") -> list[Pass]:
    return [
        LocateSites(),       # bind resolved targets to traced linear nodes
        InsertLora(),        # W₀x + s·B·A·x beside each LoRA site (PiSSA: W₀ → residual)
        InsertDora(),        # LoRA sites with `dora`: magnitude × normalised (W₀ + s·B·A) x
        InsertMixture(),     # or, with a mixture statement, routed LoRA experts there
        InsertAdaLora(),     # W₀x + (α/r₀)·P·(Λ ⊙ Q·x), triplets pruned by AdaLoraAllocator
        InsertVera(),        # W₀x + λ_b ⊙ B·(λ_d ⊙ A·x), A and B shared, frozen, from a seed
        InsertIa3(),         # l ⊙ output (keys, values) or W₀(l ⊙ x) (FFN down projections)
        InsertBottleneck(),  # adapters on module outputs (sequential) or beside them (parallel)
        QuantizeWeights(),   # `quantize`: frozen weights stored as NF4, dequantised in the graph
        TrainParameters(),   # `train` statements: trainable copies of the selected parameters
        FreezeBase(),        # only adapter parameters train
        Verify(),            # lint, reachability, recompile
    ]


__all__ = ["CompileContext", "Pass", "PassManager", "PassResult", "default_pipeline"]
