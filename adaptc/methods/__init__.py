"""The method library: one file per adapter method, each defining its spec keys (a config
dataclass), its eager module (math and shapes in the docstring) and, where it has one, its
merge rule. Eager adapter modules share one protocol: `adapter_parameters()` names the
parameters the method added, so freezing, saving and merging never guess from names.
"""
from adaptc.methods.bottleneck import AdapterConfig, BottleneckAdapter
from adaptc.methods.lora import LoraAdapter, LoraConfig
from adaptc.methods.mixture import MixtureConfig, MixtureOfLora
from adaptc.methods.prefix import PrefixAttention, PrefixConfig, PrefixEncoder, Ptuning2Config
from adaptc.methods.prompt import PromptConfig, PromptEmbedding, PromptEncoder, PtuningConfig

METHODS: dict[str, type] = {"lora": LoraConfig, "adapter": AdapterConfig, "prefix": PrefixConfig,
                            "ptuning2": Ptuning2Config, "prompt": PromptConfig,
                            "ptuning": PtuningConfig}
MIXTURES: dict[str, type] = {"moe": MixtureConfig}

__all__ = ["METHODS", "MIXTURES", "AdapterConfig", "BottleneckAdapter", "LoraAdapter",
           "LoraConfig", "MixtureConfig", "MixtureOfLora", "PrefixAttention", "PrefixConfig",
           "PrefixEncoder", "PromptConfig", "PromptEmbedding", "PromptEncoder", "Ptuning2Config",
           "PtuningConfig"]
