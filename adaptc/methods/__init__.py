"""The method library: one file per adapter method, each defining its spec keys (a config
dataclass), its eager module (math and shapes in the docstring) and, where it has one, its
merge rule. Eager adapter modules share one protocol: `adapter_parameters()` names the
parameters the method added, so freezing, saving and merging never guess from names.
"""
from adaptc.methods.adalora import AdaLoraAdapter, AdaLoraAllocator, AdaLoraConfig
from adaptc.methods.bottleneck import AdapterConfig, BottleneckAdapter
from adaptc.methods.dora import DoraAdapter
from adaptc.methods.ia3 import Ia3Adapter, Ia3Config
from adaptc.methods.lora import LoraAdapter, LoraConfig
from adaptc.methods.mixture import LoraMoeConfig, MixtureConfig, MixtureOfLora
from adaptc.methods.prefix import PrefixAttention, PrefixConfig, PrefixEncoder, Ptuning2Config
from adaptc.methods.prompt import PromptConfig, PromptEmbedding, PromptEncoder, PtuningConfig
from adaptc.methods.quantize import Nf4Weight, QuantizeConfig
from adaptc.methods.train import TrainConfig, TrainedParameters
from adaptc.methods.vera import VeraAdapter, VeraConfig

METHODS: dict[str, type] = {"lora": LoraConfig, "adapter": AdapterConfig, "ia3": Ia3Config,
                            "vera": VeraConfig, "adalora": AdaLoraConfig, "train": TrainConfig,
                            "quantize": QuantizeConfig, "prefix": PrefixConfig,
                            "ptuning2": Ptuning2Config, "prompt": PromptConfig,
                            "ptuning": PtuningConfig}
MIXTURES: dict[str, type] = {"moe": MixtureConfig, "loramoe": LoraMoeConfig}

__all__ = ["METHODS", "MIXTURES", "AdaLoraAdapter", "AdaLoraAllocator", "AdaLoraConfig",
           "AdapterConfig", "BottleneckAdapter", "DoraAdapter", "Ia3Adapter", "Ia3Config",
           "LoraAdapter", "LoraConfig", "MixtureConfig", "MixtureOfLora", "Nf4Weight",
           "PrefixAttention", "PrefixConfig", "PrefixEncoder", "PromptConfig", "PromptEmbedding",
           "PromptEncoder", "Ptuning2Config", "PtuningConfig", "QuantizeConfig", "TrainConfig",
           "TrainedParameters", "VeraAdapter", "VeraConfig"]
