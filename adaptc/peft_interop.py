"""PEFT interop: compiled adapters ⇄ PEFT adapter directories.

A PEFT adapter directory is `adapter_config.json` + `adapter_model.safetensors` (import also
reads the pickled `adapter_model.bin` PEFT falls back to), with tensor names like
`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`.

Export (`export_peft`) writes a compiled module's `lora` (with rsLoRA, PiSSA, DoRA), `ia3`,
`vera`, `adalora` or `train` (LN_TUNING) adapters as one such directory, or its prompt or
prefix (`peft_prompts`); `PeftModel.from_pretrained` on it gives our outputs.
Target modules are written as full module paths (PEFT matches them exactly), per-module
ranks and alphas as `rank_pattern` / `alpha_pattern` entries. LoRA on MoE expert stacks
goes to `target_parameters`, its tensors in the layout of PEFT's ParamWrapper
(`peft_stack_layout`), both ways.

Import (`spec_from_peft`, `import_peft`) resolves the config against the model with PEFT's
own matching rules (list entries: exact or `.suffix`; a string: a regex over the whole path;
`layers_to_transform`; `rank_pattern`; `exclude_modules`), writes an adapt spec that selects
exactly those modules (short names when they are exact, full paths otherwise; checked by
resolving it), with `train` of its `modules_to_save`, compiles it and loads the weights. Anything PEFT would treat differently is an
`InteropError` naming the option, never a silently different model: a `target_modules`
entry that matches no module (PEFT skips it), an option adaptc does not implement, a
PEFT type other than LORA, IA3, VERA, ADALORA (before its final rank trim), LN_TUNING,
PROMPT_TUNING, P_TUNING and PREFIX_TUNING.
"""
from __future__ import annotations

import json
import pickle
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from adaptc.adapters import adapter_modules, load_adapter_tensors
from adaptc.errors import InteropError, SpecError, WeightsError
from adaptc.frontend.models import LoadedModel
from adaptc.frontend.sites import Site, parameter_table, site_table
from adaptc.frontend.targets import ALIASES, matches, naming, resolve
from adaptc.methods.adalora import AdaLoraAdapter
from adaptc.methods.dora import DoraAdapter
from adaptc.methods.ia3 import Ia3Adapter
from adaptc.methods.lora import ExpertLora, LoraAdapter
from adaptc.methods.train import TrainedParameters
from adaptc.methods.vera import VeraAdapter, VeraProjections
from adaptc.peft_prompts import (CONFIG_KEYS, PROMPT_KINDS, export_prompts, import_prompts,
                                 prompt_spec, virtual_token_modules)

PREFIX = "base_model.model."
CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
PICKLED = "adapter_model.bin"  # save_pretrained(safe_serialization=False), older PEFT versions
PEFT_INIT = {"kaiming": True, "gaussian": "gaussian", "pissa": "pissa"}
# peft.TaskType's values: PeftConfig refuses any other task_type when it reads the directory
TASK_TYPES = ("SEQ_CLS", "SEQ_2_SEQ_LM", "CAUSAL_LM", "TOKEN_CLS", "QUESTION_ANS",
              "FEATURE_EXTRACTION")
# the heads these task models wrap as modules_to_save (any module whose path ends so), whose
# weights they then read from the adapter file
HEADS = {"SEQ_CLS": ("classifier", "score"), "TOKEN_CLS": ("classifier", "score"),
         "QUESTION_ANS": ("qa_outputs",)}


# ---- export -----------------------------------------------------------------------------

@dataclass(frozen=True)
class Entry:
    """One adapted layer of a compiled module: its path, adapter, and weight layout."""

    site: str
    adapter: nn.Module
    conv1d: bool  # GPT-2 Conv1D: PEFT's fan_in_fan_out


def check_task_type(task_type: str | None) -> None:
    """A task type PEFT reads, or None."""
    if task_type is not None and task_type not in TASK_TYPES:
        raise InteropError(f"unknown PEFT task type '{task_type}': PEFT reads only "
                           f"{', '.join(TASK_TYPES)}")


def export_peft(module: nn.Module, out: str | Path, task_type: str | None = None,
                force: bool = False) -> Path:
    """Write the module's adapters as a PEFT adapter directory `out`, atomically; an existing
    non-empty `out` is replaced only with `force`."""
    from adaptc.artifact import atomic_directory, refuse_existing

    out = Path(out)
    refuse_existing(out, force)
    check_task_type(task_type)
    heads = {path for path, _ in module.named_modules()
             if path and path.endswith(HEADS.get(task_type, ()))}
    trained = {path for path, adapter in adapter_modules(module).items()  # travel in the heads
               if isinstance(adapter, TrainedParameters) and inside(path, heads)}
    if virtual_token_modules(module):
        config, tensors = export_prompts(module, task_type, trained)
        head = head_tensors(module, task_type, heads, trained, "base_model.")
    else:
        config, tensors = export_layers(module, task_type, trained)
        head = head_tensors(module, task_type, heads, trained, PREFIX)
    if head:  # as PEFT's task model writes it
        config["modules_to_save"] = list(HEADS[task_type])
    tensors.update(head)
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    with atomic_directory(out) as staging:
        save_file(tensors, str(staging / WEIGHTS), metadata={"format": "pt", "producer": "adaptc"})
        (staging / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return out


def inside(path: str, modules: set[str]) -> bool:
    return any(path.startswith(f"{m}.") for m in modules)


def head_tensors(module: nn.Module, task_type: str | None, heads: set[str], trained: set[str],
                 prefix: str) -> dict:
    """The weights of the heads PEFT's task model wraps as modules_to_save and reads from the
    adapter file (it failed to load without them): their `train` copies where the module has
    them, else the model's frozen ones. Another method on a head is refused."""
    for path in adapter_modules(module):
        if inside(path, heads) and path not in trained:
            raise InteropError(f"'{path}' adapts a head which PEFT's {task_type} model replaces "
                               "by its modules_to_save copy; adaptc exports heads trained by "
                               "`train` or frozen")
    return {f"{prefix}{name.replace('.trained.', '.')}": param
            for name, param in module.named_parameters() if inside(name, heads)}


def export_layers(module: nn.Module, task_type: str | None,
                  trained: set[str]) -> tuple[dict, dict]:
    """PEFT's config and tensors for a module whose adapters are one per-layer method (besides
    the `trained` heads)."""
    entries = exported_entries(module, trained)
    kinds = {peft_kind(e.adapter) for e in entries}
    if len(kinds) != 1:
        raise InteropError("a PEFT adapter directory holds one method; this module has "
                           f"{' and '.join(sorted(kinds))} adapters")
    kind = kinds.pop()
    config, tensors = EXPORTERS[kind](module, entries)
    config.update({"peft_type": kind, "task_type": task_type, "base_model_name_or_path": None,
                   "revision": None, "inference_mode": True, "modules_to_save": None,
                   # PEFT sets it per layer (true for Conv1D, false for Linear) when it loads
                   "fan_in_fan_out": any(e.conv1d for e in entries)})
    return config, tensors


def exported_entries(module: nn.Module, skip: set[str]) -> list[Entry]:
    from adaptc.compiler import report_of

    types = {row["path"]: row.get("type") for row in report_of(module).sites}
    entries = []
    for path, adapter in adapter_modules(module).items():
        if path in skip:
            continue
        if peft_kind(adapter) is None:
            raise InteropError(f"'{path}' is a {type(adapter).__name__}: adaptc exports "
                               "lora (with rslora, pissa, dora), ia3, vera, adalora, prompt "
                               "and prefix adapters to PEFT")
        site = path.rpartition(".")[0]
        if isinstance(adapter, ExpertLora):  # `<experts>.lora_<stack>` adapts `<experts>.<stack>`
            owner, _, name = path.rpartition(".")
            site = f"{owner}.{name.removeprefix('lora_')}"
        entries.append(Entry(site, adapter, types.get(site) == "Conv1D"))
    if not entries:
        raise InteropError("the module has no adapters to export")
    return entries


def peft_kind(adapter: nn.Module) -> str | None:
    if isinstance(adapter, (LoraAdapter, ExpertLora)):  # DoraAdapter too: use_dora
        return "LORA"
    if isinstance(adapter, Ia3Adapter):
        return "IA3"
    if isinstance(adapter, VeraAdapter):
        return "VERA"
    if isinstance(adapter, AdaLoraAdapter):
        return "ADALORA"
    if isinstance(adapter, TrainedParameters):
        return "LN_TUNING"
    return None


def one_value(entries: list[Entry], key: str, read) -> object:
    """The value every entry shares for a PEFT-global option, or an InteropError."""
    values = {read(e) for e in entries}
    if len(values) > 1:
        raise InteropError(f"PEFT has one '{key}' per adapter; these layers differ: "
                           f"{', '.join(sorted(map(str, values)))}")
    return values.pop()


def number(value: float) -> int | float:
    return int(value) if float(value).is_integer() else value


def export_lora(module: nn.Module, entries: list[Entry]) -> tuple[dict, dict]:
    def option(attr):
        return lambda e: getattr(e.adapter.config, attr)

    init = one_value(entries, "init_lora_weights", option("init"))
    (r, alpha), _ = Counter((e.adapter.config.r, e.adapter.config.alpha)
                            for e in entries).most_common(1)[0]
    stacks = [e for e in entries if isinstance(e.adapter, ExpertLora)]
    linears = [e for e in entries if e not in stacks]
    odd = [e for e in stacks if (e.adapter.config.r, e.adapter.config.alpha) != (r, alpha)]
    if odd:
        raise InteropError(f"'{odd[0].site}': PEFT's target_parameters take the adapter's one "
                           f"r and alpha (r={r}, alpha={number(alpha)}); this stack has "
                           f"r={odd[0].adapter.config.r}, alpha={number(odd[0].adapter.config.alpha)}")
    if init == "pissa":
        # the graph module keeps a weight PiSSA replaced only while something else reads it
        kept = dict(module.named_parameters(remove_duplicate=False))
        for e in linears:
            if f"{e.site}.weight" in kept:
                raise InteropError(f"'{e.site}': its weight is tied to another module's, and "
                                   "PEFT's init_lora_weights='pissa' replaces it by the residual "
                                   f"in both; adaptc in '{e.site}' only")
    config = {
        "r": r, "lora_alpha": number(alpha), "init_lora_weights": PEFT_INIT[init], "bias": "none",
        "lora_dropout": number(one_value(entries, "lora_dropout", option("dropout"))),
        "use_rslora": one_value(entries, "use_rslora", option("rslora")),
        "use_dora": one_value(entries, "use_dora", lambda e: isinstance(e.adapter, DoraAdapter)),
        "target_modules": sorted(e.site for e in linears),
        "rank_pattern": {re.escape(e.site): e.adapter.config.r for e in linears
                         if e.adapter.config.r != r},
        "alpha_pattern": {re.escape(e.site): number(e.adapter.config.alpha) for e in linears
                          if e.adapter.config.alpha != alpha}}
    if stacks:
        config["target_parameters"] = sorted(e.site for e in stacks)
    tensors = {}
    for e in stacks:
        names = stack_tensor_names(e.site, stack_order(stacks, e.site))
        layout = peft_stack_layout(e.adapter)
        tensors.update({peft: layout[ours] for peft, ours in names.items()})
    for e in linears:
        tensors[f"{PREFIX}{e.site}.lora_A.weight"] = e.adapter.A
        tensors[f"{PREFIX}{e.site}.lora_B.weight"] = e.adapter.B
        if isinstance(e.adapter, DoraAdapter):
            tensors[f"{PREFIX}{e.site}.lora_magnitude_vector"] = e.adapter.magnitude
    return config, tensors


def stack_order(stacks: list[Entry], path: str) -> list[str]:
    """The adapted stacks of the module owning `path`, in the order the model's module
    registers them (`ExpertLora.position`; the compiled graph's modules may differ): PEFT
    wraps them in that order, each wrapper around the last (the first is innermost)."""
    owner = path.rpartition(".")[0]
    mine = [e for e in stacks if e.site.rpartition(".")[0] == owner]
    return [e.site for e in sorted(mine, key=lambda e: e.adapter.position)]


def stack_tensor_names(path: str, order: list[str]) -> dict[str, str]:
    """PEFT tensor name → `A`/`B` for one stack: `<owner>.<base_layer. × depth>lora_A.weight`,
    depth = the stacks wrapped after it."""
    owner, _, name = path.rpartition(".")
    nested = "base_layer." * (len(order) - 1 - order.index(path))
    return {f"{PREFIX}{owner}.{nested}lora_A.weight": "A",
            f"{PREFIX}{owner}.{nested}lora_B.weight": "B"}


def peft_stack_layout(adapter: ExpertLora) -> dict[str, torch.Tensor]:
    """Our A [E, r, d₂], B [E, d₁, r] as PEFT's ParamWrapper stores them for an [E, d₁, d₂]
    stack: lora_A [E·r, d₂] (expert-major rows), lora_B [d₁, r·E] (expert-minor columns)."""
    if adapter.transposed:
        raise InteropError("an expert stack stored [E, in, out] (`is_transposed`) is laid out "
                           "otherwise by PEFT; adaptc exports [E, out, in] stacks only")
    experts, rows, rank = adapter.B.shape
    return {"A": adapter.A.reshape(experts * rank, -1),
            "B": adapter.B.permute(1, 2, 0).reshape(rows, rank * experts)}


def stack_from_peft(name: str, tensor: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """The inverse of `peft_stack_layout` for tensor `A` or `B` of an [E, d₁, d₂] stack."""
    experts, rows, cols = shape
    if name == "A":
        return tensor.reshape(experts, -1, cols)
    return tensor.reshape(rows, -1, experts).permute(2, 0, 1)


def export_ia3(module: nn.Module, entries: list[Entry]) -> tuple[dict, dict]:
    config = {"target_modules": sorted(e.site for e in entries), "init_ia3_weights": True,
              "feedforward_modules": sorted(e.site for e in entries
                                            if e.adapter.config.feedforward)}
    tensors = {f"{PREFIX}{e.site}.ia3_l": e.adapter.scale.reshape(
        (1, -1) if e.adapter.config.feedforward else (-1, 1)) for e in entries}
    return config, tensors


def export_vera(module: nn.Module, entries: list[Entry]) -> tuple[dict, dict]:
    r = one_value(entries, "r", lambda e: e.adapter.config.r)
    seed = one_value(entries, "projection_prng_key", lambda e: e.adapter.config.seed)
    config = {"r": r, "projection_prng_key": seed, "save_projection": True, "bias": "none",
              "vera_dropout": number(one_value(entries, "vera_dropout",
                                               lambda e: e.adapter.config.dropout)),
              "d_initial": entries[0].adapter.config.d_init, "init_weights": True,
              "target_modules": sorted(e.site for e in entries)}
    (shared,) = entries[0].adapter._projections
    tensors = {"base_model.vera_A": shared.A, "base_model.vera_B": shared.B}
    for e in entries:
        tensors[f"{PREFIX}{e.site}.vera_lambda_d"] = e.adapter.lambda_d
        tensors[f"{PREFIX}{e.site}.vera_lambda_b"] = e.adapter.lambda_b
    return config, tensors


# adaptc's adalora keys → AdaLoraConfig's
ADALORA_KEYS = {"init_r": "init_r", "target_r": "target_r", "alpha": "lora_alpha",
                "dropout": "lora_dropout", "total_step": "total_step", "tinit": "tinit",
                "tfinal": "tfinal", "delta_t": "deltaT", "beta1": "beta1", "beta2": "beta2",
                "orth_reg": "orth_reg_weight"}


def export_adalora(module: nn.Module, entries: list[Entry]) -> tuple[dict, dict]:
    """Full-size P, Λ, Q (pruned triplets have Λ = 0, so no rank_pattern is needed)."""
    config = {peft: number(one_value(entries, peft, lambda e, k=ours: getattr(e.adapter.config, k)))
              for ours, peft in ADALORA_KEYS.items()}
    config.update({"r": config["init_r"], "rank_pattern": None, "bias": "none",
                   "init_lora_weights": True, "target_modules": sorted(e.site for e in entries)})
    tensors = {}
    for e in entries:
        for peft, ours in (("lora_A", "A"), ("lora_B", "B"), ("lora_E", "E")):
            tensors[f"{PREFIX}{e.site}.{peft}"] = getattr(e.adapter, ours)
    return config, tensors


def export_ln_tuning(module: nn.Module, entries: list[Entry]) -> tuple[dict, dict]:
    """`train` statements as PEFT's LN_TUNING: a trained copy of each owning module
    (`<module>.ln_tuning_layers.<name>`). PEFT trains every parameter of those modules; the
    ones adaptc left frozen keep their values there, so the outputs are the same."""
    for e in entries:
        reader = foreign_reader(module, e.site)
        if reader is not None:
            raise InteropError(f"'{e.site}' holds a weight '{reader}' also reads (tied "
                               "weights): adaptc trains it for both, PEFT's LN_TUNING copy "
                               f"replaces it in '{e.site}' only")
    config = {"target_modules": sorted(e.site for e in entries)}
    tensors = {f"{PREFIX}{e.site}.ln_tuning_layers.{name}": tensor
               for e in entries for name, tensor in e.adapter.adapter_parameters().items()}
    return config, tensors


def foreign_reader(module: nn.Module, site: str) -> str | None:
    """A module outside `site` whose ops read `site`'s trained copy (GPT-2's lm_head reads
    wte's tied weight), by the module stack the trace recorded for each op."""
    graph = getattr(module, "graph", None)
    for node in graph.nodes if graph is not None else ():
        if node.op != "get_attr" or not node.target.startswith(f"{site}.trained."):
            continue
        for user in node.users:
            stack = user.meta.get("nn_module_stack") or {}
            reader = list(stack.values())[-1][0] if stack else site
            if reader != site and not reader.startswith(f"{site}."):
                return reader
    return None


EXPORTERS = {"LORA": export_lora, "IA3": export_ia3, "VERA": export_vera,
             "ADALORA": export_adalora, "LN_TUNING": export_ln_tuning}


# ---- import: reading and checking the config ----------------------------------------------

METADATA = {"peft_type", "task_type", "base_model_name_or_path", "revision", "inference_mode",
            "auto_mapping", "peft_version"}
ANY_VALUE = {"qalora_group_size", "megatron_core",  # only read when another option is on
             "eva_config"}  # init_lora_weights='eva' before training
EVERY_KIND = {"modules_to_save"}  # any kind: imported as `train` of those modules
HANDLED = {
    "LORA": {"r", "lora_alpha", "lora_dropout", "use_rslora", "use_dora", "init_lora_weights",
             "target_modules", "target_parameters", "rank_pattern", "alpha_pattern",
             "layers_to_transform", "exclude_modules",
             "layers_pattern", "fan_in_fan_out", "bias"},
    "IA3": {"target_modules", "exclude_modules", "feedforward_modules", "fan_in_fan_out",
            "init_ia3_weights"},
    "VERA": {"r", "projection_prng_key", "d_initial", "vera_dropout", "save_projection",
             "target_modules", "layers_to_transform", "layers_pattern", "fan_in_fan_out",
             "init_weights", "bias"},
    "ADALORA": {"r", "init_r", "target_r", "lora_alpha", "lora_dropout", "total_step", "tinit",
                "tfinal", "deltaT", "beta1", "beta2", "orth_reg_weight", "target_modules",
                "exclude_modules", "layers_to_transform", "layers_pattern", "fan_in_fan_out",
                "init_lora_weights", "bias", "rank_pattern"},
    "LN_TUNING": {"target_modules", "exclude_modules"},
    **CONFIG_KEYS,
}
LORA_INITS = {True: None, False: None, "gaussian": "gaussian", "pissa": "pissa",
              # inits that leave the base weight as it is: the saved A and B are the adapter
              "orthogonal": None, "eva": None}


def read_config(directory: str | Path) -> dict:
    path = Path(directory) / CONFIG
    named = sorted(p.parent.name for p in Path(directory).glob(f"*/{CONFIG}"))
    if named and not path.exists():  # save_pretrained puts an adapter not named default there
        raise InteropError(f"{directory}: holds no adapter_config.json but PEFT adapters in "
                           f"subdirectories {', '.join(named)}: give one of those")
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as err:  # ValueError: bad JSON or bytes that are not UTF-8
        raise InteropError(f"{path}: cannot read the PEFT adapter config: {err}") from None
    if not isinstance(config, dict):  # `config.get` raised AttributeError on a list
        raise InteropError(f"{path}: not a PEFT adapter config (a JSON object); found a "
                           f"{type(config).__name__}")
    kind = config.get("peft_type")
    if kind not in HANDLED:
        raise InteropError(f"{path}: peft_type {kind!r} is not supported (adaptc reads "
                           f"{', '.join(HANDLED)})")
    for key, value in config.items():
        if key in METADATA or key in ANY_VALUE or key in EVERY_KIND or key in HANDLED[kind]:
            continue
        if value not in (None, False, {}, [], ""):
            raise InteropError(f"{path}: option {key}={value!r} is not supported by adaptc")
    if config.get("bias", "none") != "none":
        raise InteropError(f"{path}: option bias={config['bias']!r} is not supported by adaptc "
                           "(write a `*.bias: train` statement alongside instead)")
    check_types(config, path)
    return config


# the values the import reads, by the JSON types PEFT writes for them; another type raised
# TypeError or ValueError from inside the import (`float('x')`, iterating over 5)
NAMES = {"target_modules", "exclude_modules", "feedforward_modules",  # a regex or a list
         "layers_pattern"}
NUMBERS = {"r", "lora_alpha", "lora_dropout", "init_r", "target_r", "total_step", "tinit",
           "tfinal", "deltaT", "beta1", "beta2", "orth_reg_weight", "d_initial",
           "vera_dropout", "projection_prng_key"}


def check_types(config: dict, path: Path) -> None:
    """Refuse option values of a type PEFT does not write, and regexes that do not compile."""
    def refuse(key: str, value, wanted: str):
        raise InteropError(f"{path}: option {key}={value!r} is not {wanted}")
    def regex(key: str, text: str):
        try:
            re.compile(text)
        except re.error as err:
            raise InteropError(f"{path}: option {key}: {text!r} is not a regex ({err})") from None
    for key in NAMES & set(config):
        value = config[key]
        if isinstance(value, str):
            regex(key, value)
        elif value is not None and not (isinstance(value, list)
                                        and all(isinstance(v, str) for v in value)):
            refuse(key, value, "a regex or a list of module names")
    for key in ("rank_pattern", "alpha_pattern"):
        value = config.get(key) or {}
        if not isinstance(value, dict) or not all(is_number(v) for v in value.values()):
            refuse(key, value, "a mapping of module names to numbers")
        for name in value:
            regex(key, name)
    saved = config.get("modules_to_save")
    if not (saved is None or isinstance(saved, list) and all(isinstance(v, str) for v in saved)):
        refuse("modules_to_save", saved, "a list of module names")
    wanted = config.get("layers_to_transform")
    if not (wanted is None or is_integer(wanted)
            or isinstance(wanted, list) and all(is_integer(v) for v in wanted)):
        refuse("layers_to_transform", wanted, "a layer index or a list of them")
    for key in NUMBERS & set(config):
        if not is_number(config[key]) and not (config[key] is None and
                                               config["peft_type"] == "ADALORA"):
            refuse(key, config[key], "a number")


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def is_integer(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def selected_sites(config: dict, sites: list[Site], where: str) -> list[Site]:
    """The linear sites PEFT adapts for this config, in model order (PEFT's matching rules)."""
    targets = config.get("target_modules")
    if targets is None:
        raise InteropError(f"{where}: target_modules is null (PEFT would pick per-model "
                           "defaults); list the modules explicitly")
    if not targets:  # was reported as if layers_to_transform or exclude_modules emptied it
        raise InteropError(f"{where}: target_modules is empty: no module to adapt")
    if isinstance(targets, str):
        found = [s for s in sites if re.fullmatch(targets, s.path)]
        if not found:
            raise InteropError(f"{where}: target_modules regex {targets!r} matches no module")
    else:
        found = []
        for entry in targets:
            hits = [s for s in sites if s.path == entry or s.path.endswith(f".{entry}")]
            if not hits:
                raise InteropError(f"{where}: target_modules entry {entry!r} matches no module "
                                   "of the model (PEFT would skip it silently)")
            found += [s for s in hits if s not in found]
        # as in PEFT: layers_to_transform filters suffix matches of a list, not full paths
        found = [s for s in found if s.path in targets or in_layers(config, s.path)]
    found = [s for s in found if not excluded(config, s.path)]
    refused = [s for s in found if s.kind != "linear" and config["peft_type"] != "LN_TUNING"]
    if refused:
        raise InteropError(f"{where}: target {refused[0].describe()} is not a linear layer; "
                           "adaptc's PEFT import adapts linear layers only")
    if not found:
        raise InteropError(f"{where}: layers_to_transform or exclude_modules leaves no "
                           "module to adapt")
    order = {s.path: i for i, s in enumerate(sites)}
    return sorted(found, key=lambda s: order[s.path])


def excluded(config: dict, path: str) -> bool:
    """PEFT's exclude_modules test, its target_modules one: a regex over the whole path, or
    list entries exact or `.suffix` (a container's entry leaves its submodules adapted)."""
    modules = config.get("exclude_modules") or []
    saved = config.get("modules_to_save") or []  # PEFT adapts nothing inside those
    if any(re.match(rf"(^|.*\.){entry}($|\..*)", path) for entry in saved):
        return True
    if isinstance(modules, str):
        return re.fullmatch(modules, path) is not None
    return path in modules or any(path.endswith(f".{entry}") for entry in modules)


def in_layers(config: dict, path: str) -> bool:
    """PEFT's layers_to_transform / layers_pattern test for one module path."""
    wanted = config.get("layers_to_transform")
    if wanted is None or wanted == []:
        return True
    wanted = [wanted] if isinstance(wanted, int) else wanted
    patterns = config.get("layers_pattern") or None
    if patterns is None:
        found = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", path)
    else:
        patterns = [patterns] if isinstance(patterns, str) else patterns
        found = next((m for p in patterns
                      if (m := re.match(rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.", path))), None)
    return found is not None and int(found.group("idx")) in wanted


def pattern_value(patterns: dict, path: str, default):
    """PEFT's rank_pattern / alpha_pattern lookup: the first key matching `(.*\\.)?(key)$`."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", path):
            return value
    return default


# ---- import: options per module and tensor names -----------------------------------------

def lora_options(config: dict, site: Site, where: str) -> str:
    init = config.get("init_lora_weights", True)
    if not (init is True or init is False or isinstance(init, str) and init in LORA_INITS):
        raise InteropError(f"{where}: init_lora_weights={init!r} is not supported (adaptc "
                           "reads true, false, 'gaussian', 'pissa', 'orthogonal', 'eva')")
    r = pattern_value(config.get("rank_pattern") or {}, site.path, config.get("r", 8))
    alpha = pattern_value(config.get("alpha_pattern") or {}, site.path,
                          config.get("lora_alpha", 8))
    words = [f"lora r={r} alpha={number(alpha)}"]
    if config.get("lora_dropout"):
        words.append(f"dropout={config['lora_dropout']}")
    if config.get("use_rslora"):
        words.append("rslora")
    if config.get("use_dora"):
        words.append("dora")
    if LORA_INITS[init]:
        words.append(f"init={LORA_INITS[init]}")
    return " ".join(words)


def feedforward(config: dict, path: str) -> bool:
    """PEFT's IA3 test: a regex over the whole path, or `path.endswith(entry)` (no dot)."""
    modules = config.get("feedforward_modules") or []
    if isinstance(modules, str):
        return re.fullmatch(modules, path) is not None
    return any(path.endswith(entry) for entry in modules)


def ia3_options(config: dict, site: Site, where: str) -> str:
    return "ia3 feedforward" if feedforward(config, site.path) else "ia3"


def vera_options(config: dict, site: Site, where: str) -> str:
    words = [f"vera r={config.get('r', 256)} seed={config.get('projection_prng_key', 0)}",
             f"d_init={config.get('d_initial', 0.1)}"]
    if config.get("vera_dropout"):
        words.append(f"dropout={config['vera_dropout']}")
    return " ".join(words)


def adalora_options(config: dict, site: Site, where: str) -> str:
    if config.get("rank_pattern"):
        raise InteropError(f"{where}: rank_pattern (ranks trimmed after AdaLoRA's budget "
                           "schedule) is not supported; export before the final trim")
    defaults = {"lora_alpha": 8, "init_r": 12, "target_r": 8}
    words = ["adalora"]
    for ours, peft in ADALORA_KEYS.items():
        value = config.get(peft, defaults.get(peft))
        if value is not None:
            words.append(f"{ours}={number(value) if isinstance(value, float) else value}")
    return " ".join(words)


OPTIONS = {"LORA": lora_options, "IA3": ia3_options, "VERA": vera_options,
           "ADALORA": adalora_options, "LN_TUNING": lambda config, site, where: "train"}


def tensor_names(kind: str, config: dict, path: str, params: tuple[str, ...]) -> dict[str, str]:
    """PEFT tensor name → adaptc adapter state name, for one adapted module (`params`: the
    names of the parameters LN_TUNING copies, its submodules' too)."""
    peft = f"{PREFIX}{path}"
    if kind == "LORA":
        owner = "dora" if config.get("use_dora") else "lora"
        names = {f"{peft}.lora_A.weight": f"{path}.{owner}.A",
                 f"{peft}.lora_B.weight": f"{path}.{owner}.B"}
        if config.get("use_dora"):
            names[f"{peft}.lora_magnitude_vector"] = f"{path}.dora.magnitude"
        return names
    if kind == "IA3":
        return {f"{peft}.ia3_l": f"{path}.ia3.scale"}
    if kind == "ADALORA":
        return {f"{peft}.{name}": f"{path}.adalora.{ours}"
                for name, ours in (("lora_A", "A"), ("lora_B", "B"), ("lora_E", "E"))}
    if kind == "LN_TUNING":  # PEFT keeps its adapter name in a submodule's parameter's name
        return {f"{peft}.ln_tuning_layers.{'default.' if '.' in name else ''}{name}":
                trained_name(path, name) for name in params}
    return {f"{peft}.vera_lambda_d": f"{path}.vera.lambda_d",
            f"{peft}.vera_lambda_b": f"{path}.vera.lambda_b"}


# ---- import: writing the spec -------------------------------------------------------------

def selected_stacks(config: dict, model: nn.Module, params: list[Site],
                    where: str) -> list[Site]:
    """The expert stacks of `target_parameters` (each entry: a parameter path or its
    `.suffix`), [E, out, in] stacks only, in the model's parameter order."""
    stacks = [p for p in params if p.expert_stack]
    if config.get("target_parameters") and config.get("exclude_modules"):
        raise InteropError(f"{where}: exclude_modules with target_parameters is not supported "
                           "by adaptc")
    found = []
    for entry in config.get("target_parameters") or []:
        hits = [p for p in stacks if p.path == entry or p.path.endswith(f".{entry}")]
        if not hits:
            raise InteropError(f"{where}: target_parameters entry {entry!r} matches no 3-D "
                               "expert stack of the model")
        found += [p for p in hits if p not in found]
    for stack in found:
        if getattr(model.get_submodule(stack.path.rpartition(".")[0]), "is_transposed", False):
            raise InteropError(f"{where}: '{stack.path}' is stored [E, in, out] "
                               "(`is_transposed`); adaptc imports [E, out, in] stacks only")
    return [p for p in stacks if p in found]


@dataclass(frozen=True)
class PeftImport:
    """What a PEFT directory turns into: the spec text, how its tensors are named, and the
    shapes of the expert stacks whose tensors PEFT lays out otherwise (`stack_from_peft`)."""

    kind: str
    spec: str
    names: dict[str, str]  # PEFT tensor name → adaptc adapter state name
    stacks: dict[str, tuple[int, ...]]  # adaptc name of a stack's A or B → the stack's shape
    config: dict


def read_peft(directory: str | Path, model: LoadedModel) -> PeftImport:
    from adaptc.spec import compile_spec

    where = str(Path(directory) / CONFIG)
    config = read_config(directory)
    kind = config["peft_type"]
    heads = saved_modules(model.module, config)  # PEFT's trainable copies: adaptc's `train`
    for path in heads:
        check_untied(model.module, path, "modules_to_save", where)
    names = {f"{'base_model.' if kind in PROMPT_KINDS else PREFIX}{path}.{name}":
             trained_name(path, name) for path in heads
             for name in own_parameters(model.module, path)}
    if kind in PROMPT_KINDS:
        spec = prompt_spec(config, model, where)
        return PeftImport(kind, spec + (f"{', '.join(heads)}: train\n" if heads else ""),
                          names, {}, config)
    sites, params = site_table(model.module), parameter_table(model.module)
    stacks = selected_stacks(config, model.module, params, where) if kind == "LORA" else []
    chosen = (selected_sites(config, sites, where)
              if config.get("target_modules") != [] or not stacks else [])
    if kind == "LN_TUNING" or kind == "LORA" and config.get("init_lora_weights") == "pissa":
        for site in chosen:
            check_untied(model.module, site.path, kind, where)
    groups: dict[str, list[str]] = {}
    for site in chosen + stacks:
        groups.setdefault(OPTIONS[kind](config, site, where), []).append(site.path)
    groups.setdefault("train", []).extend(p for p in heads if p not in groups.get("train", []))
    groups = {options: paths for options, paths in groups.items() if paths}
    spec = write_spec(kind, groups, sites, model.family, params)
    try:  # options out of range (r=0, dropout=2) made a spec that printed but did not compile
        compile_spec(spec, "<peft>")
    except SpecError as err:
        raise InteropError(f"{where}: the options give an invalid spec: "
                           f"{err.first.message}") from None
    names.update({k: v for site in chosen for k, v in tensor_names(
        kind, config, site.path, own_parameters(model.module, site.path)).items()})
    shapes = {}
    for stack in stacks:
        owner, _, name = stack.path.rpartition(".")
        order = [p.path for p in stacks if p.path.rpartition(".")[0] == owner]
        for peft, ours in stack_tensor_names(stack.path, order).items():
            names[peft] = f"{owner}.lora_{name}.{ours}"
            shapes[names[peft]] = stack.shape
    return PeftImport(kind, spec, names, shapes, config)


def check_untied(model: nn.Module, path: str, kind: str, where: str) -> None:
    """Refuse an LN_TUNING, modules_to_save or PiSSA target whose parameter the model also
    holds under another name (tied embeddings; T5's `shared` is also each stack's
    `embed_tokens`): PEFT's trained copy replaces it in that one module, adaptc's `train`
    wherever the weight is read; PEFT's PiSSA residual replaces it everywhere, adaptc's in
    the target only."""
    names: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), []).append(name)
    for name, param in model.get_submodule(path).named_parameters(prefix=path):
        other = [n for n in names[id(param)] if not n.startswith(f"{path}.")]
        if other:
            if kind in ("LN_TUNING", "modules_to_save"):
                what = "LN_TUNING target" if kind == "LN_TUNING" else kind
                raise InteropError(f"{where}: {what} '{path}' holds '{name}', tied to "
                                   f"'{other[0]}': PEFT's copy replaces it in '{path}' only, "
                                   "adaptc's `train` wherever it is read")
            raise InteropError(f"{where}: init_lora_weights='pissa' on '{path}', whose '{name}' "
                               f"is tied to '{other[0]}': PEFT replaces the weight by its "
                               f"residual in both, adaptc in '{path}' only")


def saved_modules(model: nn.Module, config: dict) -> list[str]:
    """The modules PEFT keeps a trainable copy of, modules_to_save (its SEQ_CLS, TOKEN_CLS and
    QUESTION_ANS models add their head): any module whose path ends with an entry."""
    names = tuple(config.get("modules_to_save") or ())
    paths = [path for path, _ in model.named_modules() if names and path.endswith(names)]
    return [p for p in paths if p and not any(p.startswith(f"{q}.") for q in paths)]


def trained_name(path: str, name: str) -> str:
    """adaptc's name for the trained copy of parameter `name` of module `path`."""
    owner, _, leaf = name.rpartition(".")
    return ".".join(filter(None, (path, owner, "trained", leaf)))


def own_parameters(model: nn.Module, path: str) -> tuple[str, ...]:
    return tuple(name for name, _ in model.get_submodule(path).named_parameters())


def write_spec(kind: str, groups: dict[str, list[str]], sites: list[Site],
               family: str | None, params: list[Site]) -> str:
    """One statement per distinct option set: short target names where they select exactly
    the group (checked by resolving the spec), full module paths otherwise."""
    header = f"# generated by adaptc from a PEFT adapter directory (peft_type {kind})"
    short = [f"{', '.join(short_targets(paths, sites + params, family))}: {options}"
             for options, paths in groups.items()]
    text = "\n".join([header, *short]) + "\n"
    if selects(text, groups, sites, family, params):
        return text
    full = [f"{', '.join(paths)}: {options}" for options, paths in groups.items()]
    return "\n".join([header, *full]) + "\n"


def short_targets(paths: list[str], sites: list[Site], family: str | None) -> list[str]:
    """Targets for a group of module paths: per path, its shortest dotted suffix that matches
    only paths of the group, with a layer selection where that makes it exact (`v_proj[1]`)."""
    group, aliases = set(paths), set(ALIASES.get(naming(family, sites) or "", {}))
    layer_of = {s.path: s.layer for s in sites}
    chosen: dict[str, set[int] | None] = {}
    for path in paths:
        suffix, layer = shortest_suffix(path, layer_of.get(path), group, sites, aliases)
        if layer is None or chosen.get(suffix, set()) is None:
            chosen[suffix] = None
        else:
            chosen.setdefault(suffix, set()).add(layer)
    return [suffix if layers is None else f"{suffix}[{', '.join(map(str, sorted(layers)))}]"
            for suffix, layers in chosen.items()]


def shortest_suffix(path: str, layer: int | None, group: set[str], sites: list[Site],
                    aliases: set[str]) -> tuple[str, int | None]:
    parts = path.split(".")
    for size in range(1, len(parts) + 1):
        suffix = ".".join(parts[-size:])
        if suffix in aliases or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.]*", suffix):
            continue
        hits = [s for s in sites if matches(suffix, s.path)]
        if all(s.path in group for s in hits):
            return suffix, None
        if layer is not None and all(s.path in group for s in hits if s.layer == layer):
            return suffix, layer
    return path, None


def selects(text: str, groups: dict[str, list[str]], sites: list[Site],
            family: str | None, params: list[Site]) -> bool:
    """True when the spec resolves to exactly one statement per group's modules."""
    from adaptc.spec import compile_spec

    try:
        assignments = resolve(compile_spec(text, "<peft>"), sites, family, params)
    except SpecError:
        return False
    got = {module_of(a.site): a.rule.index for a in assignments}
    want = {path: index for index, paths in enumerate(groups.values()) for path in paths}
    return got == want


def module_of(site: Site) -> str:
    """The module a site stands for: itself, or for a parameter `train` selects, its module
    (an expert stack LoRA adapts stands for itself)."""
    trained = site.kind == "parameter" and not site.expert_stack
    return site.path.rpartition(".")[0] if trained else site.path


# ---- import: entry points -----------------------------------------------------------------

def spec_from_peft(directory: str | Path, model, example_inputs: dict | None = None) -> str:
    """The adapt spec equivalent to a PEFT adapter directory, for `model` (a preset name,
    checkpoint dir, nn.Module or LoadedModel)."""
    from adaptc.compiler import as_model

    return read_peft(directory, as_model(model, example_inputs)).spec


def import_peft(model, directory: str | Path, example_inputs: dict | None = None):
    """Compile the spec generated from a PEFT adapter directory onto `model` and load its
    weights: the result computes what `PeftModel.from_pretrained(model, directory)` does, and
    is in eval mode as that model is (adapter dropout off; `.train()` to go on training)."""
    from adaptc.compiler import as_model, compile

    loaded = as_model(model, example_inputs)
    found = read_peft(directory, loaded)
    source = weights_file(directory)
    tensors = read_weights(source)
    if found.kind in PROMPT_KINDS:
        missing = sorted(set(found.names) - set(tensors))
        if missing:
            raise WeightsError(f"{source}: tensors do not match the adapter config (missing "
                               f"{missing[0]} of its modules_to_save)")
        heads = {found.names[k]: tensors.pop(k) for k in found.names}
        return import_prompts(loaded, source, found.config, found.spec, tensors, heads).eval()
    gm = compile(loaded, found.spec)
    if found.kind == "VERA":
        check_projections(gm, tensors, directory)
    check_base_layers(loaded.module, gm, tensors, directory)
    extra = sorted(set(tensors) - set(found.names))
    missing = sorted(set(found.names) - set(tensors))
    if missing or extra:
        detail = f"missing {missing[0]}" if missing else f"unexpected {extra[0]}"
        raise WeightsError(f"{source}: tensors do not match the adapter config "
                           f"({len(missing)} missing, {len(extra)} unexpected; {detail})")
    ours = {found.names[k]: v for k, v in tensors.items()}
    ours = {k: stack_from_peft(k[-1], v, found.stacks[k]) if k in found.stacks else v
            for k, v in ours.items()}
    if found.kind == "IA3":
        ours = {k: v.reshape(-1) if k.endswith(".ia3.scale") else v for k, v in ours.items()}
    load_adapter_tensors(gm, ours, str(source))
    return gm.eval()


def weights_file(directory: str | Path) -> Path:
    """The directory's weights file as PEFT picks it: the safetensors file, else the pickled
    one PEFT falls back to."""
    pickled = Path(directory) / PICKLED
    if not (Path(directory) / WEIGHTS).exists() and pickled.is_file():
        return pickled
    return Path(directory) / WEIGHTS


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    try:
        if path.name == PICKLED:  # weights_only: a pickle runs no code while it loads
            tensors = torch.load(path, map_location="cpu", weights_only=True)
        else:
            tensors = load_file(str(path))
    except (OSError, SafetensorError, RuntimeError, pickle.UnpicklingError) as err:
        raise WeightsError(f"{path}: cannot read the PEFT adapter weights: {err}") from None
    if not (isinstance(tensors, dict) and all(isinstance(v, torch.Tensor)
                                              for v in tensors.values())):
        raise WeightsError(f"{path}: not a PEFT adapter state dict (names to tensors)")
    # older PEFT versions name DoRA's magnitude `...lora_magnitude_vector.weight`
    return {k.removesuffix(".lora_magnitude_vector.weight") + ".lora_magnitude_vector"
            if k.endswith(".lora_magnitude_vector.weight") else k: v for k, v in tensors.items()}


def check_base_layers(model: nn.Module, gm: nn.Module, tensors: dict[str, torch.Tensor],
                      directory) -> None:
    """PEFT saves the base weights of a targeted lm_head or embed_tokens beside its adapter
    (`save_embedding_layers`, `<module>.base_layer.weight`): they must equal the model's, or
    with PiSSA the residual adaptc computed from them (PEFT saves its own: equal to rounding)."""
    for name in [k for k in tensors if k.startswith(PREFIX) and ".base_layer." in k]:
        path, _, param = name.removeprefix(PREFIX).rpartition(".base_layer.")
        try:
            mine = model.get_submodule(path).get_parameter(param)
        except AttributeError:
            continue  # not a module's base layer: the name check reports it
        saved = tensors.pop(name)
        residual = pissa_residual(gm, path) if param == "weight" else None
        if residual is not None:
            mine = residual.detach().cpu()
            same = saved.shape == mine.shape and torch.allclose(
                saved.to(mine.dtype), mine, rtol=0, atol=1e-5 * mine.abs().max().item())
        else:
            same = saved.shape == mine.shape and torch.equal(saved.to(mine.dtype),
                                                             mine.detach().cpu())
        if not same:
            raise WeightsError(f"{directory}: the saved base weight {name} differs from the "
                               "model's (was the PEFT adapter trained on another model?)")


def pissa_residual(gm: nn.Module, path: str) -> torch.Tensor | None:
    """The weight PiSSA left in place of `path`'s, if its LoRA or DoRA has init=pissa."""
    for owner in ("lora", "dora"):
        try:
            return gm.get_parameter(f"{path}.{owner}.residual")
        except AttributeError:
            continue
    return None


def check_projections(gm: nn.Module, tensors: dict[str, torch.Tensor], directory) -> None:
    """VeRA's saved vera_A / vera_B (save_projection) must equal the ones adaptc regenerates."""
    shared = [m for m in gm.children() if isinstance(m, VeraProjections)]
    for name, attr in (("base_model.vera_A", "A"), ("base_model.vera_B", "B")):
        saved = tensors.pop(name, None)
        if saved is None:
            continue
        mine = getattr(shared[0], attr)
        if saved.shape != mine.shape or not torch.equal(saved.to(mine.dtype), mine):
            raise WeightsError(f"{directory}: the saved {name} differs from the projection "
                               "adaptc regenerates from projection_prng_key")
