"""MAM adapter (He et al. 2022) and UniPELT (Mao et al. 2022) in the compiled graph against
float64 references written from the papers' formulas: the eager Hugging Face model in float64
with a registered attention function that prepends the (gated) prefix, forward hooks that add
the (gated, scaled) LoRA and adapter terms, and real-token positions P … P+S-1."""
from __future__ import annotations

import copy

import pytest
import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

import adaptc
from adaptc.methods.bottleneck import ACTIVATIONS
from adaptc.methods.prefix import PrefixEncoder
from helpers import inputs, main_output, randomize_adapters

REF = "adaptc_float64_reference"
AttentionMaskInterface.register(REF, sdpa_mask)
TOL = 2e-5


def as64(*tensors):
    return [t.detach().double() for t in tensors]


def gate_ref(gate, x):
    """G(x) = mean_t σ(w·x_t + b), one value per example: [B, 1, 1]."""
    w, b = as64(gate.weight, gate.bias)
    return torch.sigmoid(x @ w.T + b).mean(1, keepdim=True)


def prefixes_ref(encoder):
    """[L, 2, P, H_kv, d]: the free tensor, or Li & Liang's MLP(E) = W₂·tanh(W₁·E + b₁) + b₂."""
    if not encoder.config.projection:
        return as64(encoder.prefix)[0]
    e, w1, b1, w2, b2 = as64(encoder.embedding, encoder.hidden_weight, encoder.hidden_bias,
                             encoder.out_weight, encoder.out_bias)
    layers, _, tokens, heads, dim = encoder.shape
    flat = torch.tanh(e @ w1.T + b1) @ w2.T + b2
    return flat.view(tokens, layers, 2, heads, dim).permute(1, 2, 0, 3, 4)


def attention_ref(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **_):
    """softmax(Q·[G·P_K ; K]ᵀ·scale + mask') · [G·P_V ; V], mask' = [open (P) ; mask]."""
    prefix, gate = module.adaptc_prefix, module.adaptc_gate
    batch, heads, seq, dim = query.shape
    pk, pv = (part.transpose(0, 1).unsqueeze(0).expand(batch, -1, -1, -1) for part in prefix)
    if gate is not None:
        g = gate_ref(gate, module.adaptc_hidden).view(batch, 1, 1, 1)
        pk, pv = pk * g, pv * g
    k, v = torch.cat([pk, key], 2), torch.cat([pv, value], 2)
    k, v = (t.repeat_interleave(heads // t.shape[1], dim=1) for t in (k, v))
    scores = query @ k.transpose(-1, -2) * (scaling or dim ** -0.5)
    allowed = torch.ones(batch, 1, seq, k.shape[2], dtype=torch.bool)
    if attention_mask is not None:
        allowed[..., prefix.shape[1]:] = attention_mask.bool() if attention_mask.dtype == torch.bool \
            else attention_mask == 0
    probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
    return (probs @ v).transpose(1, 2), probs


AttentionInterface.register(REF, attention_ref)


def lora_hook(lora):
    a, b = as64(lora.A, lora.B)

    def run(module, args, out):
        x = args[0]
        update = lora.scale * (x @ a.T @ b.T)
        return out + (update if lora.gate is None else gate_ref(lora.gate, x) * update)
    return run


def adapter_hook(adapter):
    d, bd, u, bu = as64(adapter.down, adapter.down_bias, adapter.up, adapter.up_bias)
    config = adapter.config

    def run(module, args, out):
        x = out if config.placement == "sequential" else args[0]
        term = config.scale * (ACTIVATIONS[config.activation](x @ d.T + bd) @ u.T + bu)
        return out + (term if adapter.gate is None else gate_ref(adapter.gate, x) * term)
    return run


def stash_hidden(module, args, kwargs):
    module.adaptc_hidden = args[0] if args else kwargs["hidden_states"]


def reference(model, gm, attn_paths: list[str], encoder):
    """The float64 eager model with every adapter of `gm` attached by hooks."""
    ref = copy.deepcopy(model.module).double()
    ref.set_attn_implementation(REF)
    prefixes = prefixes_ref(encoder)
    for layer, path in enumerate(attn_paths):
        attention = ref.get_submodule(path)
        attention.adaptc_prefix = prefixes[layer]
        attention.adaptc_gate = gm.get_submodule(f"{path}.prefix").gate
        attention.register_forward_pre_hook(stash_hidden, with_kwargs=True)
    for path, module in adaptc.adapters.adapter_modules(gm).items():
        site, kind = path.rsplit(".", 1)
        if kind == "lora":
            ref.get_submodule(site).register_forward_hook(lora_hook(module))
        elif kind == "adapter":
            ref.get_submodule(site).register_forward_hook(adapter_hook(module))
    return ref


def check(model, gm, attn_paths, tokens):
    randomize_adapters(gm, 0.2)
    (encoder,) = [m for m in gm.modules() if isinstance(m, PrefixEncoder)]
    ref = reference(model, gm, attn_paths, encoder)
    for x in (inputs(), inputs(batch=1, seq=5, seed=3)):
        seq = x["input_ids"].shape[1]
        positions = torch.arange(tokens, tokens + seq).unsqueeze(0)
        want = main_output(ref(**x, position_ids=positions))
        got = main_output(gm(**x)).double()
        real = x["attention_mask"].bool()
        diff = (got - want)[real].abs().max().item()
        assert diff <= TOL * want.abs().max().item() + TOL, diff
    base = main_output(model.module(**inputs()))
    assert (main_output(gm(**inputs())) - base).abs().max() > 1e-2  # every part acts


ATTN = {"llama": "model.layers.{}.self_attn", "bert": "encoder.layer.{}.attention.self"}


@pytest.mark.parametrize("projection", [0, 16])
def test_mam_adapter_equals_float64_reference(tiny, projection):
    """MAM: prefix tuning at the attention + a scaled parallel adapter at the FFN."""
    model = tiny("llama")
    gm = adaptc.compile(model, f"attn: prefix tokens=4 projection={projection}\n"
                               "ffn: adapter placement=parallel bottleneck=16 scale=4")
    counts = adaptc.report_of(gm).counts
    assert (counts["prefix_inserted"], counts["adapter_inserted"]) == (2, 2)
    check(model, gm, [ATTN["llama"].format(i) for i in range(2)], 4)


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_unipelt_equals_float64_reference(tiny, family):
    """UniPELT: gated LoRA on q, v + gated prefix + gated sequential adapter after the FFN."""
    model = tiny(family)
    gm = adaptc.compile(model, "attn.q,attn.v: lora r=4 alpha=8 gate\n"
                               "attn: prefix tokens=3 gate\n"
                               "ffn: adapter bottleneck=8 gate").eval()
    counts = adaptc.report_of(gm).counts
    assert (counts["lora_inserted"], counts["prefix_inserted"], counts["adapter_inserted"]) == \
        (4, 2, 2)
    check(model, gm, [ATTN[family].format(i) for i in range(2)], 3)


def test_unipelt_gates_are_trainable_and_bounded(tiny):
    gm = adaptc.compile(tiny("llama"), "attn.q: lora r=2 gate; attn: prefix tokens=2 gate; "
                                       "ffn: adapter bottleneck=4 gate")
    names = [n for n in adaptc.adapter_state_dict(gm) if ".gate." in n]
    assert len(names) == 3 * 2 * 2  # three methods, two layers, weight and bias
    gate = gm.get_submodule("model.layers.0.self_attn.prefix").gate
    value = gate(torch.randn(3, 5, 128) * 100)
    assert value.shape == (3, 1, 1) and ((value > 0) & (value < 1)).all()


def test_gated_lora_on_gpt2_conv1d_equals_float64_reference(tiny):
    """GPT-2's Conv1D reads its input flattened to [B·S, F]; the gate averages the [B, S, F]
    tensor it was flattened from, as on a linear that reads it whole."""
    model = tiny("gpt2")
    gm = adaptc.compile(model, "c_attn,c_fc: lora r=2 gate\nffn: adapter bottleneck=4 gate")
    gm.eval()
    assert adaptc.report_of(gm).counts["lora_inserted"] == 4
    randomize_adapters(gm, 0.2)
    ref = copy.deepcopy(model.module).double()
    for path, module in adaptc.adapters.adapter_modules(gm).items():
        site, kind = path.rsplit(".", 1)
        hook = lora_hook(module) if kind == "lora" else adapter_hook(module)
        ref.get_submodule(site).register_forward_hook(hook)
    for x in (inputs(), inputs(batch=1, seq=5, seed=3)):
        want = main_output(ref(**x))
        got = main_output(gm(**x)).double()
        real = x["attention_mask"].bool()
        diff = (got - want)[real].abs().max().item()
        assert diff <= TOL * want.abs().max().item() + TOL, diff
    ungated = main_output(adaptc.compile(model, "c_attn,c_fc: lora r=2").eval()(**inputs()))
    assert (main_output(gm(**inputs())) - ungated).abs().max() > 1e-2
