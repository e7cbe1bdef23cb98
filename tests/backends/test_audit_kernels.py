"""Infer graphs on the Triton kernels (interpreted on CPU, see conftest.py) against the
float64 references of tests/test_audit_methods.py: bottleneck adapters, MoLoRA, MoV and
LoRAMoE on Llama, GPT-2 (flattened tokens) and BERT."""
from __future__ import annotations

import pytest
import torch
from helpers import adapter_leaves, inputs, main_output, randomize_adapters, rel_diff
from test_audit_methods import OUT_TOL, bottleneck_reference, mixture_reference, mov_reference

import adaptc
from adaptc.backends.triton import use_triton

CASES = [
    ("gpt2", "attn.o, ffn: adapter bottleneck=6 activation=gelu"),
    ("bert", "ffn: adapter bottleneck=6 activation=tanh placement=parallel"),
    ("gpt2", "attn.c_attn, mlp.c_proj: lora r=3 alpha=6\nmixture moe k=2 experts=3"),
    ("bert", "query, output.dense: lora r=3 alpha=6\nmixture moe router=soft experts=3"),
    ("llama", "q_proj, down_proj: lora r=3 alpha=6\nmixture loramoe experts=4"),
    ("gpt2", "attn.c_attn: ia3\nmlp.c_proj: ia3 feedforward\nmixture moe k=1 experts=3"),
    ("bert", "key: ia3\noutput.dense: ia3 feedforward\nmixture moe router=soft experts=3"),
]


@pytest.mark.parametrize("family,spec", CASES)
def test_kernels_equal_the_float64_reference(tiny, tmp_path, family, spec):
    model = tiny(family)
    train = adaptc.compile(model, spec)
    randomize_adapters(train, 0.3)
    params = adapter_leaves(train)
    if "adapter" in spec:
        ref = bottleneck_reference(model, params, "gelu" if "gelu" in spec else "tanh",
                                   "parallel" if "parallel" in spec else "sequential", 1.0,
                                   family)
    elif "ia3" in spec:
        feedforward = {p.rsplit(".mov.", 1)[0] for p in params
                       if p.endswith("vectors") and ("c_proj" in p or "output.dense" in p)}
        ref = mov_reference(model, params, 1 if "k=1" in spec else 3, feedforward, {})
    else:
        ref = mixture_reference(model, params, 2 if "k=2" in spec else 3 + ("loramoe" in spec),
                                2.0, {})
    path = adaptc.save_adapters(train, tmp_path / "a.safetensors")
    infer = adaptc.compile(model, spec, "infer", adapters=path)
    counts = adaptc.report_of(infer).counts
    assert counts.get("kept_eager", 0) == 0
    x = inputs(batch=2, seq=5, segments=family == "bert")
    assert use_triton(torch.zeros(1))
    with torch.no_grad():
        assert rel_diff(main_output(infer(**x)), main_output(ref(**x))) <= OUT_TOL
