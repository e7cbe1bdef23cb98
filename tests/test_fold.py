"""Folding prompt encoders and prefix MLPs into constants keeps the outputs; saving and
loading still work on the folded module."""
from __future__ import annotations

import pytest
import torch

import adaptc
from adaptc.methods.prefix import PrefixEncoder
from adaptc.methods.prompt import PromptEmbedding
from helpers import inputs, main_output


@pytest.mark.parametrize("family,spec,folded", [
    ("llama", "attn: prefix tokens=4 projection=16", 1),
    ("bert", "attn: prefix tokens=4 projection=16", 1),
    ("llama", "embed: ptuning tokens=4 encoder=mlp hidden=16", 1),
    ("llama", "embed: ptuning tokens=4 encoder=lstm hidden=16", 1),
    ("llama", "attn: ptuning2 tokens=4; embed: prompt tokens=3", 0),  # already constants
])
def test_fold_keeps_outputs(tiny, family, spec, folded, tmp_path):
    gm = adaptc.compile(tiny(family), spec).eval()
    x = inputs()
    before = main_output(gm(**x))
    assert adaptc.fold_prompts(gm) == folded
    assert torch.allclose(main_output(gm(**x)), before, atol=1e-6, rtol=0)
    for module in adaptc.adapters.adapter_modules(gm).values():
        assert isinstance(module, (PrefixEncoder, PromptEmbedding)) or not hasattr(module, "fold")
    encoders = [m for m in gm.modules() if isinstance(m, PrefixEncoder)]
    assert all(m.config.projection == 0 and list(m.adapter_parameters()) == ["prefix"]
               for m in encoders)
    adaptc.save_adapters(gm, tmp_path / "a.safetensors")
    adaptc.load_adapters(gm, tmp_path / "a.safetensors")
    assert torch.allclose(main_output(gm(**x)), before, atol=1e-6, rtol=0)


def test_folded_prefix_is_frozen_and_smaller(tiny):
    gm = adaptc.compile(tiny("llama"), "attn: prefix tokens=4 projection=64")
    trained = sum(p.numel() for p in gm.parameters() if p.requires_grad)
    adaptc.fold_prompts(gm)
    encoder = gm.get_submodule("adaptc.prefix_0")
    assert encoder.prefix.shape == (2, 2, 4, 2, 32) and not encoder.prefix.requires_grad
    assert encoder.prefix.is_contiguous()  # a permuted view made torch.export.save warn
    assert sum(p.numel() for p in gm.parameters() if p.requires_grad) == 0 < trained
