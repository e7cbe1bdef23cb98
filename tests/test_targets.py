"""Target resolution: aliases per family, layer selection, overrides, located errors."""
from __future__ import annotations

import dataclasses
import re

import pytest
import torch
from torch import nn

import adaptc
from adaptc.errors import ModelError, SpecError
from adaptc.frontend.models import wrap
from helpers import randomize_adapters, small_decoder


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


@pytest.mark.parametrize("model_type,explicit", [
    ("qwen3", "self_attn.q_proj,self_attn.v_proj: lora r=2 alpha=4; mlp: adapter bottleneck=4"),
    ("gemma", "self_attn.q_proj,self_attn.v_proj: lora r=2 alpha=4; mlp: adapter bottleneck=4"),
    ("gpt_neox", "query_key_value: lora r=2 alpha=4; mlp: adapter bottleneck=4"),
    ("opt", "self_attn.q_proj,self_attn.v_proj: lora r=2 alpha=4; fc2: adapter bottleneck=4"),
    ("bloom", "query_key_value: lora r=2 alpha=4; mlp: adapter bottleneck=4"),
])
def test_families_beyond_the_presets_take_aliases(tmp_path, model_type, explicit):
    """Qwen3 and Gemma have Llama's module names; GPT-NeoX, BLOOM and OPT have tables of
    their own (fused qkv like GPT-2's; OPT's FFN output fc2 like BERT's). The portable spec resolves to
    the sites of the explicit one, and its infer graph (merged LoRA, fused adapter) equals
    the train graph."""
    portable = "attn.q,attn.v: lora r=2 alpha=4; ffn: adapter bottleneck=4"
    model = small_decoder(model_type)
    train = adaptc.compile(model, portable)
    assert sites(train) == sites(adaptc.compile(model, explicit))
    assert len(sites(train)) == (4 if model_type in ("gpt_neox", "bloom") else 6)
    randomize_adapters(train, 0.1)
    gen = torch.Generator().manual_seed(1)
    adaptc.save_adapters(train, tmp_path / "a.safetensors")
    infer = adaptc.compile(model, portable, "infer", adapters=tmp_path / "a.safetensors")
    ids = torch.randint(0, 128, (2, 9), generator=gen)
    x = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    got, want, base = infer(**x).logits, train.eval()(**x).logits, model(**x).logits
    assert (got - want).abs().max().item() <= 1e-5
    assert (want - base).abs().max().item() > 1e-3  # the adapters act


def unknown_family(model):
    """`model` as a family without an alias table: it takes the table whose names it has."""
    return dataclasses.replace(wrap(model), family="custom")


def test_alias_errors_say_what_the_alias_stands_for():
    with pytest.raises(SpecError) as info:  # named like Llama, with a fused qkv_proj (Phi-3)
        adaptc.compile(unknown_family(small_decoder("phi3")), "attn.q: lora r=2")
    assert info.value.first.notes[0] == "'attn.q' stands for self_attn.q_proj in this model"
    assert "'attn.k'" not in info.value.first.message  # suggests only aliases that match
    with pytest.raises(SpecError) as info:  # fits no table (MPT's names)
        adaptc.compile(unknown_family(small_decoder("mpt")), "ffn.up: adapter bottleneck=4")
    assert "'ffn.up' is a role alias, and this model has no alias table" in info.value.first.notes[0]
    assert "transformer.blocks.0.ffn.up_proj" in info.value.first.notes[1]


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


@pytest.mark.parametrize("spec,line,col,fragment", [
    ("q_proj: adapter bottleneck=100000000", 1, 28, "bottleneck=100000000 gives the adapter"),
    ("q_proj: vera r=1000000000", 1, 16, "r=1000000000 gives the vera of the shared"),
    ("q_proj: adalora init_r=100000000 total_step=10", 1, 24, "init_r=100000000 gives"),
    ("attn: prefix tokens=1000000000", 1, 21, "tokens=1000000000 gives the prefix"),
    ("attn: prefix tokens=4 projection=1000000000", 1, 34, "projection=1000000000 gives"),
    ("embed: prompt tokens=1000000000", 1, 22, "tokens=1000000000 gives the prompt"),
    ("embed: ptuning hidden=1000000000", 1, 23, "hidden=1000000000 gives the ptuning"),
    ("q_proj: lora r=2\nmixture moe k=1 experts=100000000", 2, 25, "experts=100000000"),
    ("q_proj: quantize block=100000000", 1, 24, "block=100000000 gives the quantize"),
])
def test_adapters_larger_than_the_model_are_refused_at_the_option(tiny, spec, line, col,
                                                                  fragment):
    """E308 before anything is allocated: they failed in the pass with the CPU allocator's
    "can't allocate memory" (or took all of it) and no position in the spec."""
    with pytest.raises(SpecError) as info:
        adaptc.compile(tiny("llama"), spec)
    diag = info.value.first
    assert (diag.code, diag.line, diag.column) == ("E308", line, col)
    assert fragment in diag.message and "an adapter may hold at most" in diag.message


@pytest.mark.parametrize("spec,line,col", [
    ("q_proj: adapter bottleneck=99999999999999999999999", 1, 28),  # beyond int64
    ("q_proj: adapter bottleneck=9223372036854775807", 1, 28),  # its bytes beyond int64
    ("q_proj: vera r=9223372036854775807", 1, 16),
    ("q_proj: adalora total_step=9 init_r=9223372036854775807", 1, 37),
    ("embed: ptuning hidden=99999999999999999999999", 1, 23),
    ("q_proj: lora r=2\nmixture moe k=1 experts=9223372036854775807", 2, 25),
    ("q_proj: quantize block=99999999999999999999998", 1, 24),
])
def test_adapters_beyond_what_torch_can_size_are_refused_at_the_option(tiny, spec, line, col):
    """Sizes whose tensors overflow torch's int64 sizes even on meta: E308 too (they were the
    pass's "Storage size calculation overflowed" or a page of C++ frames, with no position)."""
    with pytest.raises(SpecError) as info:
        adaptc.compile(tiny("llama"), spec)
    diag = info.value.first
    assert (diag.code, diag.line, diag.column) == ("E308", line, col)
    assert "a tensor of more than 2^63 bytes" in diag.message


def test_an_adapter_that_cannot_be_allocated_is_refused_at_the_option(tiny, monkeypatch):
    """Under the E308 bound but beyond the device's memory: the allocator's error, located."""
    import adaptc.passes.insert_bottleneck as insert
    real = insert.BottleneckAdapter

    def out_of_memory(config, d_in, d_out, device=None, dtype=None):
        if torch.device(device).type != "meta":
            raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: "
                               "can't allocate memory: you tried to allocate 1 bytes")
        return real(config, d_in, d_out, device=device, dtype=dtype)

    monkeypatch.setattr(insert, "BottleneckAdapter", out_of_memory)
    with pytest.raises(SpecError) as info:
        adaptc.compile(tiny("llama"), "q_proj: lora r=2\nq_proj: adapter bottleneck=8")
    diag = info.value.first
    assert (diag.code, diag.line, diag.column) == ("E308", 2, 28)
    assert diag.message.startswith("cannot allocate the adapter of 'model.layers.0.self_attn."
                                   "q_proj' (bottleneck=8, ")
    assert "DefaultCPUAllocator: can't allocate memory" in diag.message


def test_an_adapter_on_a_module_without_one_output_is_located(tiny):
    """The rotary embedding returns (cos, sin): no place for an adapter after it. It was a
    ModelError naming the module only, not the statement that put the adapter there."""
    with pytest.raises(SpecError) as info:
        adaptc.compile(tiny("llama"), "q_proj: lora r=2\nrotary_emb: adapter bottleneck=4")
    diag = info.value.first
    assert (diag.code, diag.line, diag.column, diag.end_column) == ("E302", 2, 1, 11)
    assert diag.message == ("adapter cannot adapt model.rotary_emb (LlamaRotaryEmbedding): it "
                            "has 2 outputs in the traced graph (need exactly one); target one "
                            "of its linear layers instead")


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


def test_untraceable_model_names_the_module(capfd):
    with pytest.raises(ModelError, match=r"module 'gate' \(Gate\)"):
        adaptc.compile(Branchy(), "proj: lora r=2", example_inputs={"x": torch.randn(2, 4)})
    printed = capfd.readouterr().err
    assert "def forward" not in printed  # torch.export's partial graph
    assert "Unable to find user code" not in printed
