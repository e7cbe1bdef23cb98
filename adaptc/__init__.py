"""adaptc: a declarative adapter-graph compiler for parameter-efficient fine-tuning.

    gm = adaptc.compile("llama", "q_proj,v_proj: lora r=8 alpha=16", mode="train")
    adaptc.save_adapters(gm, "adapters.safetensors")
    fast = adaptc.compile("llama", "q_proj,v_proj: lora r=8 alpha=16", mode="infer",
                          adapters="adapters.safetensors")
"""
__version__ = "0.1.0"

from adaptc.adapters import (adapter_state_dict, balance_loss, fold_prompts,  # noqa: E402
                             load_adapters, save_adapters)
from adaptc.artifact import load, write_artifact  # noqa: E402
from adaptc.compiler import CompileReport, compile, report_of  # noqa: E402
from adaptc.errors import (AdaptcError, ArtifactError, ModelError, PassError,  # noqa: E402
                           SpecError, WeightsError)
from adaptc.export import load_program, write_infer_artifact  # noqa: E402
from adaptc.frontend.models import load_model  # noqa: E402
from adaptc.generation import greedy_generate  # noqa: E402
from adaptc.inspection import inspect  # noqa: E402
from adaptc.methods.adalora import AdaLoraAllocator, orth_loss  # noqa: E402
from adaptc.optim import loraplus_param_groups  # noqa: E402

__all__ = ["AdaLoraAllocator", "AdaptcError", "ArtifactError", "CompileReport", "ModelError",
           "PassError", "SpecError", "WeightsError", "__version__", "adapter_state_dict",
           "balance_loss", "compile", "fold_prompts", "greedy_generate", "inspect", "load",
           "load_adapters", "load_model", "load_program", "loraplus_param_groups", "orth_loss", "report_of",
           "save_adapters", "write_artifact", "write_infer_artifact"]
