"""LoRA on mixture-of-experts weight stacks (transformers 5 keeps each MoE layer's experts as
3-D parameters, `experts.gate_up_proj` [E, 2I, H] and `experts.down_proj` [E, H, I]): the
graph equals the model run with W₀[e] + s·B[e]·A[e] in place of its experts' weights, the
parameter count equals PEFT's `target_parameters`, it trains, merges and decodes (float32)."""
from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model

import adaptc
from adaptc.errors import SpecError
from adaptc.peft_interop import export_peft, import_peft, spec_from_peft
from helpers import (assert_cached_decoding_follows, inputs, lm_loss, next_token_batch,
                     randomize_adapters, serve_checkpoint, small_decoder)

STACKS = ["experts.gate_up_proj", "experts.down_proj"]
SPEC = "experts.gate_up_proj, experts.down_proj: lora r=4 alpha=8; attn.q: lora r=2"


def with_updates(model, gm):
    """The HF model with every adapter's ΔW added to its weights: the independent reference."""
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for path, adapter in adaptc.adapters.adapter_modules(gm).items():
            owner, _, name = path.rpartition(".")
            weight = (f"{owner}.{name.removeprefix('lora_')}" if name.startswith("lora_")
                      else f"{owner}.weight")
            reference.get_parameter(weight).add_(adapter.scale * (adapter.B @ adapter.A))
    return reference


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_expert_lora_equals_the_updated_model_and_peft_counts(family):
    model = small_decoder(family)
    gm = adaptc.compile(model, SPEC)
    report = adaptc.report_of(gm)
    assert report.counts["expert_lora_inserted"] == 4 and report.counts["lora_inserted"] == 2
    twin = get_peft_model(copy.deepcopy(model), LoraConfig(
        r=4, lora_alpha=8, target_modules=[], target_parameters=STACKS))
    assert report.trainable - 2 * 2 * 64 * 2 == twin.get_nb_trainable_parameters()[0]
    x = inputs(vocab=128, batch=2, seq=6)
    assert torch.equal(gm(**x).logits, model(**x).logits)  # B starts at zero
    randomize_adapters(gm, 0.1)
    ours = gm.eval()(**x).logits
    assert (ours - with_updates(model, gm)(**x).logits).abs().max().item() <= 1e-5
    assert (ours - model(**x).logits).abs().max().item() > 1e-2


def test_peft_target_parameters_both_ways(tmp_path):
    """export_peft writes stacks as PEFT's ParamWrapper stores them (lora_A [E·r, d₂],
    lora_B [d₁, r·E], nested `base_layer.` per stack wrapped after it) and PEFT loads our
    outputs; import_peft reads a PEFT adapter back to PEFT's outputs."""
    from peft import PeftModel
    model = small_decoder("mixtral")
    gm = adaptc.compile(model, "experts.gate_up_proj, experts.down_proj, q_proj: lora r=4 alpha=8")
    randomize_adapters(gm, 0.1)
    export_peft(gm, tmp_path / "out")
    theirs = PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "out").eval()
    x = inputs(vocab=128, batch=2, seq=6)
    want = gm.eval()(**x).logits
    assert (theirs(**x).logits - want).abs().max().item() <= 1e-5
    twin = get_peft_model(copy.deepcopy(model), LoraConfig(
        r=4, lora_alpha=8, target_modules=["k_proj"], target_parameters=STACKS))
    with torch.no_grad():
        for name, param in twin.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=torch.Generator().manual_seed(
                    len(name))) * 0.1)
    twin.save_pretrained(tmp_path / "in")
    spec = spec_from_peft(tmp_path / "in", model)
    targets, options = spec.splitlines()[-1].split(": ")
    assert set(targets.split(", ")) == {"k_proj", "gate_up_proj", "down_proj"}
    assert options == "lora r=4 alpha=8"
    ours, peft_logits = import_peft(model, tmp_path / "in")(**x).logits, twin.eval()(**x).logits
    assert (ours - peft_logits).abs().max().item() <= 1e-5
    for logits in (want, peft_logits):  # the adapters act
        assert (logits - model(**x).logits).abs().max().item() > 1e-2


def test_expert_lora_trains():
    gm = adaptc.compile(small_decoder("mixtral"), "experts.gate_up_proj, experts.down_proj: lora r=4")
    optimizer = torch.optim.AdamW([p for p in gm.parameters() if p.requires_grad], lr=1e-2)
    ids = next_token_batch(vocab=64, batch=8)
    losses = []
    for _ in range(10):
        loss = lm_loss(gm, ids)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0]


def test_expert_lora_merges_and_decodes(tmp_path):
    """Merged: the stacks are new tensors W₀ + ΔW under their own names, in program.pt2 and
    in the HF checkpoint; cached decoding gives the tokens of full forward passes."""
    from transformers import AutoModelForCausalLM
    model = small_decoder("mixtral")
    model.save_pretrained(tmp_path / "ckpt")
    train, weights = serve_checkpoint(tmp_path, SPEC, 0.1)
    x = inputs(vocab=128, batch=2, seq=6)
    want = train.eval()(**x).logits
    program = adaptc.load_program(tmp_path / "out").module()
    assert (program(**x).logits - want).abs().max().item() <= 1e-5
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "hf")
    assert (merged(**x).logits - want).abs().max().item() <= 1e-5
    assert_cached_decoding_follows(train, tmp_path / "ckpt", SPEC, weights)


@pytest.mark.parametrize("spec,code,column,fragment", [
    ("experts.gate_up_proj: lora r=4 dropout=0.1", "E302", 40, "takes no dropout=0.1"),
    ("experts.gate_up_proj: lora r=4 dora", "E302", 32, "takes no dora=True"),
    ("experts.down_proj: lora r=200", "E303", 27, "r=200 exceeds min(d₁, d₂)=64"),
    ("experts.down_proj: lora r=2; mixture moe k=2", "E302", 1, "cannot join the mixture"),
    ("experts.down_proj: ia3", "E301", 1, "matches no module"),
])
def test_what_an_expert_stack_cannot_take_is_located(spec, code, column, fragment):
    with pytest.raises(SpecError) as info:
        adaptc.compile(small_decoder("mixtral"), spec)
    diag = info.value.first
    assert (diag.code, diag.line, diag.column) == (code, 1, column)
    assert fragment in diag.message
