"""DoRA (`lora ... dora`) equals PEFT's LoraConfig(use_dora=True) with identical weights."""
from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model

import adaptc
from helpers import inputs, main_output

TOL = 1e-5
TARGETS = {"llama": ["q_proj", "v_proj", "down_proj"], "gpt2": ["c_attn", "c_fc"],
           "bert": ["query", "value", "intermediate.dense"]}


def peft_dora(model, targets, **options):
    config = LoraConfig(r=4, lora_alpha=8, target_modules=targets, use_dora=True,
                        fan_in_fan_out=model.config.model_type == "gpt2", **options)
    return get_peft_model(copy.deepcopy(model), config).eval()


def peft_layer(twin, adapter_path):
    return twin.base_model.model.get_submodule(adapter_path.rsplit(".", 1)[0])


def randomize_and_copy(gm, twin, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for path, ours in adaptc.adapters.adapter_modules(gm).items():
            layer = peft_layer(twin, path)
            ours.A.copy_(torch.randn(ours.A.shape, generator=gen) * 0.1)
            ours.B.copy_(torch.randn(ours.B.shape, generator=gen) * 0.1)
            ours.magnitude.mul_(1 + 0.1 * torch.randn(ours.magnitude.shape, generator=gen))
            layer.lora_A["default"].weight.copy_(ours.A)
            layer.lora_B["default"].weight.copy_(ours.B)
            layer.lora_magnitude_vector["default"].weight.copy_(ours.magnitude)


@pytest.mark.parametrize("family,init", [("llama", "kaiming"), ("bert", "kaiming"),
                                         ("gpt2", "kaiming"), ("llama", "pissa")])
def test_dora_equals_peft(tiny, family, init):
    model = tiny(family)
    targets = TARGETS[family]
    gm = adaptc.compile(model, f"{','.join(targets)}: lora r=4 alpha=8 dora init={init}").eval()
    peft_init = "pissa" if init == "pissa" else True
    twin = peft_dora(model.module, targets, init_lora_weights=peft_init)
    x = inputs()
    base = main_output(model.module(**x))
    assert (main_output(gm(**x)) - base).abs().max().item() <= TOL  # starts at the base model
    for path, ours in adaptc.adapters.adapter_modules(gm).items():
        theirs = peft_layer(twin, path).lora_magnitude_vector["default"].weight
        assert torch.allclose(ours.magnitude, theirs, atol=1e-6)
    randomize_and_copy(gm, twin)
    ours = main_output(gm(**x))
    assert (ours - main_output(twin(**x))).abs().max().item() <= TOL
    assert (ours - base).abs().max().item() > 1e-3
    report = adaptc.report_of(gm)
    assert report.counts["dora_inserted"] == len(report.sites)
    assert (report.trainable, report.total) == twin.get_nb_trainable_parameters()


def test_dora_dropout_path_equals_peft_layer(tiny):
    """In training with dropout, W₀·x' is recomputed from the dropped input, as PEFT does."""
    model = tiny("llama")
    gm = adaptc.compile(model, "q_proj: lora r=4 alpha=8 dora dropout=0.5")
    twin = peft_dora(model.module, ["q_proj"], lora_dropout=0.5)
    randomize_and_copy(gm, twin)
    path, ours = next(iter(adaptc.adapters.adapter_modules(gm).items()))
    layer = peft_layer(twin, path).train()
    ours.train()
    x = torch.randn(2, 5, 128)
    weight, bias = layer.base_layer.weight, layer.base_layer.bias
    torch.manual_seed(3)
    theirs = layer(x)
    torch.manual_seed(3)
    base = torch.nn.functional.linear(x, weight, bias)
    mine = base + ours(x, weight, bias, base)
    assert (mine - theirs).abs().max().item() <= TOL


def test_dora_gradients_and_detached_norm(tiny):
    gm = adaptc.compile(tiny("llama"), "q_proj,v_proj: lora r=4 dora")
    adapters = list(adaptc.adapters.adapter_modules(gm).values())
    with torch.no_grad():
        for adapter in adapters:
            adapter.B.normal_()
    main_output(gm(**inputs())).square().mean().backward()
    for adapter in adapters:
        for name, param in adapter.adapter_parameters().items():
            assert param.grad is not None and param.grad.abs().sum() > 0, name
    assert {n for n, p in gm.named_parameters() if p.requires_grad} == set(
        adaptc.adapter_state_dict(gm))
