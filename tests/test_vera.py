"""VeRA in the compiled graph equals PEFT's VeraModel: the shared A and B regenerate from the
seed bit for bit, and with the same λ_d, λ_b the outputs agree."""
from __future__ import annotations

import copy

import pytest
import torch
from peft import VeraConfig, get_peft_model

import adaptc
from helpers import inputs, main_output

TOL = 1e-5
TARGETS = {"llama": ["q_proj", "v_proj", "down_proj"],
           "bert": ["query", "value", "intermediate.dense"],
           "gpt2": ["c_attn", "c_proj", "c_fc"],  # Conv1D of three shapes: fan_in_fan_out
           "qwen2": ["q_proj", "v_proj", "o_proj", "down_proj"]}  # biased q, v; GQA's narrow v


@pytest.mark.parametrize("family", list(TARGETS))
def test_vera_equals_peft(tiny, family):
    model = tiny(family)
    targets = TARGETS[family]
    gm = adaptc.compile(model, f"{','.join(targets)}: vera r=16 seed=7 d_init=0.2").eval()
    twin = get_peft_model(copy.deepcopy(model.module),
                          VeraConfig(r=16, target_modules=targets, projection_prng_key=7,
                                     d_initial=0.2, fan_in_fan_out=family == "gpt2")).eval()
    shared = gm.get_submodule("vera_r16_seed7")
    assert torch.equal(shared.A, twin.base_model.vera_A["default"])
    assert torch.equal(shared.B, twin.base_model.vera_B["default"])
    x = inputs()
    base = main_output(model.module(**x))
    assert torch.equal(main_output(gm(**x)), base)
    gen = torch.Generator().manual_seed(0)
    inner = twin.base_model.model
    with torch.no_grad():
        for path, ours in adaptc.adapters.adapter_modules(gm).items():
            layer = inner.get_submodule(path.rsplit(".", 1)[0])
            assert torch.allclose(ours.lambda_d, layer.vera_lambda_d["default"])
            for mine, theirs in ((ours.lambda_d, layer.vera_lambda_d), (ours.lambda_b,
                                                                        layer.vera_lambda_b)):
                mine.copy_(torch.randn(mine.shape, generator=gen) * 0.3)
                theirs["default"].copy_(mine)
    ours = main_output(gm(**x))
    assert (ours - main_output(twin(**x))).abs().max().item() <= TOL
    assert (ours - base).abs().max().item() > 1e-3
    report = adaptc.report_of(gm)
    assert report.counts["vera_inserted"] == len(report.sites)
    assert (report.trainable, report.total) == twin.get_nb_trainable_parameters()


def test_shared_projections_are_frozen_buffers_not_saved(tiny):
    gm = adaptc.compile(tiny("llama"), "q_proj: vera r=8\nv_proj: vera r=8 seed=1")
    report = adaptc.report_of(gm)
    assert report.counts["vera_shared"] == 2
    names = {n for n, _ in gm.named_buffers()}
    assert {"vera_r8_seed0.A", "vera_r8_seed0.B", "vera_r8_seed1.A", "vera_r8_seed1.B"} <= names
    saved = set(adaptc.adapter_state_dict(gm))
    assert all(name.endswith((".lambda_d", ".lambda_b")) for name in saved)
    assert {n for n, p in gm.named_parameters() if p.requires_grad} == saved


def test_vera_rank_may_exceed_layer_width(tiny):
    gm = adaptc.compile(tiny("llama"), "v_proj: vera")  # r=256 > 64 outputs
    assert gm.get_submodule("vera_r256_seed0").A.shape == (256, 128)
