"""Unmerged infer mode (`merge=False`): LoRA stays beside the user's base weights as linear
ops, sibling updates reading one input share one GEMM for their concatenated A matrices,
and the result equals the train-mode graph."""
from __future__ import annotations

import json
from collections import Counter

import pytest
import torch
from helpers import FAMILIES, inputs, main_output
from test_infer import max_diff, trained

import adaptc
from adaptc.cli import main
from adaptc.decode import compile_decoder
from adaptc.errors import AdaptcError
from adaptc.frontend.models import build_preset
from adaptc.frontend.trace import trace
from adaptc.methods.lora import LoraAdapter
from adaptc.passes.accumulate_updates import add_product_
from adaptc.passes.bind_ops import aten_op
from adaptc.passes.graph import aten

TOL = 1e-5
ATTENTION_AND_FFN = {"llama": "attn.*,ffn.*", "mistral": "attn.*,ffn.*", "gpt2": "attn.*,ffn.*",
                     "bert": "attn.*,ffn.*"}
# per layer: the sibling groups (q, k, v; gate, up) and the sites left on their own
GROUPS_PER_LAYER = {"llama": (2, 2), "mistral": (2, 2), "gpt2": (0, 4), "bert": (1, 3)}


def unmerged(model, spec: str, path):
    return adaptc.compile(model, spec, "infer", adapters=path, merge=False)


def linear_count(gm) -> int:
    """GEMMs in the graph: linear and addmm ops, and B GEMMs that add in place (add_product_)."""
    return sum(n.op == "call_function" and (n.target is add_product_ or aten_op(n) in (
        aten.linear.default, aten.addmm.default)) for n in gm.graph.nodes)


def tensor_bytes(gm) -> int:
    return sum(t.numel() * t.element_size() for t in [*gm.parameters(), *gm.buffers()])


def lora_spec(family: str) -> str:
    return f"{ATTENTION_AND_FFN[family]}: lora r=4 alpha=12"


@pytest.fixture(scope="module")
def attention_and_ffn(tmp_path_factory):
    """family → (model, train graph, unmerged infer graph, adapter file) of `lora_spec`,
    compiled once per module for the tests that read them (none modifies them)."""
    compiled = {}

    def get(family: str):
        if family not in compiled:
            model = build_preset(family, layers=2)
            path = tmp_path_factory.mktemp(family) / "a.safetensors"
            spec = lora_spec(family)
            compiled[family] = model, trained(model, spec, path), unmerged(model, spec, path), path
        return compiled[family]
    return get


@pytest.mark.parametrize("family", FAMILIES)
def test_unmerged_equals_train_with_one_a_gemm_per_sibling_group(tiny, family,
                                                                 attention_and_ffn):
    model, train, infer, _ = attention_and_ffn(family)
    x = inputs()
    assert max_diff(infer(**x), train(**x)) <= TOL
    assert max_diff(infer(**x), model.module(**x)) > 1e-3
    counts = adaptc.report_of(infer).counts
    groups, alone = GROUPS_PER_LAYER[family]
    assert counts["lora_lowered"] == counts["lora_inserted"]
    assert counts["lora_sibling_groups"] == 2 * groups  # two layers
    sites = counts["lora_inserted"]
    base = linear_count(trace(tiny(family)))
    assert linear_count(infer) == base + sites + 2 * (groups + alone)  # one B per site, one A per group
    assert not any(isinstance(m, LoraAdapter) for m in infer.modules())
    assert not any("lora_merged" in k for k in counts)


def test_base_weights_stay_the_users_tensors(tiny):
    """(The adapters' initial weights: what they hold does not change where the base is.)"""
    model = tiny("llama")
    spec = "q_proj,k_proj,v_proj: lora r=4\nv_proj: lora r=2"  # v's rank differs
    infer = adaptc.compile(model, spec, "infer", merge=False)
    for name, param in model.module.named_parameters():
        assert infer.get_parameter(name).data_ptr() == param.data_ptr(), name
    stacked = infer.get_parameter("model.layers.0.self_attn.lora_A")
    assert stacked.shape == (4 + 4 + 2, model.module.config.hidden_size)
    assert infer.get_parameter("model.layers.1.self_attn.v_proj.lora_B").shape[1] == 2


def test_qlora_unmerged_keeps_the_4bit_base(tiny, tmp_path):
    """Merging QLoRA makes dense copies of the dequantised weights; unmerged keeps NF4."""
    model = tiny("llama")
    spec = "*_proj: quantize\n*_proj: lora r=4"
    train = trained(model, spec, tmp_path / "a.safetensors")
    merged = adaptc.compile(model, spec, "infer", adapters=tmp_path / "a.safetensors")
    infer = unmerged(model, spec, tmp_path / "a.safetensors")
    x = inputs()
    assert max_diff(infer(**x), train(**x)) <= TOL
    assert max_diff(merged(**x), train(**x)) <= TOL
    projections = sum(p.numel() * 4 for n, p in model.module.named_parameters() if "_proj" in n)
    saved = tensor_bytes(merged) - tensor_bytes(infer)
    assert saved >= 0.8 * projections  # float32 projections vs 4.127 bits each
    print(f"QLoRA infer tensors: merged {tensor_bytes(merged):,} B, unmerged {tensor_bytes(infer):,} B")


@pytest.mark.parametrize("spec", ["q_proj,v_proj: lora r=4 init=pissa alpha=8",
                                  "q_proj,v_proj: lora r=4 freeze_a rslora alpha=8",
                                  "attn.q,attn.v: lora r=4 gate\nattn.k: lora r=4",
                                  "q_proj: lora r=4 dora\nk_proj,v_proj: ia3\nup_proj: vera r=8"])
def test_unmerged_variants_equal_train(tiny, tmp_path, spec):
    """PiSSA keeps its residual as the layer's weight; gated LoRA, DoRA, IA3 and VeRA stay
    eager modules (only ungated LoRA lowers)."""
    model = tiny("llama")
    train = trained(model, spec, tmp_path / "a.safetensors")
    infer = unmerged(model, spec, tmp_path / "a.safetensors")
    x = inputs()
    assert max_diff(infer(**x), train(**x)) <= TOL
    counts = adaptc.report_of(infer).counts
    gated = Counter(type(m).__name__ for m in infer.modules())["LoraAdapter"]
    assert counts["lora_lowered"] + gated == counts.get("lora_inserted", 0)


def test_unmerged_program_round_trip_and_no_hf(tmp_path, attention_and_ffn):
    model, train, infer, _ = attention_and_ffn("llama")
    adaptc.write_infer_artifact(infer, model, tmp_path / "dist", reference=train)
    report = json.loads((tmp_path / "dist" / "report.json").read_text())
    assert report["verification"]["max_abs_error"] <= TOL
    assert report["hf"] is None and report["hf_skipped"].startswith("lora not folded")
    program = adaptc.load_program(tmp_path / "dist" / "program.pt2").module()
    x = inputs(batch=2, seq=11)
    assert torch.equal(main_output(program(**x)), main_output(infer(**x)))


def test_unmerged_decoder_gives_the_merged_tokens(attention_and_ffn):
    model, _, _, weights = attention_and_ffn("llama")
    spec = lora_spec("llama")
    prompt = [5, 17, 42]
    merged = compile_decoder(model, spec, adapters=weights, max_cache_len=16)
    kept = compile_decoder(model, spec, adapters=weights, max_cache_len=16, merge=False)
    assert adaptc.report_of(kept.graph).counts["lora_sibling_groups"] == 4  # q, k, v; gate, up
    assert kept.generate(prompt, 6) == merged.generate(prompt, 6)
    assert (kept.logits(prompt, 0) - merged.logits(prompt, 0)).abs().max().item() <= 1e-4


def test_merge_false_is_for_infer_mode(tiny, capsys):
    with pytest.raises(AdaptcError, match="merge=False and fuse_projections=True are for"):
        adaptc.compile(tiny("llama"), "q_proj: lora", merge=False)
    assert main(["compile", "specs/lora_qv.adapt", "--no-merge"]) == 1
    assert "--no-merge and --fuse-projections are for --mode infer" in capsys.readouterr().err
    assert main(["compile", "specs/lora_qv.adapt", "--mode", "infer", "--no-merge"]) == 0
    out = capsys.readouterr().out
    assert "unmerged LoRA as linear ops: 8 (4 sibling groups with one A GEMM)" in out
    assert "merge_weights" not in out and "fuse_siblings" in out
