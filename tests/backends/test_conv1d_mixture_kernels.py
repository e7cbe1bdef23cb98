"""LoRAMoE on GPT-2's Conv1D and BERT's pooler, infer graphs on the Triton kernels
(interpreted on CPU, see conftest.py), against the float64 references of
tests/test_conv1d_mixtures.py."""
from __future__ import annotations

import pytest
import torch
from helpers import adapter_leaves, inputs, main_output, randomize_adapters, rel_diff
from test_conv1d_mixtures import OUT_TOL, loramoe_reference, pooled, vectors_reference

import adaptc
from adaptc.backends.triton import use_triton

CASES = [
    ("gpt2", "attn.c_attn, mlp.c_fc: lora r=2 alpha=6\nmixture loramoe experts=4", main_output),
    ("gpt2", "attn.c_attn: ia3\nmlp.c_proj: ia3 feedforward\nmixture loramoe experts=3",
     main_output),
    ("bert", "pooler.dense: lora r=2\nmixture loramoe experts=4", pooled),
]


@pytest.mark.parametrize("family,spec,output", CASES)
def test_loramoe_kernels_equal_the_float64_reference(tiny, tmp_path, family, spec, output):
    model = tiny(family)
    train = adaptc.compile(model, spec)
    randomize_adapters(train, 0.3)
    params = adapter_leaves(train)
    if "ia3" in spec:
        feedforward = {f"transformer.h.{i}.mlp.c_proj" for i in range(2)}
        ref = vectors_reference(model, params, feedforward, {})
    else:
        ref = loramoe_reference(model, params, 3.0 if "alpha=6" in spec else 4.0, {})
    path = adaptc.save_adapters(train, tmp_path / "a.safetensors")
    infer = adaptc.compile(model, spec, "infer", adapters=path)
    counts = adaptc.report_of(infer).counts
    assert counts["mixture_fused"] == (1 if family == "bert" else 4)
    assert counts.get("kept_eager", 0) == 0
    x = inputs(batch=2, seq=5, segments=family == "bert")
    assert use_triton(torch.zeros(1))  # the ops take their kernels, not the reference
    with torch.no_grad():
        got, want = output(infer(**x)), output(ref(**x))
        assert rel_diff(got, want) <= OUT_TOL
        assert rel_diff(got, output(model.module(**x)).double()) > 1e-3  # the experts act
