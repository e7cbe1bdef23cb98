"""Merge rules: each weight-space adapter's `merged(weight, bias)` folds it into the layer.

The folded model is built by hand — a copy of the base model whose adapted layers get
`merged(W, b)`, W being the [out, in] weight the graph's linear reads (PiSSA: the residual) —
and must equal the unmerged compiled graph within 1e-5 (float32)."""
from __future__ import annotations

import re

import copy

import pytest
import torch

import adaptc
from helpers import inputs, main_output, perturb_adapters

TOL = 1e-5
CASES = [
    ("llama", "q_proj,v_proj: lora r=4 alpha=8"),
    ("gpt2", "c_attn,c_fc: lora r=4 alpha=8 rslora"),
    ("llama", "q_proj,down_proj: lora r=4 alpha=8 init=pissa"),
    ("llama", "q_proj,v_proj,down_proj: lora r=4 alpha=8 dora"),
    ("gpt2", "c_attn,mlp.c_proj: lora r=4 alpha=8 dora"),
    ("bert", "query,intermediate.dense: lora r=4 alpha=8 dora init=pissa"),
    ("llama", "k_proj,v_proj: ia3\ndown_proj: ia3 feedforward"),
    ("gpt2", "c_attn: ia3\nmlp.c_proj: ia3 feedforward"),
    ("bert", "key,value: ia3\noutput.dense: ia3 feedforward"),
    ("llama", "q_proj,v_proj,down_proj: vera r=16"),
    ("gpt2", "c_attn,c_fc: vera r=16"),
    ("llama", "q_proj,down_proj: adalora init_r=6 target_r=2 total_step=10"),
]


def fold_by_hand(model, gm):
    """A copy of the base model with every adapted layer's weight and bias replaced by
    `adapter.merged(W, b)`."""
    folded = copy.deepcopy(model)
    with torch.no_grad():
        for path, adapter in adaptc.adapters.adapter_modules(gm).items():
            layer = folded.get_submodule(path.rsplit(".", 1)[0])
            conv1d = type(layer).__name__ == "Conv1D"
            read = getattr(adapter, "residual", layer.weight)  # what the graph's linear reads
            weight, bias = adapter.merged(read.t() if conv1d else read, layer.bias)
            layer.weight.copy_(weight.t() if conv1d else weight)
            if bias is not None:
                layer.bias.copy_(bias)
    return folded


@pytest.mark.parametrize("family,spec", CASES, ids=[f"{f}:{s}" for f, s in CASES])
def test_merged_equals_unmerged(tiny, family, spec):
    model = tiny(family)
    gm = adaptc.compile(model, spec).eval()
    perturb_adapters(gm, 0.1)
    x = inputs(segments=family == "bert")
    unmerged = main_output(gm(**x))
    folded = main_output(fold_by_hand(model.module, gm)(**x))
    assert (unmerged - folded).abs().max().item() <= TOL
    assert (unmerged - main_output(model.module(**x))).abs().max().item() > 1e-3


def test_merged_casts_back_once(tiny):
    """Folding happens in float32 and the result comes back in the weight's dtype."""
    gm = adaptc.compile(tiny("llama"), "q_proj: lora r=4 dora")
    adapter = next(iter(adaptc.adapters.adapter_modules(gm).values()))
    weight = torch.randn(128, 128).to(torch.bfloat16)
    folded, bias = adapter.merged(weight, None)
    assert folded.dtype == torch.bfloat16 and bias is None


INFER = ["q_proj,v_proj: lora r=4 alpha=8 init=pissa",
         "*_proj: quantize\n*_proj: lora r=4 alpha=8",
         "q_proj: lora r=4 dora\nk_proj: ia3\nv_proj: vera r=8\n"
         "down_proj: adalora init_r=4 target_r=2 total_step=10\n*norm*: train",
         "q_proj: lora r=4 dora\nup_proj: ia3\ndown_proj: ia3 feedforward",
         "*_proj: quantize\n*_proj: lora r=4 alpha=8 dora"]


@pytest.mark.parametrize("spec", INFER)
def test_infer_mode_equals_train_mode(tiny, tmp_path, spec):
    """Infer mode with trained weights: PiSSA merges into its residual, QLoRA into a
    dequantised copy, VeRA, AdaLoRA, DoRA and IA3 into their layers' weights."""
    model = tiny("llama")
    gm = adaptc.compile(model, spec)
    perturb_adapters(gm, 0.1)
    adaptc.save_adapters(gm, tmp_path / "a.safetensors")
    infer = adaptc.compile(model, spec, mode="infer", adapters=tmp_path / "a.safetensors")
    x = inputs()
    assert (main_output(infer(**x)) - main_output(gm(**x))).abs().max().item() <= TOL
    assert not any(p.requires_grad for p in infer.parameters())
    left = {n.meta.get("adaptc.inserted") for n in infer.graph.nodes if n.op == "call_module"}
    assert not left & {"lora", "vera", "adalora", "dora", "ia3"}
    counts = adaptc.report_of(infer).counts
    for method in ("vera", "adalora", "ia3"):
        assert (counts[f"{method}_merged"] > 0) == (re.search(rf"\b{method}\b", spec) is not None)


@pytest.mark.parametrize("family,spec", [
    ("gpt2", "attn.c_attn: lora r=4 dora\nmlp.c_fc: ia3\nmlp.c_proj: ia3 feedforward"),
    ("bert", "query: lora r=4 dora\nkey,value: ia3\noutput.dense: ia3 feedforward"),
])
def test_scaling_merges_with_conv1d_and_biases(tiny, tmp_path, family, spec):
    """DoRA and IA3 fold into transposed (Conv1D) weights and into biases (IA3 output)."""
    model = tiny(family)
    gm = adaptc.compile(model, spec)
    perturb_adapters(gm, 0.1)
    adaptc.save_adapters(gm, tmp_path / "a.safetensors")
    infer = adaptc.compile(model, spec, mode="infer", adapters=tmp_path / "a.safetensors")
    x = inputs()
    assert (main_output(infer(**x)) - main_output(gm.eval()(**x))).abs().max().item() <= TOL
    assert not [n for n in infer.graph.nodes if n.op == "call_module"
                and n.meta.get("adaptc.inserted") in ("dora", "ia3")]
    assert sum(p.numel() for p in infer.parameters()) == sum(
        p.numel() for p in model.module.parameters())


@pytest.mark.parametrize("spec", ["q_proj,down_proj: lora r=4 alpha=8", "q_proj: lora r=4 dora",
                                  "q_proj: vera r=8", "q_proj: ia3\ndown_proj: ia3 feedforward",
                                  "q_proj: adalora init_r=4 target_r=2 total_step=5"])
def test_float64_merges_in_float64(tiny, tmp_path, spec):
    """A float64 model's merged weights keep float64 precision: a float32 detour rounded W₀
    itself (1e-7 off the train graph)."""
    model = tiny("llama")
    model.module.double()
    gm = adaptc.compile(model, spec).eval()
    perturb_adapters(gm, 0.1)
    adaptc.save_adapters(gm, tmp_path / "a.safetensors")
    infer = adaptc.compile(model, spec, mode="infer", adapters=tmp_path / "a.safetensors")
    x = inputs()
    assert (main_output(infer(**x)) - main_output(gm(**x))).abs().max().item() <= 1e-12
