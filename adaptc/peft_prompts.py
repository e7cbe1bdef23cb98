"""PEFT interop for the virtual-token methods: `prompt`/`ptuning` ⇄ PROMPT_TUNING (P_TUNING
reads in), `prefix`/`ptuning2` ⇄ PREFIX_TUNING.

PEFT saves one tensor for them, `prompt_embeddings`, what its model reads at inference:

    PROMPT_TUNING, P_TUNING   [n, D]           the virtual tokens (P-tuning: its encoder's
                                               output; the encoder itself is not saved)
    PREFIX_TUNING             [P, L·2·H_kv·d]  row p: layer-major keys then values of token p
                                               (with prefix_projection: the MLP's output)

so export writes the folded values (`prompts()`, the prefix encoder's output) and import
compiles a free `prompt` or `prefix` and loads them. Encoder-decoders: PEFT's prompt goes
before the encoder's input only, as adaptc's does; its default `num_transformer_submodules=2`
trains 2n rows of which its forward and `generate` read the first n, so import takes those
(export writes 1). PEFT's seq2seq prefix goes on
the decoder's self-attention, and its rows pair self- and cross-attention prefixes, so
decoder layer l reads block 2l mod L: import maps that; export cannot, since layers l and
l + L/2 would share one block.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from adaptc.adapters import adapter_modules, load_adapter_tensors
from adaptc.errors import InteropError, WeightsError
from adaptc.frontend.models import LoadedModel
from adaptc.frontend.sites import site_table
from adaptc.frontend.targets import ALIASES, naming
from adaptc.frontend.trace import is_encoder_decoder
from adaptc.methods.prefix import PrefixAttention, PrefixEncoder
from adaptc.methods.prompt import PromptEmbedding, PromptEncoder

PROMPT_KINDS = ("PROMPT_TUNING", "P_TUNING", "PREFIX_TUNING")
CONFIG_KEYS = {  # the keys of PEFT's configs adaptc reads or may ignore (init only)
    "PROMPT_TUNING": {"num_virtual_tokens", "token_dim", "num_attention_heads", "num_layers",
                      "num_transformer_submodules", "prompt_tuning_init",
                      "prompt_tuning_init_text", "tokenizer_name_or_path", "tokenizer_kwargs"},
    "P_TUNING": {"num_virtual_tokens", "token_dim", "num_attention_heads", "num_layers",
                 "num_transformer_submodules", "encoder_reparameterization_type",
                 "encoder_hidden_size", "encoder_num_layers", "encoder_dropout"},
    "PREFIX_TUNING": {"num_virtual_tokens", "token_dim", "num_attention_heads", "num_layers",
                      "num_transformer_submodules", "encoder_hidden_size", "prefix_projection",
                      "init_weights"},
}
TENSOR = "prompt_embeddings"
# where PEFT's seq2seq prefix goes: the decoder's self-attentions
DECODER_SELF_ATTENTION = {"bart": "decoder.layers.*.self_attn",
                          "t5": "decoder.block.*.layer.0.SelfAttention"}


def virtual_token_modules(module: nn.Module) -> dict[str, nn.Module]:
    """The module's prompt and prefix adapters, by path (their per-layer prefix attentions
    hold nothing to export unless gated)."""
    kinds = (PromptEmbedding, PromptEncoder, PrefixEncoder)
    return {path: m for path, m in adapter_modules(module).items() if isinstance(m, kinds)}


# ---- export -------------------------------------------------------------------------------

def export_prompts(module: nn.Module, task_type: str | None,
                   heads: set[str] = frozenset()) -> tuple[dict, dict]:
    """PEFT's config and tensors for a module whose adapters are one prompt or one prefix
    (besides the `heads` adapters, which travel as modules_to_save)."""
    from adaptc.compiler import report_of

    found = virtual_token_modules(module)
    others = [p for p, m in adapter_modules(module).items() if p not in found and p not in heads
              and not (isinstance(m, PrefixAttention) and m.gate is None)]
    if others or len(found) != 1:
        what = others[0] if others else ", ".join(found)
        raise InteropError(f"a PEFT adapter directory holds one method; besides its prompt or "
                           f"prefix this module has '{what}'")
    if task_type is None:
        raise InteropError("PEFT applies prompts and prefixes in its task model: give the "
                           "task type (task_type=, or --task-type for adaptc export-peft: "
                           "CAUSAL_LM, SEQ_2_SEQ_LM, SEQ_CLS, FEATURE_EXTRACTION, ...)")
    adapter, = found.values()
    report = report_of(module)
    with torch.no_grad():
        if isinstance(adapter, PrefixEncoder):
            return prefix_export(module, report, adapter, task_type)
        prompts = adapter.prompts()
    config = {"peft_type": "PROMPT_TUNING", "task_type": task_type,
              "num_virtual_tokens": prompts.shape[0], "token_dim": prompts.shape[1],
              "num_transformer_submodules": 1, "prompt_tuning_init": "RANDOM"}
    return common(config), {TENSOR: prompts}


def prefix_export(module: nn.Module, report, encoder: PrefixEncoder,
                  task_type: str) -> tuple[dict, dict]:
    layers, _, tokens, heads, dim = encoder.shape
    sites = [row["path"] for row in report.sites if row["method"] in ("prefix", "ptuning2")]
    if task_type == "SEQ_2_SEQ_LM":
        raise InteropError("PEFT's seq2seq prefix rows pair self- and cross-attention, so "
                           f"decoder layers l and l + L/2 share one: the {layers} per-layer "
                           "prefixes cannot be written in that layout")
    every = layer_indices(name for name, _ in module.named_parameters())
    if layer_indices(sites) != every:
        raise InteropError(f"PEFT prefixes every layer; this module has prefixes on "
                           f"{len(sites)} of {len(every)} layers")
    prefix = encoder()  # [L, 2, P, H_kv, d]
    config = {"peft_type": "PREFIX_TUNING", "task_type": task_type,
              "num_virtual_tokens": tokens, "token_dim": heads * dim,
              "num_attention_heads": heads, "num_layers": layers,
              "num_transformer_submodules": 1, "prefix_projection": False}
    return common(config), {TENSOR: prefix.permute(2, 0, 1, 3, 4).reshape(tokens, -1)}


def layer_indices(paths) -> set[int]:
    """The layer index of each dotted path (its first integer segment) that has one."""
    return {next(int(part) for part in path.split(".") if part.isdigit())
            for path in paths if any(part.isdigit() for part in path.split("."))}


def common(config: dict) -> dict:
    return {**config, "base_model_name_or_path": None, "revision": None,
            "inference_mode": True}


# ---- import -------------------------------------------------------------------------------

def prompt_spec(config: dict, model: LoadedModel, where: str) -> str:
    """The adapt spec for a PEFT prompt-learning config on `model` (checked against it)."""
    kind, tokens = config["peft_type"], config.get("num_virtual_tokens")
    if not isinstance(tokens, int) or tokens < 1:
        raise InteropError(f"{where}: num_virtual_tokens={tokens!r} is not a positive integer")
    if config.get("task_type") is None:  # PeftModel without a task model never reads the tokens
        raise InteropError(f"{where}: task_type is null, so PEFT's model ignores this {kind} "
                           "adapter (only its task models apply prompts and prefixes); set "
                           "task_type (CAUSAL_LM, SEQ_2_SEQ_LM, FEATURE_EXTRACTION, ...)")
    header = f"# generated by adaptc from a PEFT adapter directory (peft_type {kind})"
    submodules = config.get("num_transformer_submodules") or 1
    if kind == "PREFIX_TUNING":
        family = naming(model.family, site_table(model.module))
        if family not in ALIASES:
            raise InteropError(f"{where}: this model has no alias table to find its "
                               "attention modules by; write a prefix spec by hand")
        target = DECODER_SELF_ATTENTION.get(family, "attn")
        return f"{header}\n{target}: prefix tokens={tokens}\n"
    if submodules not in (1, 2) or (submodules == 2 and not is_encoder_decoder(model)):
        raise InteropError(f"{where}: num_transformer_submodules={submodules} does not fit "
                           "this model (1; or 2 for an encoder-decoder)")
    note = "  # P-tuning's encoder output, as PEFT saved it" if kind == "P_TUNING" else ""
    return f"{header}\nembed: prompt tokens={tokens}{note}\n"


def import_prompts(model: LoadedModel, source: Path, config: dict, spec: str,
                   tensors: dict[str, torch.Tensor], copies: dict[str, torch.Tensor]
                   ) -> nn.Module:
    """Compile `spec` and load PEFT's `prompt_embeddings` (read from `source`) into its
    prompt or prefix, and `copies` (adaptc's names: the modules_to_save copies) beside."""
    from adaptc.compiler import compile

    if set(tensors) != {TENSOR}:
        raise WeightsError(f"{source}: a {config['peft_type']} adapter holds one tensor, "
                           f"'{TENSOR}'; found {', '.join(sorted(tensors)) or 'none'}")
    gm = compile(model, spec)
    (path, adapter), = virtual_token_modules(gm).items()
    saved = tensors[TENSOR]
    tokens = config["num_virtual_tokens"]
    rows = tokens  # PEFT's prefix holds n rows, its prompt n per transformer submodule
    if isinstance(adapter, PromptEmbedding):
        rows *= config.get("num_transformer_submodules") or 1
    if saved.ndim != 2 or saved.shape[0] != rows:
        raise WeightsError(f"{source}: '{TENSOR}' has shape {tuple(saved.shape)}; "
                           f"num_virtual_tokens={tokens} gives {rows} rows (PEFT refuses it)")
    if isinstance(adapter, PromptEmbedding):  # PEFT's second n rows (seq2seq) go unread
        load_adapter_tensors(gm, {f"{path}.embedding": saved[:adapter.config.tokens],
                                  **copies}, str(source))
        return gm
    layers, _, tokens, heads, dim = adapter.shape
    expected = (config.get("num_layers"), config.get("num_attention_heads"))
    if expected != (layers, heads) or saved.shape[-1] != layers * 2 * heads * dim:
        raise WeightsError(f"{source}: the prefix is laid out for {expected[0]} layers of "
                           f"{expected[1]} key/value heads ({saved.shape[-1]} columns); the "
                           f"model's adapted attentions are {layers} layers of {heads} heads "
                           f"of width {dim}")
    prefix = saved[:tokens].reshape(tokens, layers, 2, heads, dim).permute(1, 2, 0, 3, 4)
    if is_encoder_decoder(model):
        prefix = prefix[[2 * layer % layers for layer in range(layers)]]
    load_adapter_tensors(gm, {f"{path}.prefix": prefix, **copies}, str(source))
    return gm
