"""Prefix tuning and P-tuning v2 in the compiled graph equal PEFT's PrefixTuning (a PeftModel
with the same prefix values copied in) on the real tokens of left-padded inputs (float32)."""
from __future__ import annotations

import copy

import pytest
import torch
from peft import PrefixTuningConfig, TaskType, get_peft_model

import adaptc
from adaptc.errors import ModelError, SpecError
from helpers import inputs, main_output, small_decoder

TOL = 1e-5


def peft_prefix(model, tokens: int, projection: int = 0):
    encoder = model.config.model_type in ("bert", "roberta")
    task = TaskType.FEATURE_EXTRACTION if encoder else TaskType.CAUSAL_LM
    config = PrefixTuningConfig(task_type=task, num_virtual_tokens=tokens,
                                prefix_projection=projection > 0,
                                encoder_hidden_size=projection or None)
    return get_peft_model(copy.deepcopy(model), config).eval()


def copy_from_peft(encoder, peft_model) -> None:
    """PEFT keeps the prefixes as an Embedding [P, L·2·H_kv·d] (or an MLP producing that)."""
    theirs = peft_model.prompt_encoder["default"]
    with torch.no_grad():
        if encoder.config.projection:
            encoder.embedding.copy_(theirs.embedding.weight)
            encoder.hidden_weight.copy_(theirs.transform[0].weight)
            encoder.hidden_bias.copy_(theirs.transform[0].bias)
            encoder.out_weight.copy_(theirs.transform[2].weight)
            encoder.out_bias.copy_(theirs.transform[2].bias)
        else:
            layers, _, tokens, heads, dim = encoder.shape
            weight = theirs.embedding.weight.view(tokens, layers, 2, heads, dim)
            encoder.prefix.copy_(weight.permute(1, 2, 0, 3, 4))


def real_token_diff(gm, twin, x) -> float:
    real = x["attention_mask"].bool()
    return (main_output(gm(**x)) - main_output(twin(**x)))[real].abs().max().item()


@pytest.mark.parametrize("family,projection", [("llama", 0), ("llama", 24), ("bert", 0),
                                               ("bert", 24), ("gpt2", 0), ("mistral", 0)])
def test_prefix_equals_peft(tiny, family, projection):
    model = tiny(family)
    gm = adaptc.compile(model, f"attn: prefix tokens=3 projection={projection}").eval()
    twin = peft_prefix(model.module, 3, projection)
    copy_from_peft(gm.get_submodule("adaptc.prefix_0"), twin)
    report = adaptc.report_of(gm)
    assert report.counts["prefix_inserted"] == 2
    assert (report.trainable, report.total) == twin.get_nb_trainable_parameters()
    for x in (inputs(), inputs(batch=1, seq=5, seed=3)):
        assert real_token_diff(gm, twin, x) <= TOL
    x = inputs()
    assert (main_output(gm(**x)) - main_output(model.module(**x))).abs().max() > 1e-2


def test_prefix_on_roberta_equals_peft():
    """RoBERTa has no alias table or position table of its own: `attn` and the position
    shift come from BERT's names (its positions count from padding_idx + 1)."""
    from transformers import AutoConfig, AutoModel
    config = AutoConfig.for_model("roberta", hidden_size=64, intermediate_size=128,
                                  num_hidden_layers=2, num_attention_heads=4, vocab_size=128,
                                  max_position_embeddings=64)
    torch.manual_seed(0)
    model = AutoModel.from_config(config).eval()
    gm = adaptc.compile(model, "attn: prefix tokens=3").eval()
    twin = peft_prefix(model, 3)
    copy_from_peft(gm.get_submodule("adaptc.prefix_0"), twin)
    ids = torch.randint(2, 128, (2, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    ids[0, 5:], mask[0, 5:] = config.pad_token_id, 0  # right-padded, as BERT-style inputs are
    x = {"input_ids": ids, "attention_mask": mask}
    assert real_token_diff(gm, twin, x) <= TOL
    assert (main_output(gm(**x)) - main_output(model(**x))).abs().max() > 1e-2


def test_prefix_on_sentence_pairs_equals_peft_prompt(tiny):
    """Segment ids reach the graph: BERT with prefixes equals the HF model run on PEFT's
    prefix cache with the same token_type_ids (PEFT's own BERT forwards drop them, and its
    SEQ_CLS prefix forward needs a past_key_values argument BertForSequenceClassification
    lacks)."""
    model = tiny("bert")
    gm = adaptc.compile(model, "attn: prefix tokens=3").eval()
    twin = peft_prefix(model.module, 3)
    copy_from_peft(gm.get_submodule("adaptc.prefix_0"), twin)
    x = inputs(segments=True)
    mask = torch.cat([torch.ones(3, 3, dtype=torch.long), x["attention_mask"]], dim=1)
    with torch.no_grad():
        ref = model.module(input_ids=x["input_ids"], token_type_ids=x["token_type_ids"],
                           attention_mask=mask, past_key_values=twin.get_prompt(3))
    real = x["attention_mask"].bool()
    ours = gm(**x).last_hidden_state
    assert (ours - ref.last_hidden_state)[real].abs().max().item() <= TOL
    single = {k: v for k, v in x.items() if k != "token_type_ids"}
    assert (ours - gm(**single).last_hidden_state).abs().max().item() > 1e-3


@pytest.mark.parametrize("model_type", ["gpt_neox", "opt", "phi3", "phi", "gptj", "falcon"])
def test_prefix_beyond_the_presets_equals_peft(model_type):
    """Rotary families (GPT-NeoX, Phi-3, Phi, GPT-J, Falcon) and OPT (learned positions,
    `decoder.embed_positions`), left-padded."""
    model = small_decoder(model_type)
    gm = adaptc.compile(model, "attn: prefix tokens=3").eval()
    twin = peft_prefix(model, 3)
    copy_from_peft(gm.get_submodule("adaptc.prefix_0"), twin)
    ids = torch.randint(1, 128, (2, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    x = {"input_ids": ids, "attention_mask": mask}
    assert real_token_diff(gm, twin, x) <= TOL
    assert (main_output(gm(**x)) - main_output(model(**x))).abs().max() > 1e-2


def test_ptuning2_is_prefix_without_reparameterisation(tiny):
    model = tiny("llama")
    gm = adaptc.compile(model, "attn: ptuning2 tokens=4 dropout=0.1")
    twin = peft_prefix(model.module, 4)
    copy_from_peft(gm.get_submodule("adaptc.ptuning2_0"), twin)
    gm.eval()  # dropout on the prefix is for training only
    assert real_token_diff(gm, twin, inputs()) <= TOL
    assert adaptc.report_of(gm).trainable == twin.get_nb_trainable_parameters()[0]
    gm.train()
    torch.manual_seed(0)
    assert real_token_diff(gm, twin, inputs()) > 1e-3


def test_prefix_on_some_layers_leaves_the_others(tiny):
    model = tiny("llama")
    gm = adaptc.compile(model, "attn[1]: prefix tokens=2")
    encoder = gm.get_submodule("adaptc.prefix_0")
    assert encoder.shape == (1, 2, 2, 2, 32)  # one layer, k/v, P, H_kv, d
    rows = {row["path"]: row for row in adaptc.report_of(gm).sites}
    assert set(rows) == {"adaptc.prefix_0", "model.layers.1.self_attn"}
    assert adaptc.report_of(gm).trainable == encoder.prefix.numel() == 2 * 2 * 2 * 32


def test_prefix_attention_without_mask_is_causal():
    """An op traced with is_causal=True and no mask gets the explicit causal mask."""
    from adaptc.methods.prefix import PrefixAttention
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 5, 8, generator=gen) for _ in range(3))
    prefix = torch.zeros(2, 3, 2, 8)  # zero keys and values: prefix adds weight, no content
    k2, v2, mask = PrefixAttention()(q, k, v, None, prefix, True)
    assert mask.shape == (5, 8) and mask[:, :3].all() and not mask[0, 4]
    out = torch.nn.functional.scaled_dot_product_attention(q, k2, v2, mask)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("spec,code", [
    ("q_proj: prefix", "E302"),
    ("attn: prefix tokens=4\nattn: ptuning2 tokens=4", "E209"),
    ("attn[0]: prefix tokens=4\nattn[1]: prefix tokens=8", "E209"),
])
def test_prefix_spec_errors(tiny, spec, code):
    with pytest.raises(SpecError) as err:
        adaptc.compile(tiny("llama"), spec)
    assert err.value.first.code == code


def test_prefix_needs_the_sdpa_attention_op(tiny):
    model = tiny("llama")
    model.module.set_attn_implementation("eager")
    with pytest.raises(ModelError, match="scaled_dot_product_attention"):
        adaptc.compile(model, "attn: prefix tokens=2")


def test_prefix_attention_float_mask_equals_bool_mask():
    from adaptc.methods.prefix import PrefixAttention
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 4, 5, 8, generator=gen) for _ in range(3))
    prefix = torch.randn(2, 3, 2, 8, generator=gen)
    allowed = torch.ones(5, 5, dtype=torch.bool).tril().expand(2, 1, 5, 5).clone()
    allowed[0, :, :, :2] = False  # left padding in row 0
    additive = torch.zeros(allowed.shape).masked_fill(~allowed, float("-inf"))
    outs = []
    for mask in (allowed, additive):
        k2, v2, m2 = PrefixAttention()(q, k, v, mask, prefix)
        assert m2.shape == (2, 1, 5, 8)
        outs.append(torch.nn.functional.scaled_dot_product_attention(q, k2, v2, m2))
    assert torch.allclose(*outs, atol=1e-6) and torch.isfinite(outs[0]).all()
