"""The compiler's passes. `default_pipeline` is the compiler in one readable list."""
from __future__ import annotations

from adaptc.passes.base import CompileContext, Pass, PassResult
from adaptc.passes.freeze_base import FreezeBase
from adaptc.passes.insert_bottleneck import InsertBottleneck
from adaptc.passes.insert_lora import InsertLora
from adaptc.passes.insert_mixture import InsertMixture
from adaptc.passes.insert_prefix import InsertPrefix
from adaptc.passes.insert_prompt import InsertPrompt
from adaptc.passes.locate_sites import LocateSites
from adaptc.passes.manager import PassManager
from adaptc.passes.verify import Verify


def default_pipeline(mode: str = "train") -> list[Pass]:
    return [
        LocateSites(),       # bind resolved targets to traced linear nodes
        InsertLora(),        # W₀x + s·B·A·x beside each LoRA site
        InsertMixture(),     # or, with a mixture statement, routed LoRA experts there
        InsertPrefix(),      # key/value prefixes before each adapted attention op, positions + P
        InsertPrompt(),      # virtual tokens at the word-embedding output; real-token outputs
        InsertBottleneck(),  # adapters on module outputs (sequential) or beside them (parallel)
        FreezeBase(),        # only adapter parameters train
        Verify(),            # lint, reachability, recompile
    ]


__all__ = ["CompileContext", "Pass", "PassManager", "PassResult", "default_pipeline"]
