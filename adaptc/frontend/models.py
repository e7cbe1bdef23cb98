"""Model frontend: build or load the network a spec is compiled against.

Three sources: built-in presets (small seeded random-init models that build in seconds
on CPU, and full-size shapes on the `meta` device that cost no memory), a local Hugging
Face checkpoint directory (config.json + safetensors), or any `nn.Module` from Python.
"""
from __future__ import annotations

import difflib
import inspect
import json
import os
import pickle
import re
import zipfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from adaptc.errors import ModelError, first_line, held_log_records

TINY = {"vocab_size": 512, "max_position_embeddings": 512}
FLAN_T5 = {"vocab_size": 32128, "d_kv": 64, "feed_forward_proj": "gated-gelu",
           "tie_word_embeddings": False, "decoder_start_token_id": 0}
PRESETS: dict[str, tuple[str, dict, str]] = {
    # name: (model_type, config overrides, device)
    "llama": ("llama", {**TINY, "hidden_size": 128, "intermediate_size": 344, "num_hidden_layers": 4,
                        "num_attention_heads": 4, "num_key_value_heads": 2}, "cpu"),
    "mistral": ("mistral", {**TINY, "hidden_size": 128, "intermediate_size": 344,
                            "num_hidden_layers": 2, "num_attention_heads": 4,
                            "num_key_value_heads": 2, "sliding_window": None}, "cpu"),
    "qwen2": ("qwen2", {**TINY, "hidden_size": 128, "intermediate_size": 344, "num_hidden_layers": 2,
                        "num_attention_heads": 4, "num_key_value_heads": 2}, "cpu"),
    "gpt2": ("gpt2", {"vocab_size": 512, "n_positions": 512, "n_embd": 128, "n_layer": 2,
                      "n_head": 4, "bos_token_id": 0, "eos_token_id": 0}, "cpu"),
    "bert": ("bert", {**TINY, "hidden_size": 128, "intermediate_size": 344, "num_hidden_layers": 2,
                      "num_attention_heads": 4}, "cpu"),
    # Flan-T5's layout at the presets' size: gated-GELU FFN, relative positions, and no
    # rescaling of the decoder output before the head (transformers 5: tie_word_embeddings=False)
    "t5": ("t5", {"vocab_size": 512, "d_model": 128, "d_ff": 344, "d_kv": 32, "num_layers": 2,
                  "num_heads": 4, "feed_forward_proj": "gated-gelu", "tie_word_embeddings": False,
                  "decoder_start_token_id": 0, "pad_token_id": 0, "eos_token_id": 1}, "cpu"),
    "flan-t5-base": ("t5", {**FLAN_T5, "d_model": 768, "d_ff": 2048, "num_layers": 12,
                            "num_heads": 12}, "meta"),
    "flan-t5-xl": ("t5", {**FLAN_T5, "d_model": 2048, "d_ff": 5120, "num_layers": 24,
                          "num_heads": 32}, "meta"),
    "llama-7b": ("llama", {"vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008,
                           "num_hidden_layers": 32, "num_attention_heads": 32,
                           "num_key_value_heads": 32}, "meta"),
    "llama-13b": ("llama", {"vocab_size": 32000, "hidden_size": 5120, "intermediate_size": 13824,
                            "num_hidden_layers": 40, "num_attention_heads": 40,
                            "num_key_value_heads": 40}, "meta"),
    "llama-70b": ("llama", {"vocab_size": 32000, "hidden_size": 8192, "intermediate_size": 28672,
                            "num_hidden_layers": 80, "num_attention_heads": 64,
                            "num_key_value_heads": 8}, "meta"),
}
DEFAULT_MODEL = "llama"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SEED = 0


@dataclass
class LoadedModel:
    """A model ready to trace: the module, example inputs, and where it came from."""

    module: nn.Module
    example_inputs: dict[str, torch.Tensor]
    source: str  # preset name, checkpoint directory, or python_source(module)
    family: str | None = None  # config.model_type, used for role aliases
    details: dict = field(default_factory=dict)

    @property
    def on_meta(self) -> bool:
        return any(p.is_meta for p in self.module.parameters())


def load_model(name_or_path: str, layers: int | None = None, *, dtype: str | None = None,
               device: str | None = None) -> LoadedModel:
    """A preset by name or a local Hugging Face checkpoint directory; `layers` truncates depth,
    `dtype` (a DTYPES name) and `device` place the weights (default: as stored, on the CPU)."""
    if name_or_path in PRESETS and (Path(name_or_path) / "config.json").is_file():
        # either reading gives a model that runs: the preset's random weights went into the
        # artifact without a word when the checkpoint directory was meant
        raise ModelError(f"model '{name_or_path}' is both a preset and a checkpoint directory "
                         f"here: write ./{name_or_path} for the directory, or run elsewhere "
                         "for the preset")
    if name_or_path in PRESETS:
        loaded = build_preset(name_or_path, layers)
    elif Path(name_or_path).is_dir():
        loaded = load_checkpoint(Path(name_or_path), dtype)
    else:
        raise unknown_model(name_or_path)
    return place(loaded, dtype, device)


CHECKPOINT_HINT = ("the path of a local Hugging Face checkpoint directory (config.json and "
                   "safetensors weights)")


def unknown_model(name: str) -> ModelError:
    """Neither a preset nor a directory: a path (it has a separator) that is not there, or a
    name, with the nearest presets (`lama` → `llama`; the list alone did not say which)."""
    takes = f"a model is a preset name or {CHECKPOINT_HINT}"
    if os.sep in name or "/" in name or name.startswith((".", "~")):
        found = "it is a file" if Path(name).exists() else "it does not exist"
        return ModelError(f"model '{name}': no such checkpoint directory ({found}); {takes}")
    close = difflib.get_close_matches(name.lower(), list(PRESETS), n=3, cutoff=0.6)
    hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    return ModelError(f"unknown model '{name}': not a preset and not a checkpoint directory"
                      f"{hint or '.'} Presets: {', '.join(PRESETS)}; or {CHECKPOINT_HINT}")


def place(loaded: LoadedModel, dtype: str | None, device: str | None) -> LoadedModel:
    """Move the weights and the example inputs (which trace the graph) to `device`, cast the
    floating-point weights to `dtype`."""
    target = None if device is None else parse_device(device)
    if target is not None and loaded.on_meta:
        raise ModelError(f"model '{loaded.source}' is on the meta device (shapes only): it has "
                         f"no weights to move to {device}")
    if dtype is not None or target is not None:
        loaded.module.to(device=target, dtype=torch_dtype(dtype))
    if target is not None:
        loaded.example_inputs = {k: v.to(target) if isinstance(v, torch.Tensor) else v
                                 for k, v in loaded.example_inputs.items()}
    return loaded


def torch_dtype(name: str | None) -> torch.dtype | None:
    if name is not None and name not in DTYPES:
        raise ModelError(f"unknown dtype '{name}': choose one of {', '.join(DTYPES)}")
    return None if name is None else DTYPES[name]


def parse_device(device: str) -> torch.device:
    try:
        target = torch.device(device)
    except RuntimeError as err:
        raise ModelError(f"unknown device '{device}': {first_line(err)}") from None
    if target.type == "cuda" and not torch.cuda.is_available():
        raise ModelError(f"device '{device}': no CUDA device on this machine")
    if target.type == "cuda" and (target.index or 0) >= torch.cuda.device_count():
        raise ModelError(f"device '{device}': this machine has {torch.cuda.device_count()} "
                         "CUDA device(s)")
    # another backend (mps, xpu, hip): torch.device takes its name whether or not this build
    # of torch has it, and moving the model raised from inside torch
    try:  # torch raises RuntimeError, AssertionError or ModuleNotFoundError, by backend
        torch.empty(0, device=target)
    except Exception:
        raise ModelError(f"device '{device}': this machine's torch cannot place tensors on "
                         f"'{target.type}' (no such device, or no {target.type} support in "
                         "this build)") from None
    return target


def build_preset(name: str, layers: int | None = None) -> LoadedModel:
    """Seeded random init on CPU, or allocation-free on `meta` for full-size shapes."""
    from transformers import AutoConfig

    model_type, overrides, device = PRESETS[name]
    overrides = dict(overrides)
    if layers is not None:
        overrides[{"gpt2": "n_layer", "t5": "num_layers"}.get(model_type, "num_hidden_layers")] = layers
    config = AutoConfig.for_model(model_type, **overrides)
    torch.manual_seed(SEED)
    with torch.device(device):
        module = model_class(config)(config)
    return wrap(module.eval(), source=name)


def model_class(config) -> type:
    """The class the config's `architectures` names (a checkpoint keeps its head: a
    classifier, an MLM head); without one, causal LM for decoders, seq2seq LM for
    encoder-decoders (T5, BART) and the bare encoder for BERT."""
    import transformers
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    for arch in getattr(config, "architectures", None) or []:
        named = getattr(transformers, arch, None)
        if isinstance(named, type) and isinstance(config, getattr(named, "config_class", ())):
            return named
    auto = (AutoModel if config.model_type == "bert" else AutoModelForSeq2SeqLM
            if getattr(config, "is_encoder_decoder", False) else AutoModelForCausalLM)
    if type(config) not in auto._model_mapping:
        raise ModelError(f"model type '{config.model_type}' has no {auto.__name__} class, "
                         "and `architectures` names no transformers class for it")
    return auto._model_mapping[type(config)]


def load_checkpoint(path: Path, dtype: str | None = None) -> LoadedModel:
    """Load config.json + safetensors weights from a local directory (no hub access), in
    `dtype` when given (read as that dtype: no second copy in the stored one), else in the
    dtype its weight files hold."""
    from transformers import AutoConfig

    config_file = path / "config.json"
    if not config_file.is_file():
        inside = [path / sub for sub in ("model", "hf") if (path / sub / "config.json").is_file()]
        hint = (f"; an adaptc artifact keeps its checkpoint in {inside[0]}"
                if inside and any((path / f).is_file() for f in ("manifest.json", "report.json"))
                else "")
        if (path / "adapter_config.json").is_file():  # the adapter where the base model goes
            hint = ("; it holds a PEFT adapter (adapter_config.json), not a model: give its base "
                    "model here, and convert the adapter with `adaptc import-peft DIR --model "
                    "MODEL`")
        raise ModelError(f"{path}: not a Hugging Face checkpoint directory (no config.json)"
                         f"{hint}")
    # transformers and huggingface_hub raise many types for a bad file (ValueError, KeyError,
    # OSError, StrictDataclassFieldValidationError, ...); each means the checkpoint is unusable.
    try:  # trust_remote_code=None asked "run the custom code? [y/N]" on the terminal
        config = AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    except Exception as err:
        if "trust_remote_code" in str(err):
            raise ModelError(f"{config_file}: the model is defined by custom code in the "
                             "checkpoint (auto_map), which adaptc does not run; load it in "
                             "Python (trust_remote_code=True) and pass the module to "
                             "adaptc.compile") from None
        raise ModelError(f"{config_file}: cannot read the model config: "
                         f"{' '.join(str(err).split())}") from None
    try:
        cls = model_class(config)
    except ModelError as err:
        raise ModelError(f"{config_file}: {err}") from None
    if not hasattr(config, "vocab_size"):  # wrap derives the traced inputs from token ids
        raise ModelError(f"{config_file}: a '{config.model_type}' model reads no token ids (its "
                         "config has no vocab_size), which adaptc traces checkpoints with; "
                         "load it in Python and call adaptc.compile(module, spec, "
                         "example_inputs=...)")
    damaged = None  # the weight file that cannot be read, named in from_pretrained's error
    try:  # the weight files' headers, read once: the load's dtype and check_values use them
        stored = list(stored_dtypes(path))
    except ModelError as err:
        stored, damaged = [], str(err)
    load_as = torch_dtype(dtype) or most_stored_float(stored)
    # transformers logs a table of the tensors it could not fill; check_loading_info's error
    # names them in one line instead (the table is logged when the load goes on)
    with held_log_records("transformers.modeling_utils"):
        try:
            module, info = cls.from_pretrained(
                path, local_files_only=True, ignore_mismatched_sizes=True,
                output_loading_info=True, dtype=load_as)
        except Exception as err:
            raise load_error(path, config_file, damaged, err) from None
        check_loading_info(path, info, module)
    check_values(path, module, stored)
    return wrap(module.eval(), source=checkpoint_source(path))


def load_error(path: Path, config_file: Path, damaged: str | None,
               err: Exception) -> ModelError:
    """from_pretrained's failure: a weight file stored_dtypes could not read, or a KeyError,
    which comes from building the model out of the config (rope_scaling type 'foo' was
    "cannot load the checkpoint weights: 'foo'"), or its first line."""
    if damaged is None and isinstance(err, KeyError):
        return ModelError(f"{config_file}: cannot build the model from it: KeyError "
                          f"{first_line(err)} (a value there that transformers does not know?)")
    return ModelError(f"{path}: cannot load the checkpoint weights: "
                      f"{damaged or first_line(err)}")


def checkpoint_source(path: Path) -> str:
    """The directory as the model's source, never a preset's name: `--model ./llama` is
    `llama` once a Path, which the artifact writers took for the preset (no tokenizer
    copied, the checkpoint not guarded against being overwritten by the output)."""
    return os.path.join(".", path) if str(path) in PRESETS else str(path)


def check_values(path: Path, module: nn.Module,
                 files: list[tuple[Path, dict[str, str]]]) -> None:
    """Refuse a checkpoint tensor stored as integers (or bools) where the model has a
    floating-point one (from_pretrained casts it silently: int32 weights would load as
    whole numbers), and NaN or infinite values in a floating-point tensor the checkpoint
    filled (one isfinite pass each). `files` are stored_dtypes' weight files, matched by name."""
    state = module.state_dict()
    prefix = f"{getattr(module, 'base_model_prefix', '')}."
    stored: dict[str, tuple[Path, str]] = {}  # model tensor → (file, stored dtype)
    for file, dtypes in files:
        for key, dtype in dtypes.items():
            name = next((n for n in (key, prefix + key, key.removeprefix(prefix))
                         if n in state), None)
            if name is not None:
                stored[name] = (file, dtype)
    for name, (file, dtype) in stored.items():
        if state[name].is_floating_point() and not dtype.startswith(("F", "BF", "float", "bfloat")):
            raise ModelError(f"{file}: tensor '{name}' is stored as {dtype}; the model needs "
                             f"floating-point values ({state[name].dtype})")
    checked = stored or dict(module.named_parameters())
    for name in checked:
        tensor = state.get(name)
        if tensor is None:  # a tied parameter, under its other name
            continue
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            where = stored[name][0] if name in stored else path
            bad = (~torch.isfinite(tensor)).sum().item()
            raise ModelError(f"{where}: tensor '{name}' has {bad} NaN or infinite value(s)")


WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")  # from_pretrained's order


STORED_FLOATS = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16,
                 "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def most_stored_float(files: list[tuple[Path, dict[str, str]]]) -> torch.dtype | str:
    """The floating dtype most of the checkpoint's tensors are stored in, which the model is
    read in when no dtype is asked for. from_pretrained's "auto" takes the config's `dtype`
    first: a config saying bfloat16 over float32 files halved the weights' precision, one
    saying float32 over bfloat16 files doubled their memory. "auto" when no header says."""
    counts = Counter(STORED_FLOATS[d] for _, dtypes in files for d in dtypes.values()
                     if d in STORED_FLOATS)
    return counts.most_common(1)[0][0] if counts else "auto"


def stored_dtypes(path: Path) -> Iterator[tuple[Path, dict[str, str]]]:
    """Each weight file from_pretrained read, with its tensors' stored dtypes (safetensors'
    names, I32, F16; torch's, int32, float16): the first of model.safetensors, its sharded
    index, pytorch_model.bin, its index. Other files in the directory (an adapter file, a
    stale or half-downloaded copy) were not loaded: opening them raised on a corrupt one.
    A file that cannot be read is a ModelError naming it (from_pretrained's error did not
    say which of a sharded checkpoint's files was damaged or missing)."""
    from safetensors import safe_open

    for single in WEIGHT_FILES:
        index = path / f"{single}.index.json"
        if (path / single).is_file():
            files = [path / single]
        elif index.is_file():  # from_pretrained read it
            try:
                files = [path / name for name in sorted(set(json.loads(
                    index.read_text())["weight_map"].values()))]
            except Exception as err:  # JSON, a missing key, a map of non-strings
                raise ModelError(f"{index}: not a weight index ({first_line(err)})") from None
        else:
            continue
        for file in files:
            # safetensors and torch.load raise many types for a damaged file
            try:
                if file.suffix == ".safetensors":
                    with safe_open(str(file), "pt") as handle:
                        dtypes = {k: handle.get_slice(k).get_dtype() for k in handle.keys()}
                else:  # on meta: the dtypes without reading the tensors
                    tensors = torch.load(file, map_location="meta", weights_only=True)
                    dtypes = {k: str(v.dtype).removeprefix("torch.")
                              for k, v in tensors.items() if isinstance(v, torch.Tensor)}
            except Exception as err:
                raise ModelError(f"{file}: {unreadable_weights(file, err)}") from None
            yield file, dtypes
        return


def unreadable_weights(file: Path, err: Exception) -> str:
    """Why a weight file cannot be read. torch.load's weights-only refusal advises re-running
    with weights_only=False (arbitrary code) for any file, a damaged one included."""
    if not file.is_file():
        return "no such file"
    if file.suffix == ".safetensors":
        return first_line(err)
    if not zipfile.is_zipfile(file):
        return "not a PyTorch checkpoint (torch.save's zip archive)"
    if isinstance(err, pickle.UnpicklingError):
        return ("holds objects besides tensors, which adaptc does not unpickle (it could run "
                "code): save the checkpoint as safetensors")
    return first_line(err)


def check_loading_info(path: Path, info: dict, module: nn.Module) -> None:
    """Refuse a checkpoint whose tensors do not fill the model: transformers would otherwise
    initialise the missing or misshapen ones at random and carry on. Extra tensors (a task
    head the bare model does not have) are fine, except those of layers the config has no
    place for (a config.json whose layer count is below the weights')."""
    beyond = layers_beyond_config(info["unexpected_keys"], module)
    if beyond:
        raise ModelError(f"{path}: the checkpoint holds tensors of {len(beyond)} layer(s) the "
                         f"model's config has no place for, first '{beyond[0]}'; does "
                         f"config.json's layer count ({layer_count(module.config)}) match the "
                         "weights?")
    if info["mismatched_keys"]:
        name, found, expected = sorted(info["mismatched_keys"])[0]
        raise ModelError(f"{path}: tensor '{name}' has shape {tuple(found)}, the model's "
                         f"config gives {tuple(expected)} "
                         f"({len(info['mismatched_keys'])} tensor(s) mismatched)")
    if info["missing_keys"]:
        missing = sorted(info["missing_keys"])
        raise ModelError(f"{path}: the checkpoint lacks {len(missing)} tensor(s) the model "
                         f"needs, first '{missing[0]}'")


def layers_beyond_config(unexpected: list[str], module: nn.Module) -> list[str]:
    """The first checkpoint tensor of each entry of one of the model's module lists (its
    layers, an MoE layer's experts) that the list is too short to hold. Without this, a
    config.json saying 2 layers over 4 layers' weights compiled half the model silently."""
    lists = {path: len(child) for path, child in module.named_modules()
             if isinstance(child, nn.ModuleList)}
    first_of_entry: dict[tuple[str, int], str] = {}
    for name in unexpected:
        for match in re.finditer(r"\.(\d+)\.", name):
            owner, index = name[:match.start()], int(match.group(1))
            if owner in lists and index >= lists[owner]:
                entry = (owner, index)
                first_of_entry[entry] = min(first_of_entry.get(entry, name), name)
                break
    return [first_of_entry[entry] for entry in sorted(first_of_entry)]


def layer_count(config) -> str:
    """The config's layer count as it names it (num_hidden_layers, n_layer, num_layers)."""
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        if isinstance(getattr(config, key, None), int):
            return f"{key}={getattr(config, key)}"
    return "its layer count"


def wrap(module: nn.Module, source: str | None = None,
         example_inputs: dict[str, torch.Tensor] | None = None) -> LoadedModel:
    """Attach example inputs (token ids and mask, batch 2 × 8; segment ids too for encoders
    with more than one token type; decoder token ids, 2 × 6, for encoder-decoders) to a
    Hugging Face-style model. `source` names it in messages and reports; a module passed in
    from Python is named by its class (python_source)."""
    source = python_source(module) if source is None else source
    config = getattr(module, "config", None)
    if example_inputs is None:
        if config is None or not hasattr(config, "vocab_size"):
            raise ModelError(f"{type(module).__name__}: pass example_inputs (the model has no "
                             "Hugging Face config to derive token inputs from)")
        device = next(module.parameters()).device
        ids = torch.randint(0, min(config.vocab_size, 100), (2, 8), device=device)
        example_inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        if takes_segments(module):
            example_inputs["token_type_ids"] = torch.zeros_like(ids)
        if getattr(config, "is_encoder_decoder", False):
            example_inputs["decoder_input_ids"] = ids[:, :6].clone()
    family = getattr(config, "model_type", None)
    return LoadedModel(module, example_inputs, source, family)


def python_source(module: nn.Module) -> str:
    """How messages and reports name a model given as an object: "LlamaForCausalLM (Python
    object)" (it was "python": "python has 2 layers"; and a ./python directory in the working
    directory was taken for its checkpoint by copy_tokenizer and refuse_inputs)."""
    return f"{type(module).__name__} (Python object)"


def takes_segments(module: nn.Module) -> bool:
    """BERT-style encoders read `token_type_ids` (sentence A / B) when the config has more
    than one type; RoBERTa (one type) and decoders trace without it."""
    types = getattr(getattr(module, "config", None), "type_vocab_size", 0) or 0
    return types > 1 and "token_type_ids" in inspect.signature(module.forward).parameters
