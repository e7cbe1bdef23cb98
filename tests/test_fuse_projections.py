"""`fuse_projections=True`: linear layers that read the same input run as one GEMM over
concatenated weights (merged or not), equal to the train-mode graph, exportable, and the
hf/ checkpoint gets the rows back under the layers' own names."""
from __future__ import annotations

import pytest
import torch
from helpers import FAMILIES, inputs, main_output
from test_fuse_siblings import linear_count
from test_infer import max_diff, trained

import adaptc
from adaptc.decode import compile_decoder

TOL = 1e-5
SPEC = "attn.*,ffn.*: lora r=4 alpha=12"
# per layer: (linear layers fused, groups). Merged: q, k, v and gate, up (BERT: query, key,
# value; GPT-2's c_attn is one addmm already). Unmerged, each lowered LoRA A GEMM joins the
# layers reading its input: q, k, v, A | gate, up, A | o, A | down, A (BERT: its bias-free A
# with the biased layers, zeros in the fused bias).
GROUPS = {True: {"llama": (5, 2), "mistral": (5, 2), "gpt2": (0, 0), "bert": (3, 1)},
          False: {"llama": (11, 4), "mistral": (11, 4), "gpt2": (0, 0), "bert": (10, 4)}}
# per layer, unmerged: (LoRA B GEMMs stacked, stacks): q, k, v | gate, up (BERT: q, k, v);
# the single-site groups (o, down) keep their own B GEMM
STACKED = {"llama": (5, 2), "mistral": (5, 2), "gpt2": (0, 0), "bert": (3, 1)}


@pytest.mark.parametrize("merge", [True, False], ids=["merged", "unmerged"])
@pytest.mark.parametrize("family", FAMILIES)
def test_fused_projections_equal_train(tiny, tmp_path, family, merge):
    model = tiny(family)
    train = trained(model, SPEC, tmp_path / "a.safetensors")
    infer = adaptc.compile(model, SPEC, "infer", adapters=tmp_path / "a.safetensors",
                           merge=merge, fuse_projections=True)
    x = inputs()
    assert max_diff(infer(**x), train(**x)) <= TOL
    counts = adaptc.report_of(infer).counts
    fused, groups = (2 * n for n in GROUPS[merge][family])  # two layers
    assert (counts["projections_concatenated"], counts["projection_groups"]) == (fused, groups)
    unfused = adaptc.compile(model, SPEC, "infer", adapters=tmp_path / "a.safetensors",
                             merge=merge)
    stacked, stacks = (0, 0) if merge else (2 * n for n in STACKED[family])
    assert counts["lora_stacked"] == stacked
    assert linear_count(infer) == linear_count(unfused) - fused + groups - stacked + stacks


@pytest.mark.parametrize("family,spec", [("llama", "q_proj,v_proj,up_proj: lora r=4"),
                                         ("qwen2", "*.bias: train\nq_proj: lora r=4")])
def test_hf_export_splits_the_fused_rows(tiny, tmp_path, family, spec):
    """Merged weights and trained biases (Qwen2's q, k, v have biases) concatenated into one
    GEMM go back to the checkpoint under their own names."""
    from transformers import AutoModelForCausalLM

    model = tiny(family)
    train = trained(model, spec, tmp_path / "a.safetensors")
    infer = adaptc.compile(model, spec, "infer", adapters=tmp_path / "a.safetensors",
                           fuse_projections=True)
    adaptc.write_infer_artifact(infer, model, tmp_path / "dist", reference=train)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "dist" / "hf", local_files_only=True)
    x = inputs(seq=9)
    expected = main_output(infer(**x))
    assert (main_output(hf.eval()(**x)) - expected).abs().max().item() <= 1e-6
    program = adaptc.load_program(tmp_path / "dist" / "program.pt2").module()
    assert torch.equal(main_output(program(**x)), expected)


def test_fused_decoder_gives_the_same_tokens(tiny, tmp_path):
    model = tiny("llama")
    spec = "q_proj,k_proj,v_proj: lora r=4"
    weights = tmp_path / "a.safetensors"
    trained(model, spec, weights)
    plain = compile_decoder(model, spec, adapters=weights, max_cache_len=16)
    fused = compile_decoder(model, spec, adapters=weights, max_cache_len=16,
                            fuse_projections=True)
    assert adaptc.report_of(fused.graph).counts["projection_groups"] == 4
    assert fused.generate([5, 17, 42], 6) == plain.generate([5, 17, 42], 6)


def test_stacked_cross_attention_updates_are_hoisted(tmp_path):
    """T5's cross-attention k and v of every layer read the encoder states: one GEMM for
    their weights and LoRA A, one for their stacked B, both hoisted out of the step graph;
    the tokens are those of the unfused decoder."""
    from test_decode_seq2seq import SOURCE
    from test_seq2seq import varied_t5

    from adaptc.decode_seq2seq import compile_seq2seq_decoder
    model = varied_t5()
    spec = "attn.k,attn.v: lora r=2"
    trained(model, spec, tmp_path / "a.safetensors")
    plain, fused = (compile_seq2seq_decoder(model, spec, adapters=tmp_path / "a.safetensors",
                                            merge=False, fuse_projections=fuse)
                    for fuse in (False, True))
    layers = model.module.config.num_decoder_layers
    assert adaptc.report_of(fused.decoder).counts["lora_stacked"] >= 2 * layers
    assert linear_count(fused.cross) == 2  # [W_k; W_v; …; A] and the stacked B
    assert linear_count(plain.cross) == 4 * layers + 1
    for source in (SOURCE, SOURCE[:3]):
        assert fused.generate(source, 6) == plain.generate(source, 6)
