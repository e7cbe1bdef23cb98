"""Bottleneck adapters and mixtures in the compiled graph against hand-written float64
references (eager Hugging Face model in float64 + forward hooks doing the paper's math)."""
from __future__ import annotations

import copy

import pytest
import torch

import adaptc
from adaptc.methods.bottleneck import ACTIVATIONS
from helpers import inputs, randomize_adapters

TOL = 2e-5  # float32 graph vs float64 reference, outputs of order 1


def bottleneck_ref(h, x, adapter, activation):
    """U·act(D·x + b_D) + b_U added to h, in float64."""
    d, bd, u, bu = (t.detach().double() for t in (adapter.down, adapter.down_bias, adapter.up,
                                                  adapter.up_bias))
    return h + ACTIVATIONS[activation](x @ d.T + bd) @ u.T + bu


def mixture_ref(x, moe):
    """Per token: router softmax, top-k renormalised, Σ_e g_e·s·B_e·A_e·x — a plain loop."""
    A, B, W = (t.detach().double() for t in (moe.A, moe.B, moe.router))
    flat = x.reshape(-1, x.shape[-1])
    out = torch.zeros(flat.shape[0], B.shape[1], dtype=torch.float64)
    for t, token in enumerate(flat):
        logits = W @ token
        chosen = logits.topk(moe.top_k).indices
        weights = logits[chosen].softmax(0)
        for w, e in zip(weights, chosen):
            out[t] += w * moe.scale * (B[e] @ (A[e] @ token))
    return out.reshape(*x.shape[:-1], B.shape[1])


def reference_model(model, gm, make_hook):
    ref = copy.deepcopy(model.module).double()
    for path, module in adaptc.adapters.adapter_modules(gm).items():
        site = path.rsplit(".", 1)[0]
        ref.get_submodule(site).register_forward_hook(make_hook(module))
    return ref


@pytest.mark.parametrize("placement,activation", [("sequential", "relu"), ("parallel", "gelu"),
                                                  ("sequential", "silu")])
def test_bottleneck_equals_float64_reference(tiny, placement, activation):
    model = tiny("llama")
    gm = adaptc.compile(model, f"ffn,attn.o: adapter bottleneck=16 activation={activation} "
                               f"placement={placement}")
    assert adaptc.report_of(gm).counts["adapter_inserted"] == 4
    randomize_adapters(gm, 0.2)

    def hook(adapter):
        def run(mod, args, out):
            source = out if placement == "sequential" else args[0]
            return bottleneck_ref(out, source, adapter, activation)
        return run

    ref = reference_model(model, gm, hook)
    x = inputs()
    diff = (gm(**x).logits.double() - ref(**x).logits).abs().max().item()
    assert diff <= TOL * ref(**x).logits.abs().max().item() + TOL


@pytest.mark.parametrize("router,k", [("topk", 1), ("topk", 2), ("soft", 2)])
def test_mixture_equals_float64_reference(tiny, router, k):
    model = tiny("llama")
    gm = adaptc.compile(model, f"q_proj,v_proj: lora r=4 alpha=8\n"
                               f"mixture moe k={k} experts=3 router={router}")
    assert adaptc.report_of(gm).counts["mixture_inserted"] == 4
    randomize_adapters(gm, 0.2)
    ref = reference_model(model, gm, lambda moe: (lambda mod, args, out: out + mixture_ref(args[0], moe)))
    x = inputs()
    diff = (gm(**x).logits.double() - ref(**x).logits).abs().max().item()
    assert diff <= 1e-4


def vectors_ref(values, x, mov):
    """Per token: router softmax, top-k renormalised, values ⊙ Σ_e g_e·l_e — a plain loop."""
    L, W = (t.detach().double() for t in (mov.vectors, mov.router))
    flat, scaled = x.reshape(-1, x.shape[-1]), values.reshape(-1, values.shape[-1]).clone()
    for t, token in enumerate(flat):
        logits = W @ token
        chosen = logits.topk(mov.top_k).indices
        scaled[t] = scaled[t] * (logits[chosen].softmax(0) @ L[chosen])
    return scaled.reshape(values.shape)


@pytest.mark.parametrize("router,k", [("topk", 1), ("soft", 3)])
def test_mov_equals_float64_reference(tiny, router, k):
    """MoV (Zadouri et al.): each (IA)³ site a routed mix of vectors, keys and values on the
    output, the FFN's down projection on its input; the router reads the layer's input."""
    model = tiny("llama")
    gm = adaptc.compile(model, "k_proj,v_proj: ia3\ndown_proj: ia3 feedforward\n"
                               f"mixture moe k={k} experts=3 router={router}")
    report = adaptc.report_of(gm)
    assert report.counts["mixture_inserted"] == 6 and report.counts["ia3_inserted"] == 0
    config = model.module.config
    kv = config.num_key_value_heads * config.hidden_size // config.num_attention_heads
    per_layer = 2 * 3 * (kv + config.hidden_size) + 3 * 2 * config.intermediate_size
    assert report.trainable == config.num_hidden_layers * per_layer
    randomize_adapters(gm, 0.2)
    ref = copy.deepcopy(model.module).double()
    for path, mov in adaptc.adapters.adapter_modules(gm).items():
        layer = ref.get_submodule(path.rsplit(".", 1)[0])
        if mov.ia3.feedforward:
            layer.register_forward_pre_hook(
                lambda mod, args, mov=mov: (vectors_ref(args[0], args[0], mov),))
        else:
            layer.register_forward_hook(
                lambda mod, args, out, mov=mov: vectors_ref(out, args[0], mov))
    x = inputs()
    diff = (gm(**x).logits.double() - ref(**x).logits).abs().max().item()
    assert diff <= 1e-4
    assert (gm(**x).logits - model.module(**x).logits).abs().max().item() > 1e-2


def test_loramoe_equals_float64_reference(tiny):
    """LoRAMoE: dense softmax routing over all LoRA experts (the forward), and the localized
    balancing constraint per site — Q [B, E] router weights summed over each example's
    positions, Z = I ⊙ Q with 1 + δ where the expert's group (the first `knowledge` experts:
    world knowledge) is the example's type, var(Z) / mean(Z)² — summed × balance."""
    model = tiny("llama")
    gm = adaptc.compile(model, "gate_proj,down_proj: lora r=4 alpha=8\n"
                               "mixture loramoe experts=5 knowledge=2 delta=0.3 balance=0.5")
    assert adaptc.report_of(gm).counts["mixture_inserted"] == 4
    randomize_adapters(gm, 0.2)
    seen = {}
    for path, moe in adaptc.adapters.adapter_modules(gm).items():
        assert moe.top_k == 5  # dense
        moe.register_forward_hook(lambda mod, args, out, path=path: seen.update({path: args[0]}))
    ref = reference_model(model, gm, lambda moe: (lambda mod, args, out: out + mixture_ref(args[0], moe)))
    x = inputs()
    assert (gm(**x).logits.double() - ref(**x).logits).abs().max().item() <= 1e-4
    types = torch.tensor([1, 0, 0])
    want = torch.zeros((), dtype=torch.float64)
    for path, moe in adaptc.adapters.adapter_modules(gm).items():
        gates = (seen[path].double() @ moe.router.detach().double().T).softmax(-1)  # [B, S, E]
        q = gates.sum(1)
        i = torch.tensor([[1.3 if (e < 2) == (t == 1) else 0.7 for e in range(5)] for t in types])
        z = (q * i).flatten()
        want += 0.5 * z.var() / z.mean() ** 2
    got = adaptc.balance_loss(gm, sample_types=types)
    assert got.item() == pytest.approx(want.item(), rel=1e-5) and got.item() > 0
    with pytest.raises(ValueError, match="needs the type of each example"):
        adaptc.balance_loss(gm)
    with pytest.raises(ValueError, match="sample_types has 2 entries for a batch of 3 examples"):
        adaptc.balance_loss(gm, sample_types=types[:2])
    with pytest.raises(ValueError, match=r"sample_types holds \[1.0, 0.5, 0.0\]: each example's "
                                         r"type is 1 \(world knowledge\) or 0 \(task\)"):
        adaptc.balance_loss(gm, sample_types=torch.tensor([1, 0.5, 0]))  # counted as task before


def test_mola_experts_grow_with_depth(tiny):
    model = tiny("llama")
    gm = adaptc.compile(model, "q_proj: lora r=2; mixture moe k=1 experts=[2, 6]")
    experts = {row["path"]: row["method"] for row in adaptc.report_of(gm).sites}
    assert experts == {"model.layers.0.self_attn.q_proj": "moe[2]",
                       "model.layers.1.self_attn.q_proj": "moe[6]"}


def test_mola_groups_follow_the_documented_mapping():
    """Layer i of L takes entry floor(i·G/L) (docs/LANGUAGE.md, `mixture moe`)."""
    from adaptc.methods.mixture import MixtureConfig
    mola = MixtureConfig(experts=[2, 4, 6, 8])
    assert [mola.experts_at(i, 32) for i in range(32)] == [2] * 8 + [4] * 8 + [6] * 8 + [8] * 8
    assert [mola.experts_at(i, 2) for i in range(2)] == [2, 6]
    assert [mola.experts_at(i, 6) for i in range(6)] == [2, 2, 4, 6, 6, 8]
    assert mola.experts_at(None, 6) == 8


@pytest.mark.parametrize("spec", ["q_proj,v_proj: lora r=4", "ffn: adapter bottleneck=8",
                                  "q_proj: lora r=4; mixture moe k=2 experts=3",
                                  "v_proj: ia3; down_proj: ia3 feedforward; mixture moe"])
def test_gradients_reach_only_adapters(tiny, spec):
    gm = adaptc.compile(tiny("llama"), spec)
    randomize_adapters(gm, 0.2)
    out = gm(**inputs()).logits
    (out.square().mean() + adaptc.balance_loss(gm)).backward()
    adapters = set(adaptc.adapter_state_dict(gm))
    for name, param in gm.named_parameters():
        if name in adapters:
            assert param.grad is not None and param.grad.abs().sum() > 0, name
        else:
            assert param.grad is None and not param.requires_grad, name


def test_mixture_balance_loss_is_minimal_for_uniform_routing(tiny):
    gm = adaptc.compile(tiny("llama"), "q_proj: lora r=2; mixture moe router=soft experts=4")
    with torch.no_grad():
        for module in adaptc.adapters.adapter_modules(gm).values():
            module.router.zero_()
    gm(**inputs())
    # uniform soft routing: E·Σ (1/E)(1/E) = 1 per site, weighted by balance=0.01, 2 sites
    assert adaptc.balance_loss(gm).item() == pytest.approx(0.02, abs=1e-6)
