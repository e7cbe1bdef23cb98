"""LoRA in the compiled graph equals PEFT's LoraModel with identical weights (float32)."""
from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model

import adaptc
from helpers import FAMILIES, inputs, main_output, peft_twin, randomize_and_copy

TOL = 1e-5
TARGETS = {"llama": ["q_proj", "v_proj"], "mistral": ["q_proj", "v_proj", "down_proj"],
           "gpt2": ["c_attn", "c_fc"], "bert": ["query", "value", "intermediate.dense"]}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("rslora", [False, True])
def test_lora_equals_peft(tiny, family, rslora):
    model = tiny(family)
    targets = TARGETS[family]
    spec = f"{','.join(targets)}: lora r=4 alpha=12{' rslora' if rslora else ''}"
    gm = adaptc.compile(model, spec).eval()
    twin = peft_twin(model.module, targets, 4, 12, rslora)
    randomize_and_copy(gm, twin)
    x = inputs(segments=family == "bert")
    ours, theirs = main_output(gm(**x)), main_output(twin(**x))
    assert (ours - theirs).abs().max().item() <= TOL
    assert (ours - main_output(model.module(**x))).abs().max().item() > 1e-3  # adapters act
    if family == "bert":  # sentence B's segment ids reach the graph; left out, they are zeros
        single = {k: v for k, v in x.items() if k != "token_type_ids"}
        assert (ours - main_output(gm(**single))).abs().max().item() > 1e-3
        assert torch.equal(main_output(gm(**single)),
                           main_output(gm(**single, token_type_ids=torch.zeros_like(x["input_ids"]))))


@pytest.mark.parametrize("family", FAMILIES)
def test_zero_b_equals_base(tiny, family):
    model = tiny(family)
    gm = adaptc.compile(model, f"{','.join(TARGETS[family])}: lora r=8 alpha=16").eval()
    x = inputs()
    assert torch.equal(main_output(gm(**x)), main_output(model.module(**x)))


@pytest.mark.parametrize("family", FAMILIES)
def test_trainable_count_equals_peft(tiny, family):
    model = tiny(family)
    gm = adaptc.compile(model, f"{','.join(TARGETS[family])}: lora r=8 alpha=16")
    twin = peft_twin(model.module, TARGETS[family], 8, 16)
    theirs_trainable, theirs_all = twin.get_nb_trainable_parameters()
    report = adaptc.report_of(gm)
    assert (report.trainable, report.total) == (theirs_trainable, theirs_all)
    assert {n for n, p in gm.named_parameters() if p.requires_grad} == set(
        adaptc.adapter_state_dict(gm))


def test_llama_7b_count_line_matches_peft():
    from adaptc.frontend.models import build_preset
    model = build_preset("llama-7b")
    gm = adaptc.compile(model, "q_proj,v_proj: lora r=8 alpha=16")
    line = adaptc.report_of(gm).peft_line()
    assert line == "trainable params: 4,194,304 || all params: 6,742,609,920 || trainable%: 0.0622"
    twin = get_peft_model(build_preset("llama-7b").module,
                          LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    assert twin.get_nb_trainable_parameters() == (4_194_304, 6_742_609_920)
