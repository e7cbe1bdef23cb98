"""The compiler's passes. `default_pipeline` is the compiler in one readable list."""
from __future__ import annotations

from adaptc.passes.accumulate_updates import AccumulateUpdates
from adaptc.passes.adapter_precision import AdapterPrecision
from adaptc.passes.base import CompileContext, Pass, PassResult
from adaptc.passes.bind_ops import BindOps
from adaptc.passes.canonicalize_linears import CanonicalizeLinears
from adaptc.passes.fold_prompts import FoldPrompts
from adaptc.passes.fold_stream_adds import FoldStreamAdds
from adaptc.passes.follow_train_mode import FollowTrainMode
from adaptc.passes.freeze_base import FreezeBase
from adaptc.passes.fuse_projections import FuseProjections
from adaptc.passes.fuse_siblings import FuseSiblings
from adaptc.passes.insert_adalora import InsertAdaLora
from adaptc.passes.insert_dora import InsertDora
from adaptc.passes.insert_expert_lora import InsertExpertLora
from adaptc.passes.insert_ia3 import InsertIa3
from adaptc.passes.insert_bottleneck import InsertBottleneck
from adaptc.passes.insert_lora import InsertLora
from adaptc.passes.insert_mixture import InsertMixture
from adaptc.passes.insert_vera import InsertVera
from adaptc.passes.load_adapters import LoadAdapters
from adaptc.passes.insert_prefix import InsertPrefix
from adaptc.passes.insert_prompt import InsertPrompt
from adaptc.passes.locate_sites import LocateSites
from adaptc.passes.lower_to_triton import LowerToTriton
from adaptc.passes.manager import PassManager
from adaptc.passes.merge_scaling import MergeScaling
from adaptc.passes.merge_weights import MergeWeights
from adaptc.passes.quantize_weights import QuantizeWeights
from adaptc.passes.recompute_nf4 import RecomputeNf4
from adaptc.passes.train_parameters import TrainParameters
from adaptc.passes.verify import Verify


def default_pipeline(mode: str = "train", merge: bool = True,
                     fuse_projections: bool = False) -> list[Pass]:
    """train: the adapted graph, adapters trainable. infer: the same graph with trained
    weights, LoRA merged into the base weights (unless `merge` is False: then it stays beside
    them as plain linear ops) and other adapters fused, nothing trainable; with
    `fuse_projections`, linear layers sharing an input run as one GEMM."""
    build = [
        CanonicalizeLinears(),  # adapted layers traced as x @ Wᵀ (+ b) → aten.linear
        LocateSites(),       # bind resolved targets to traced linear nodes
        InsertLora(),        # W₀x + s·B·A·x beside each LoRA site (PiSSA: W₀ → residual)
        InsertExpertLora(),  # expert stacks W₀[e] + s·B[e]·A[e] where the graph reads them
        InsertDora(),        # LoRA sites with `dora`: magnitude × normalised (W₀ + s·B·A) x
        InsertMixture(),     # or, with a mixture statement, routed LoRA experts there
        InsertAdaLora(),     # W₀x + (α/r₀)·P·(Λ ⊙ Q·x), triplets pruned by AdaLoraAllocator
        InsertVera(),        # W₀x + λ_b ⊙ B·(λ_d ⊙ A·x), A and B shared, frozen, from a seed
        InsertIa3(),         # l ⊙ output (keys, values) or W₀(l ⊙ x) (FFN down projections)
        InsertPrefix(),      # key/value prefixes before each adapted attention op, positions + P
        InsertPrompt(),      # virtual tokens at the word-embedding output; real-token outputs
        InsertBottleneck(),  # adapters on module outputs (sequential) or beside them (parallel)
        QuantizeWeights(),   # `quantize`: frozen weights stored as NF4, dequantised in the graph
        TrainParameters(),   # `train` statements: trainable copies of the selected parameters
        FreezeBase(),        # only adapter parameters train (infer: none)
    ]
    if mode == "train":
        return [*build,
                AdapterPrecision(),  # a 16-bit model's adapters train in float32 (PEFT's way)
                RecomputeNf4(),      # NF4 layers dequantise again in backward: no dense copy saved
                FollowTrainMode(),   # the model's dropout (traced in train mode) on in train() only
                Verify()]            # lint, reachability, recompile
    return [
        *build,
        LoadAdapters(),      # trained adapter weights (--adapters), else the initial ones
        FoldPrompts(),       # prefix MLPs and prompt encoders → the constants they compute
        *([MergeWeights(),   # W' = W₀ + s·B·A as a new parameter; the LoRA nodes go away
           MergeScaling()]   # DoRA's m/‖W'‖ and IA3's l fold into the layer's weights
          if merge else []),
        FuseSiblings(),      # unmerged LoRA → linear ops; siblings share one GEMM for their As
        *([FuseProjections()]  # linears reading one input (q, k, v, LoRA As) → one GEMM
          if fuse_projections else []),
        AccumulateUpdates(),  # y + linear(h, W) → y.addmm_(h, Wᵀ) in place: LoRA B, o/down + stream
        LowerToTriton(),     # bottleneck adapters and mixtures → fused custom ops
        FoldStreamAdds(),    # stream + bottleneck op → the op's skip: added in its epilogue
        BindOps(),           # aten overloads → torch's Python bindings; no-op nodes dropped
        Verify(),
    ]


__all__ = ["CompileContext", "Pass", "PassManager", "PassResult", "default_pipeline"]
