"""Families with alias tables beyond the presets: the portable spec resolves to the modules
PEFT users name, LoRA on them equals PEFT's, and the merged infer graph equals the train
graph (float32)."""
from __future__ import annotations

import re

import pytest

import adaptc
from adaptc.compiler import prepare
from helpers import (assert_cached_decoding_follows, inputs, main_output, peft_twin,
                     randomize_and_copy, serve_checkpoint, small_decoder, small_encoder)

PORTABLE = "attn.*,ffn.*: lora r=2 alpha=4"
# per family: PEFT target_modules for every attention and FFN linear, and where `ffn` and
# `attn` put a block adapter
FAMILIES = {
    "phi3": (["qkv_proj", "o_proj", "gate_up_proj", "down_proj"], "mlp", "self_attn"),
    "phi": (["q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"], "mlp", "self_attn"),
    "gptj": (["q_proj", "k_proj", "v_proj", "out_proj", "fc_in", "fc_out"], "mlp", "attn"),
    "falcon": (["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"], "mlp",
               "self_attention"),
    "mpt": (["Wqkv", "out_proj", "up_proj", "down_proj"], "ffn", "attn"),
    "distilbert": (["q_lin", "k_lin", "v_lin", "out_lin", "lin1", "lin2"], "ffn", "attention"),
    "deberta-v2": (["query_proj", "key_proj", "value_proj", "output.dense",
                    "intermediate.dense"], "layer.*.output.dense", "attention.output.dense"),
    "modernbert": (["Wqkv", "Wo", "Wi"], "mlp", "attn"),
}
ENCODER_FAMILIES = ("distilbert", "deberta-v2", "modernbert")


def build(family: str):
    return small_encoder(family) if family in ENCODER_FAMILIES else small_decoder(family)


def resolved(model, spec: str) -> set[str]:
    return {a.site.path for a in prepare(model, spec, "train").assignments}


def block_paths(paths: set[str]) -> set[str]:
    """`transformer.h.1.mlp` → `mlp`: the path inside a layer."""
    return {re.split(r"\.\d+\.", path, maxsplit=1)[-1] for path in paths}


@pytest.mark.parametrize("family", FAMILIES)
def test_aliases_resolve_to_the_modules_peft_names(family):
    targets, ffn, attn = FAMILIES[family]
    model = build(family)
    assert resolved(model, PORTABLE) == resolved(model, f"{','.join(targets)}: lora")
    assert len(resolved(model, PORTABLE)) == 2 * len(block_paths(resolved(model, PORTABLE)))
    assert block_paths(resolved(model, "ffn: adapter")) == {ffn.replace("layer.*.", "")}
    assert block_paths(resolved(model, "attn: adapter")) == {attn}


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_on_every_projection_equals_peft_and_merges(family, tmp_path):
    """Falcon's FalconLinear computes `x @ W.T + b`; canonicalize_linears makes it a linear op
    so LoRA attaches there as on nn.Linear."""
    targets, _, _ = FAMILIES[family]
    model = build(family)
    train = adaptc.compile(model, PORTABLE)
    twin = peft_twin(model, targets, 2, 4)
    report = adaptc.report_of(train)
    assert (report.trainable, report.total) == twin.get_nb_trainable_parameters()
    randomize_and_copy(train, twin)
    x = inputs(vocab=128, batch=2, seq=6)
    ours = main_output(train.eval()(**x))
    assert (ours - main_output(twin(**x))).abs().max().item() <= 1e-5
    assert (ours - main_output(model(**x))).abs().max().item() > 1e-3  # the adapters act
    adaptc.save_adapters(train, tmp_path / "a.safetensors")
    infer = adaptc.compile(model, PORTABLE, "infer", adapters=tmp_path / "a.safetensors")
    assert (main_output(infer(**x)) - ours).abs().max().item() <= 1e-5
    if family == "falcon":
        assert adaptc.report_of(train).counts["linears_canonicalized"] == 8


def test_falcon_lora_serves_merged_and_decodes(tmp_path):
    """LoRA on FalconLinear layers merges into a plain HF checkpoint, and the cached decoder
    (its graph traced anew, inside transformers' static-cache wrapper) gives the tokens of
    full-sequence forward passes."""
    from transformers import AutoModelForCausalLM
    model = small_decoder("falcon")
    model.save_pretrained(tmp_path / "ckpt")
    train, weights = serve_checkpoint(tmp_path, PORTABLE, 0.3)
    x = inputs(vocab=128, batch=2, seq=6)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "hf")
    assert (merged(**x).logits - train.eval()(**x).logits).abs().max().item() <= 1e-5
    assert_cached_decoding_follows(train, tmp_path / "ckpt", PORTABLE, weights)
