"""`train` statements: LayerNorm/RMSNorm tuning equals PEFT's LNTuningModel; BitFit equals a
float64 reference (the base model with the same biases); the user's tensors never change."""
from __future__ import annotations

import copy

import pytest
import torch
from peft import LNTuningConfig, get_peft_model

import adaptc
from helpers import inputs, main_output, perturb_adapters

TOL = 1e-5
LN = {"llama": ("input_layernorm, post_attention_layernorm, norm: train",
                ["input_layernorm", "post_attention_layernorm", "norm"]),
      "bert": ("LayerNorm: train", ["LayerNorm"])}


@pytest.mark.parametrize("family", list(LN))
def test_ln_tuning_equals_peft(tiny, family):
    model = tiny(family)
    spec, targets = LN[family]
    before = {k: v.clone() for k, v in model.module.state_dict().items()}
    gm = adaptc.compile(model, spec).eval()
    twin = get_peft_model(copy.deepcopy(model.module), LNTuningConfig(target_modules=targets))
    twin.eval()
    perturb_adapters(gm, 0.3)
    inner = twin.base_model.model
    with torch.no_grad():
        for path, ours in adaptc.adapters.adapter_modules(gm).items():
            layer = inner.get_submodule(path.rsplit(".", 1)[0]).ln_tuning_layers["default"]
            for name, param in ours.adapter_parameters().items():
                getattr(layer, name).copy_(param)
    x = inputs()
    mine = main_output(gm(**x))
    assert (mine - main_output(twin(**x))).abs().max().item() <= TOL
    assert (mine - main_output(model.module(**x))).abs().max().item() > 1e-3
    assert all(torch.equal(before[k], v) for k, v in model.module.state_dict().items())
    report = adaptc.report_of(gm)
    trainable, total = twin.get_nb_trainable_parameters()
    assert report.trainable == trainable
    assert report.total == total - trainable  # PEFT keeps the original and the copy


def test_bitfit_equals_float64_reference(tiny):
    model = tiny("bert")
    gm = adaptc.compile(model, "*.bias: train").eval()
    biases = {n for n, _ in model.module.named_parameters() if n.endswith(".bias")}
    report = adaptc.report_of(gm)
    assert {row["path"] for row in report.sites} == biases
    assert report.trainable == sum(model.module.get_parameter(n).numel() for n in biases)
    perturb_adapters(gm, 0.3)
    reference = copy.deepcopy(model.module).double()
    with torch.no_grad():
        for path, ours in adaptc.adapters.adapter_modules(gm).items():
            owner = path.rsplit(".", 1)[0]
            reference.get_submodule(owner).bias.copy_(ours.bias)
    x = inputs()
    expected = main_output(reference(**x))
    diff = (main_output(gm(**x)).double() - expected).abs().max().item()
    assert diff <= 2e-5 * expected.abs().max().item() + 2e-5


def test_train_selects_by_owner_and_layer(tiny):
    gm = adaptc.compile(tiny("llama"), "*norm*[1]: train")
    rows = [row["path"] for row in adaptc.report_of(gm).sites]
    assert rows == ["model.layers.1.input_layernorm.weight",
                    "model.layers.1.post_attention_layernorm.weight"]
    assert set(adaptc.adapter_state_dict(gm)) == {
        "model.layers.1.input_layernorm.trained.weight",
        "model.layers.1.post_attention_layernorm.trained.weight"}


def test_tied_weight_trains_under_its_listed_name(tiny):
    model = tiny("gpt2")  # lm_head.weight is transformer.wte.weight
    gm = adaptc.compile(model, "wte: train")
    (adapter,) = adaptc.adapters.adapter_modules(gm).values()
    logits = gm(**inputs()).logits
    logits.square().mean().backward()
    assert adapter.weight.grad is not None
    with pytest.raises(adaptc.SpecError, match="'lm_head' matches no parameter"):
        adaptc.compile(model, "lm_head: train")


def test_parameter_replaced_by_pissa_is_refused_at_the_train_target(tiny):
    with pytest.raises(adaptc.SpecError, match="q_proj.weight' selected by `train`") as err:
        adaptc.compile(tiny("llama"), "q_proj: lora r=2 init=pissa\nq_proj.weight: train")
    first = err.value.first
    assert (first.code, first.line, first.column, first.end_column) == ("E302", 2, 1, 14)


@pytest.mark.parametrize("family,owner", [("gpt2", "transformer.wte"), ("t5", "shared")])
def test_train_on_a_tied_head_names_the_weight_it_is_tied_to(tiny, family, owner):
    """PEFT users write `lm_head` (modules_to_save); where the head's weight is the embedding's
    (tied, listed once), E301 says which name selects it."""
    with pytest.raises(adaptc.SpecError, match="'lm_head' matches no parameter") as err:
        adaptc.compile(tiny(family), "lm_head: train")
    assert (f"lm_head.weight is {owner}.weight (tied): select it as '{owner}'"
            in str(err.value))
