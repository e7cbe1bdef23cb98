"""Target resolution: aliases per family, layer selection, overrides, located errors."""
from __future__ import annotations

import re

import pytest
import torch
from torch import nn

import adaptc
from adaptc.errors import ModelError, SpecError


def sites(gm) -> dict[str, str]:
    return {row["path"]: row["method"] for row in adaptc.report_of(gm).sites}


@pytest.mark.parametrize("family,expected", [
    ("llama", {"self_attn.q_proj", "self_attn.v_proj"}),
    ("gpt2", {"attn.c_attn"}),
    ("bert", {"attention.self.query", "attention.self.value"}),
])
def test_role_aliases_port_across_families(tiny, family, expected):
    gm = adaptc.compile(tiny(family), "attn.q,attn.v: lora r=2")
    assert {re.split(r"\.\d+\.", path, maxsplit=1)[-1] for path in sites(gm)} == expected
    assert len(sites(gm)) == 2 * len(expected)


def test_layer_selection_and_override(tiny):
    gm = adaptc.compile(tiny("llama"), "*_proj[1:]: lora r=2\nv_proj[-1]: lora r=6")
    rows = {row["path"]: row for row in adaptc.report_of(gm).sites}
    assert all(".layers.1." in path for path in rows)
    assert len(rows) == 7
    assert rows["model.layers.1.self_attn.v_proj"]["line"] == 2
    v = gm.get_submodule("model.layers.1.self_attn.v_proj.lora")
    assert v.A.shape[0] == 6


def test_lora_and_adapter_compose_on_one_module(tiny):
    gm = adaptc.compile(tiny("llama"), "down_proj: lora r=2\ndown_proj: adapter bottleneck=4")
    methods = [row["method"] for row in adaptc.report_of(gm).sites]
    assert methods.count("lora") == 2 and methods.count("adapter/sequential") == 2


@pytest.mark.parametrize("spec,code,line,col,fragment", [
    ("q_proj: lora r=2\nqproj: lora r=2", "E301", 2, 1, "did you mean 'q_proj'"),
    ("embed_tokens: lora r=2", "E302", 1, 1, "lora cannot adapt model.embed_tokens"),
    ("v_proj: lora r=1\nq_proj: lora r=4096", "E303", 2, 16, "exceeds min(in, out)=128"),
    ("q_proj[5:9]: lora", "E304", 1, 7, "picks no layer"),
])
def test_model_time_errors_are_located(tiny, spec, code, line, col, fragment):
    with pytest.raises(SpecError) as info:
        adaptc.compile(tiny("llama"), spec)
    diag = info.value.first
    assert (diag.code, diag.line, diag.column) == (code, line, col)
    assert fragment in diag.message
    assert f"<string>:{line}:{col}: error[{code}]" in str(info.value)


class Branchy(nn.Module):
    """Data-dependent control flow in a submodule: torch.export cannot trace it."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4)
        self.gate = Gate()

    def forward(self, x):
        return self.gate(self.proj(x))


class Gate(nn.Module):
    def forward(self, x):
        if x.sum() > 0:
            return x * 2
        return x


def test_untraceable_model_names_the_module():
    with pytest.raises(ModelError, match=r"module 'gate' \(Gate\)"):
        adaptc.compile(Branchy(), "proj: lora r=2", example_inputs={"x": torch.randn(2, 4)})
