"""Infer-mode graphs with the fused ops running their Triton kernels (interpreted on CPU, see
conftest.py) equal the train-mode graph (eval) of the same weights."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import inputs, main_output, randomize_adapters

import adaptc
from adaptc.backends.triton import use_triton

SPECS = Path(__file__).resolve().parents[2] / "specs"


@pytest.mark.parametrize("family,spec", [("llama", "card.adapt"), ("bert", "mola.adapt"),
                                         ("llama", "mov.adapt"), ("gpt2", "houlsby.adapt"),
                                         ("llama", "mam.adapt"), ("llama", "unipelt.adapt"),
                                         ("gpt2", "unipelt.adapt")])
def test_infer_graph_on_kernels_equals_train(tiny, tmp_path, family, spec):
    model = tiny(family)
    train = adaptc.compile(model, SPECS / spec).eval()
    randomize_adapters(train, 0.1)
    adaptc.save_adapters(train, tmp_path / "a.safetensors")
    infer = adaptc.compile(model, SPECS / spec, "infer", adapters=tmp_path / "a.safetensors")
    x = inputs(batch=2, seq=5)
    assert use_triton(torch.zeros(1))  # the ops take their kernels, not the reference
    with torch.no_grad():
        ours, expected = main_output(infer(**x)), main_output(train(**x))
    assert (ours - expected).abs().max().item() <= 1e-5
    assert (expected - main_output(model.module(**x))).abs().max().item() > 1e-3
    counts = adaptc.report_of(infer).counts
    assert counts.get("kept_eager", 0) == 0  # MAM's scaled, UniPELT's gated adapters too
    folded = counts["stream_adds_folded"]
    # 2 layers' down, o (card); MAM's parallel adapter reads a stream the FFN's down already added
    assert folded == {"card.adapt": 2, "houlsby.adapt": 4, "unipelt.adapt": 2}.get(spec, 0)
