"""(IA)³ in the compiled graph equals PEFT's IA3Model with identical scaling vectors."""
from __future__ import annotations

import copy

import pytest
import torch
from peft import IA3Config, get_peft_model

import adaptc
from helpers import copy_ia3_scales, inputs, main_output

TOL = 1e-5
# (spec, PEFT target_modules, PEFT feedforward_modules): PEFT's defaults for these families
CASES = {
    "llama": ("k_proj,v_proj: ia3\ndown_proj: ia3 feedforward",
              ["k_proj", "v_proj", "down_proj"], ["down_proj"]),
    "bert": ("key,value: ia3\noutput.dense: ia3 feedforward",
             ["key", "value", "output.dense"], ["output.dense"]),
    "gpt2": ("c_attn: ia3\nmlp.c_proj: ia3 feedforward", ["c_attn", "mlp.c_proj"], ["mlp.c_proj"]),
}


@pytest.mark.parametrize("family", list(CASES))
def test_ia3_equals_peft(tiny, family):
    model = tiny(family)
    spec, targets, feedforward = CASES[family]
    gm = adaptc.compile(model, spec).eval()
    config = IA3Config(target_modules=targets, feedforward_modules=feedforward,
                       fan_in_fan_out=family == "gpt2")
    twin = get_peft_model(copy.deepcopy(model.module), config).eval()
    x = inputs()
    base = main_output(model.module(**x))
    assert torch.equal(main_output(gm(**x)), base)
    copy_ia3_scales(gm, twin)
    ours = main_output(gm(**x))
    assert (ours - main_output(twin(**x))).abs().max().item() <= TOL
    assert (ours - base).abs().max().item() > 1e-3
    report = adaptc.report_of(gm)
    assert report.counts["ia3_inserted"] == len(report.sites)
    assert (report.trainable, report.total) == twin.get_nb_trainable_parameters()


def test_ia3_rows_name_the_scaled_side(tiny):
    gm = adaptc.compile(tiny("llama"), "v_proj[0]: ia3\ndown_proj[0]: ia3 feedforward")
    rows = {row["path"]: (row["method"], row["params"]) for row in adaptc.report_of(gm).sites}
    assert rows == {"model.layers.0.self_attn.v_proj": ("ia3/output", 64),
                    "model.layers.0.mlp.down_proj": ("ia3/input", 344)}


def test_two_weight_space_methods_on_one_layer_is_e305(tiny):
    with pytest.raises(adaptc.SpecError) as caught:
        adaptc.compile(tiny("llama"), "v_proj: lora r=2\nattn.*: ia3")
    (problem,) = caught.value.diagnostics
    assert problem.code == "E305" and (problem.line, problem.column) == (2, 1)
    assert "gets ia3 here and lora (line 1)" in problem.message
