"""LoRAMoE where a layer does not read [batch, seq, features] itself, and UniPELT's gate on a
layer with no sequence dimension, against float64 references written from the equations.

GPT-2's Conv1D reads its input flattened (view(x, [-1, F]) then addmm); LoRAMoE's balancing
sums each example's router weights over its positions, so the mixture also reads the
[B, S, F] tensor the layer flattened. BERT's pooler reads [B, H], one row per example: its
gate is that row's σ(w·x + b), and LoRAMoE's per-example sum is over that one row.

Each reference is the Hugging Face model in float64 with hooks on the adapted modules (which
see the unflattened [B, S, F] input), reading the adapter tensors by name from
`adapter_state_dict`, never calling adaptc's modules. The compiled graphs run in eval(), as
the references do (in train() GPT-2's and BERT's own dropout is on)."""
from __future__ import annotations

import copy

import pytest
import torch

import adaptc
from helpers import (adapter_leaves, assert_grads_close, by_site, inputs, main_output, probe,
                     randomize_adapters, rel_diff)

OUT_TOL = 2e-5   # float32 graph vs float64 reference, relative to the output's size
LOSS_TOL = 1e-5  # relative, balancing loss
GRAD_TOL = 1e-4  # float32 gradients vs float64, relative to the largest reference gradient


def dense_routing(x, router):
    """LoRAMoE's router: softmax(W_g·x) over all experts, [..., E]."""
    return (x @ router.T).softmax(-1)


def loramoe_reference(model, params, scale, seen):
    """y = W₀x + b + s·Σ_e g_e(x)·B_e·A_e·x on every `moe` site, g = softmax(W_g·x);
    `seen[site]` gets g as the module saw x: [B, S, E] for a Conv1D, [B, E] for the pooler."""
    ref = copy.deepcopy(model.module).double()
    for site, t in by_site(params, "moe").items():
        def hook(mod, args, out, t=t, site=site):
            x = args[0]
            gates = seen[site] = dense_routing(x, t["router"])
            low = torch.einsum("...i,eri->...er", x, t["A"])
            return out + torch.einsum("...er,eor,...e->...o", low, t["B"], gates) * scale
        ref.get_submodule(site).register_forward_hook(hook)
    return ref


def vectors_reference(model, params, feedforward, seen):
    """(IA)³ experts: y ⊙ Σ_e g_e(x)·l_e, or W₀((Σ_e g_e(x)·l_e) ⊙ x) + b on `feedforward`
    sites; g = softmax(W_g·x)."""
    ref = copy.deepcopy(model.module).double()
    for site, t in by_site(params, "mov").items():
        layer = ref.get_submodule(site)
        if site in feedforward:
            def pre(mod, args, t=t, site=site):
                gates = seen[site] = dense_routing(args[0], t["router"])
                return (args[0] * (gates @ t["vectors"]),)
            layer.register_forward_pre_hook(pre)
        else:
            def post(mod, args, out, t=t, site=site):
                gates = seen[site] = dense_routing(args[0], t["router"])
                return out * (gates @ t["vectors"])
            layer.register_forward_hook(post)
    return ref


def localized_balance(seen, types, knowledge, experts, delta, balance):
    """balance × Σ_sites var(Z)/mean(Z)², Z = I ⊙ Q, Q[b, e] = Σ_t g[b, t, e] (a [B, E]
    routing is one position per example), I = 1 + δ where expert e's group (e < knowledge:
    world knowledge) is example b's type (1: world knowledge), else 1 − δ; unbiased var."""
    total = torch.zeros((), dtype=torch.float64)
    for gates in seen.values():
        q = gates if gates.dim() == 2 else gates.sum(1)
        own = torch.tensor([[(e < knowledge) == (t == 1) for e in range(experts)]
                            for t in types.tolist()])
        z = (q * torch.where(own, 1 + delta, 1 - delta)).flatten()
        total = total + z.var() / z.mean() ** 2
    return balance * total


def assert_infer_matches(model, spec, gm, tmp_path, x, want, output=main_output):
    """The infer graph compiled from gm's saved adapters against the float64 reference."""
    path = adaptc.save_adapters(gm, tmp_path / "a.safetensors")
    with torch.no_grad():
        infer = adaptc.compile(model, spec, "infer", adapters=path)
        assert rel_diff(output(infer(**x)), want.detach()) <= OUT_TOL
    return infer


GPT2_LORA = {  # spec targets → the Conv1D sites, two layers
    "attn.c_attn, mlp.c_fc": ["transformer.h.{i}.attn.c_attn", "transformer.h.{i}.mlp.c_fc"],
    "attn.c_proj, mlp.c_proj": ["transformer.h.{i}.attn.c_proj", "transformer.h.{i}.mlp.c_proj"],
}


@pytest.mark.parametrize("targets", list(GPT2_LORA))
def test_loramoe_on_gpt2_conv1d_against_float64_reference(tiny, tmp_path, targets):
    model = tiny("gpt2")
    spec = (f"{targets}: lora r=2 alpha=6\n"
            "mixture loramoe experts=4 knowledge=1 delta=0.2 balance=0.3")
    gm = adaptc.compile(model, spec).eval()
    sites = {row["path"]: row["method"] for row in adaptc.report_of(gm).sites}
    assert sites == {p.format(i=i): "loramoe[4]" for p in GPT2_LORA[targets] for i in range(2)}
    randomize_adapters(gm, 0.3)
    params = adapter_leaves(gm)
    seen = {}
    ref = loramoe_reference(model, params, 3.0, seen)  # alpha / r
    x = inputs(batch=3, seq=5)
    want, got = main_output(ref(**x)), main_output(gm(**x))
    assert rel_diff(got, want) <= OUT_TOL
    assert rel_diff(got, main_output(model.module(**x)).double()) > 1e-2  # the experts act
    types = torch.tensor([1, 0, 0])
    ours = adaptc.balance_loss(gm, sample_types=types)
    theirs = localized_balance(seen, types, 1, 4, 0.2, 0.3)
    assert ours.item() == pytest.approx(theirs.item(), rel=LOSS_TOL) and theirs.item() > 0
    (probe(got) + ours).backward()
    (probe(want) + theirs).backward()
    assert_grads_close(gm, params, GRAD_TOL)
    assert_infer_matches(model, spec, gm, tmp_path, x, want)


def test_loramoe_on_gpt2_conv1d_in_train_mode_against_float64_reference(tiny):
    """The same in train(), the graph's dropout following the mode: GPT-2 with its dropout
    probabilities at 0 (so train() is deterministic) against the reference."""
    model = tiny("gpt2")
    model.module.config.attn_pdrop = model.module.config.resid_pdrop = 0.0
    model.module.config.embd_pdrop = 0.0
    for module in model.module.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    spec = "attn.c_attn, mlp.c_fc: lora r=2 alpha=6\nmixture loramoe experts=4 balance=0.3"
    gm = adaptc.compile(model, spec).train()
    randomize_adapters(gm, 0.3)
    params = adapter_leaves(gm)
    seen = {}
    ref = loramoe_reference(model, params, 3.0, seen)
    x = inputs(batch=3, seq=5)
    want, got = main_output(ref(**x)), main_output(gm(**x))
    assert rel_diff(got, want) <= OUT_TOL
    types = torch.tensor([0, 1, 0])
    ours = adaptc.balance_loss(gm, sample_types=types)
    theirs = localized_balance(seen, types, 2, 4, 0.1, 0.3)  # knowledge=0: half of 4
    assert ours.item() == pytest.approx(theirs.item(), rel=LOSS_TOL) and theirs.item() > 0
    (probe(got) + ours).backward()
    (probe(want) + theirs).backward()
    assert_grads_close(gm, params, GRAD_TOL)


def test_loramoe_on_gpt2_conv1d_sums_each_examples_positions(tiny):
    """The recorded routing is [B, S, E] (the batch rows the balancing sums over), not the
    layer's flattened [B·S, E], for every batch shape the one dynamic graph runs."""
    model = tiny("gpt2")
    gm = adaptc.compile(model, "c_fc: lora r=2\nmixture loramoe experts=3").eval()
    for batch, seq in ((3, 5), (2, 7), (1, 4)):
        gm(**inputs(batch=batch, seq=seq))
        for moe in adaptc.adapters.adapter_modules(gm).values():
            gates, probs = moe.routing
            assert gates.shape == probs.shape == (batch, seq, 3)
        types = torch.arange(batch) % 2
        assert torch.isfinite(adaptc.balance_loss(gm, sample_types=types))
    with pytest.raises(ValueError, match="sample_types has 2 entries for a batch of 1 examples"):
        adaptc.balance_loss(gm, sample_types=torch.tensor([0, 1]))


def test_loramoe_over_ia3_on_gpt2_conv1d_against_float64_reference(tiny, tmp_path):
    """(IA)³ experts on Conv1D: c_attn's output scaled, mlp.c_proj's input (feedforward)."""
    model = tiny("gpt2")
    spec = ("attn.c_attn: ia3\nmlp.c_proj: ia3 feedforward\n"
            "mixture loramoe experts=3 delta=0.3 balance=0.2")
    gm = adaptc.compile(model, spec).eval()
    assert adaptc.report_of(gm).counts["mixture_inserted"] == 4
    randomize_adapters(gm, 0.5)
    params = adapter_leaves(gm)
    seen = {}
    feedforward = {f"transformer.h.{i}.mlp.c_proj" for i in range(2)}
    ref = vectors_reference(model, params, feedforward, seen)
    x = inputs(batch=3, seq=5)
    want, got = main_output(ref(**x)), main_output(gm(**x))
    assert rel_diff(got, want) <= OUT_TOL
    types = torch.tensor([0, 1, 1])
    ours = adaptc.balance_loss(gm, sample_types=types)
    theirs = localized_balance(seen, types, 1, 3, 0.3, 0.2)  # knowledge=0: half of 3, rounded down
    assert ours.item() == pytest.approx(theirs.item(), rel=LOSS_TOL) and theirs.item() > 0
    (probe(got) + ours).backward()
    (probe(want) + theirs).backward()
    assert_grads_close(gm, params, GRAD_TOL)
    assert_infer_matches(model, spec, gm, tmp_path, x, want)


def pooled(out) -> torch.Tensor:
    return out["pooler_output"]


def test_gated_lora_on_bert_pooler_against_float64_reference(tiny, tmp_path):
    """BERT's pooler reads [B, H] (the first token): the gate is each row's own
    σ(w·x + b), y = W₀x + b + σ(w·x + b)·s·B·A·x; no mean over a sequence."""
    model = tiny("bert")
    spec = "pooler.dense: lora r=2 alpha=4 gate"
    gm = adaptc.compile(model, spec).eval()
    assert adaptc.report_of(gm).counts["lora_inserted"] == 1
    randomize_adapters(gm, 0.3)
    params = adapter_leaves(gm)
    t = by_site(params, "lora")["pooler.dense"]
    ref = copy.deepcopy(model.module).double()
    gates = {}

    def hook(mod, args, out):
        x = args[0]
        assert x.dim() == 2  # [B, H]
        gate = gates["pooler"] = torch.sigmoid(x @ t["gate.weight"].T + t["gate.bias"])  # [B, 1]
        return out + gate * 2.0 * (x @ t["A"].T @ t["B"].T)
    ref.get_submodule("pooler.dense").register_forward_hook(hook)
    x = inputs(batch=3, seq=5, segments=True)
    want, got = pooled(ref(**x)), pooled(gm(**x))
    assert rel_diff(got, want) <= OUT_TOL
    assert gates["pooler"].shape == (3, 1)
    assert len(set(gates["pooler"].flatten().tolist())) == 3  # one gate per example
    probe(got).backward()
    probe(want).backward()
    assert_grads_close(gm, params, GRAD_TOL)
    infer = assert_infer_matches(model, spec, gm, tmp_path, x, want, pooled)
    assert adaptc.report_of(infer).counts["lora_merged"] == 0  # the gate reads the input


def test_loramoe_on_bert_pooler_against_float64_reference(tiny, tmp_path):
    """On [B, H] each example has one position: Q[b, e] is its row's router weights."""
    model = tiny("bert")
    spec = "pooler.dense: lora r=2\nmixture loramoe experts=4 delta=0.1 balance=0.5"
    gm = adaptc.compile(model, spec).eval()
    randomize_adapters(gm, 0.3)
    params = adapter_leaves(gm)
    seen = {}
    ref = loramoe_reference(model, params, 4.0, seen)  # alpha 8 / r 2
    x = inputs(batch=4, seq=5, segments=True)
    want, got = pooled(ref(**x)), pooled(gm(**x))
    assert rel_diff(got, want) <= OUT_TOL
    assert seen["pooler.dense"].shape == (4, 4)
    types = torch.tensor([1, 0, 1, 0])
    ours = adaptc.balance_loss(gm, sample_types=types)
    theirs = localized_balance(seen, types, 2, 4, 0.1, 0.5)
    assert ours.item() == pytest.approx(theirs.item(), rel=LOSS_TOL) and theirs.item() > 0
    (probe(got) + ours).backward()
    (probe(want) + theirs).backward()
    assert_grads_close(gm, params, GRAD_TOL)
    assert_infer_matches(model, spec, gm, tmp_path, x, want, pooled)


class SequenceFirst(torch.nn.Module):
    """A linear reading its tokens flattened from [seq, batch, features]: view's rows are
    not grouped by example, so neither a gate nor LoRAMoE's per-example sums can read them."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(4, 4)

    def forward(self, x):
        batch, seq, features = x.shape
        flat = x.transpose(0, 1).reshape(-1, features)
        return self.proj(flat).reshape(seq, batch, features)


@pytest.mark.parametrize("spec,column,end,message", [
    ("# rows\nproj: lora r=2 gate", 16, 20,
     "gated LoRA on proj (Linear 4→4): the traced input is 2-D, neither [batch, seq, "
     "features], [batch, features] nor flattened from [batch, seq, features], so it has no "
     "example rows for the gate"),
    ("proj: lora r=2\nmixture loramoe experts=2", 9, 16,
     "loramoe balances the router weights each example's tokens sum to, and 'proj' reads a "
     "2-D input that is neither [batch, seq, features], [batch, features] nor flattened from "
     "[batch, seq, features]: no example rows to sum"),
])
def test_tokens_flattened_from_seq_first_are_refused_with_the_reason(spec, column, end, message):
    with pytest.raises(adaptc.SpecError) as err:
        adaptc.compile(SequenceFirst(), spec, example_inputs={"x": torch.randn(3, 5, 4)})
    first = err.value.first
    assert (first.code, first.line, first.column, first.end_column) == ("E302", 2, column, end)
    assert message in str(err.value)
