"""Audit of bottleneck adapters, BitFit, mixtures (MoLoRA, MoV, MoLA, LoRAMoE) and QLoRA
against independent float64 references written from the papers' equations.

Each reference is the Hugging Face model in float64 with forward hooks that add the
method's math, reading the adapter tensors by name from `adapter_state_dict` (never calling
adaptc's modules). Checked: the train graph's output, the infer graph's (from a saved
adapter file), trainable counts against a hand count, one backward's gradients, and the
save/load round trip. The train graphs run in eval(), as the references do: in train() the
base model's dropout (GPT-2, BERT) is on."""
from __future__ import annotations

import copy

import pytest
import torch
from torch.nn import functional as F

import adaptc
from helpers import (adapter_leaves, assert_grads_close, by_site, inputs, main_output, probe,
                     randomize_adapters, rel_diff)

OUT_TOL = 2e-5   # float32 graph vs float64 reference, relative to the output's size
GRAD_TOL = 1e-4  # float32 gradients vs float64, relative to the largest gradient
ACT = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu, "tanh": torch.tanh}


def x_for(family):
    return inputs(segments=family == "bert")


def compare_grads(gm, x, ref, params):
    probe(main_output(gm(**x))).backward()
    probe(main_output(ref(**x))).backward()
    assert_grads_close(gm, params, GRAD_TOL)


def saved_and_reloaded(model, spec, gm, x, tmp_path):
    """Save gm's adapters, load them into a fresh compile: identical outputs. The file."""
    path = adaptc.save_adapters(gm, tmp_path / "a.safetensors")
    again = adaptc.compile(model, spec).eval()
    adaptc.load_adapters(again, path)
    with torch.no_grad():
        assert torch.equal(main_output(again(**x)), main_output(gm(**x)))
    return path


def assert_infer_matches(model, spec, path, x, want):
    """The infer graph compiled from the saved file against the float64 reference output."""
    with torch.no_grad():
        infer = adaptc.compile(model, spec, "infer", adapters=path)
        assert rel_diff(main_output(infer(**x)), want.detach()) <= OUT_TOL


# ---------------------------------------------------------------- bottleneck adapters
HOULSBY = {"llama": ("model.layers.{i}.self_attn.o_proj", "model.layers.{i}.mlp"),
           "gpt2": ("transformer.h.{i}.attn.c_proj", "transformer.h.{i}.mlp"),
           "bert": ("encoder.layer.{i}.attention.output.dense", "encoder.layer.{i}.output.dense")}


FFN_FIRST = {"bert": ("output.dense", "intermediate.dense")}  # `ffn` is the output linear


def bottleneck_reference(model, params, activation, placement, scale, family=None):
    """h + s·G(x)·(U·act(D·x + b_D) + b_U), x = h (sequential) or the input of the FFN or
    module (parallel), G(x) = mean_t σ(w·x_t + b) when the adapter has a gate."""
    ref = copy.deepcopy(model.module).double()
    stash = {}
    for site, t in by_site(params, "adapter").items():
        last, first = FFN_FIRST.get(family, (None, None))
        if placement == "parallel" and last and site.endswith(last) and "attention" not in site:
            ref.get_submodule(site[:-len(last)] + first).register_forward_pre_hook(
                lambda mod, args, site=site: stash.__setitem__(site, args[0]))

        def hook(mod, args, out, t=t, site=site):
            x = out if placement == "sequential" else stash.get(site, args[0])
            hidden = ACT[activation](x @ t["down"].T + t["down_bias"])
            y = scale * (hidden @ t["up"].T + t["up_bias"])
            if "gate.weight" in t:
                y = y * torch.sigmoid(x @ t["gate.weight"].T + t["gate.bias"]).mean(1, keepdim=True)
            return out + y
        ref.get_submodule(site).register_forward_hook(hook)
    return ref


def hand_count(model, sites, bottleneck, gate, placement):
    total = 0
    for site in sites:
        layer = model.module.get_submodule(site)
        d_out = model.module.config.hidden_size
        d_in = d_out  # sequential: the output; parallel: the FFN's or attention's input
        if placement == "parallel" and site.endswith(("o_proj", "c_proj")):
            d_in = layer.weight.shape[1 if site.endswith("o_proj") else 0]
        total += bottleneck * d_in + bottleneck + d_out * bottleneck + d_out
        total += (d_in + 1) if gate else 0
    return total


@pytest.mark.parametrize("family", ["llama", "gpt2", "bert"])
@pytest.mark.parametrize("which,activation,placement,scale,gate", [
    ("houlsby", "gelu", "sequential", 1.0, False),
    ("pfeiffer", "relu", "sequential", 2.5, False),
    ("houlsby", "silu", "parallel", 4.0, False),
    ("pfeiffer", "tanh", "sequential", 0.5, True),
])
def test_bottleneck_against_float64_reference(tiny, tmp_path, family, which, activation,
                                              placement, scale, gate):
    model = tiny(family)
    targets = "attn.o, ffn" if which == "houlsby" else "ffn"
    spec = (f"{targets}: adapter bottleneck=6 activation={activation} placement={placement} "
            f"scale={scale}" + (" gate" if gate else ""))
    gm = adaptc.compile(model, spec).eval()
    x = x_for(family)
    # initial model equals the base (U and b_U start at zero)
    base = main_output(model.module(**x))
    assert (main_output(gm(**x)) - base).abs().max().item() == 0
    patterns = HOULSBY[family] if which == "houlsby" else HOULSBY[family][1:]
    sites = [p.format(i=i) for i in range(2) for p in patterns]
    report = adaptc.report_of(gm)
    assert sorted(r["path"] for r in report.sites) == sorted(sites)
    assert report.trainable == hand_count(model, sites, 6, gate, placement)
    randomize_adapters(gm, 0.2)
    params = adapter_leaves(gm)
    ref = bottleneck_reference(model, params, activation, placement, scale, family)
    want = main_output(ref(**x))
    assert rel_diff(main_output(gm(**x)), want) <= OUT_TOL
    assert (want - base.double()).abs().max().item() > 1e-3
    compare_grads(gm, x, ref, params)
    # save / load round trip, then the infer graph from the file
    path = saved_and_reloaded(model, spec, gm, x, tmp_path)
    assert_infer_matches(model, spec, path, x, want)


# ---------------------------------------------------------------- BitFit
def test_bitfit_on_gpt2_against_float64_reference(tiny, tmp_path):
    model = tiny("gpt2")
    gm = adaptc.compile(model, "*.bias: train").eval()
    names = [n for n, _ in model.module.named_parameters() if n.endswith(".bias")]
    assert adaptc.report_of(gm).trainable == sum(
        model.module.get_parameter(n).numel() for n in names)
    randomize_adapters(gm, 0.3)
    params = adapter_leaves(gm)
    ref = copy.deepcopy(model.module).double()
    for name, t in params.items():  # <owner>.trained.bias -> the owner's bias
        owner = name.rsplit(".trained.", 1)[0]
        module = ref.get_submodule(owner)
        del module.bias
        module.bias = t
    x = inputs()
    want = main_output(ref(**x))
    assert rel_diff(main_output(gm(**x)), want) <= OUT_TOL
    compare_grads(gm, x, ref, params)
    path = adaptc.save_adapters(gm, tmp_path / "a.safetensors")
    infer = adaptc.compile(model, "*.bias: train", "infer", adapters=path)
    with torch.no_grad():
        assert rel_diff(main_output(infer(**x)), want.detach()) <= OUT_TOL


# ---------------------------------------------------------------- mixtures
MIX_TARGETS = {"llama": "q_proj, down_proj", "gpt2": "attn.c_attn, mlp.c_proj",
               "bert": "query, output.dense"}


def route(x, router, top_k):
    """Softmax over the k largest logits, zero elsewhere (= softmax, keep top-k, renormalise);
    and the full softmax."""
    logits = x @ router.T
    probs = logits.softmax(-1)
    top = logits.topk(top_k, dim=-1)
    gates = torch.zeros_like(logits).scatter(-1, top.indices, top.values.softmax(-1))
    renorm = probs.gather(-1, top.indices)
    renorm = renorm / renorm.sum(-1, keepdim=True)
    assert torch.allclose(gates.gather(-1, top.indices), renorm)
    return gates, probs


def mixture_reference(model, params, top_k, scale, seen):
    ref = copy.deepcopy(model.module).double()
    for site, t in by_site(params, "moe").items():
        layer = ref.get_submodule(site)

        def hook(mod, args, out, t=t, site=site, layer=layer):
            x = args[0]
            gates, probs = route(x, t["router"], top_k)
            seen[site] = (gates, probs)
            low = torch.einsum("...i,eri->...er", x, t["A"])
            y = torch.einsum("...er,eor,...e->...o", low, t["B"], gates) * scale
            return out + y
        layer.register_forward_hook(hook)
    return ref


def switch_loss(seen, balance):
    total = 0.0
    for gates, probs in seen.values():
        e = gates.shape[-1]
        routed = (gates > 0).reshape(-1, e).double()
        f = routed.sum(0) / routed.sum()
        total = total + e * (f * probs.reshape(-1, e).mean(0)).sum()
    return balance * total


@pytest.mark.parametrize("family", ["llama", "gpt2", "bert"])
@pytest.mark.parametrize("router,k,experts", [("topk", 1, 3), ("topk", 2, 4), ("soft", 2, 3)])
def test_molora_against_float64_reference(tiny, tmp_path, family, router, k, experts):
    model = tiny(family)
    spec = (f"{MIX_TARGETS[family]}: lora r=3 alpha=6\n"
            f"mixture moe k={k} experts={experts} router={router} balance=0.3")
    gm = adaptc.compile(model, spec).eval()
    x = x_for(family)
    base = main_output(model.module(**x))
    assert (main_output(gm(**x)) - base).abs().max().item() == 0  # B starts at zero
    count = 0
    for row in adaptc.report_of(gm).sites:
        layer = model.module.get_submodule(row["path"])
        w = layer.weight  # Linear [out, in]; GPT-2's Conv1D [in, out]
        d_out, d_in = (w.shape[1], w.shape[0]) if family == "gpt2" else tuple(w.shape)
        count += experts * (3 * d_in + d_out * 3) + experts * d_in
    assert adaptc.report_of(gm).trainable == count
    randomize_adapters(gm, 0.2)
    params = adapter_leaves(gm)
    seen = {}
    ref = mixture_reference(model, params, k if router == "topk" else experts, 2.0, seen)
    want = main_output(ref(**x))
    got = main_output(gm(**x))
    assert rel_diff(got, want) <= OUT_TOL
    ours_loss = adaptc.balance_loss(gm)
    ref_loss = switch_loss(seen, 0.3)
    assert ours_loss.item() == pytest.approx(ref_loss.item(), rel=1e-5)
    # gradients of output and balance loss together
    (probe(got) + ours_loss).backward()
    (probe(want) + ref_loss).backward()
    assert_grads_close(gm, params, GRAD_TOL)
    path = saved_and_reloaded(model, spec, gm, x, tmp_path)
    assert_infer_matches(model, spec, path, x, want)


def test_mola_expert_counts_on_an_eight_layer_model(tmp_path):
    """experts=[2, 4, 6, 8] on 8 layers: two layers per entry, lowest layers fewest."""
    from adaptc.frontend.models import build_preset
    model = build_preset("llama", layers=8)
    gm = adaptc.compile(model, "q_proj: lora r=2\nmixture moe k=2 experts=[2, 4, 6, 8]").eval()
    shapes = {k: v.shape for k, v in adaptc.adapter_state_dict(gm).items()}
    for i in range(8):
        want = [2, 4, 6, 8][i // 2]
        assert shapes[f"model.layers.{i}.self_attn.q_proj.moe.A"][0] == want
        assert shapes[f"model.layers.{i}.self_attn.q_proj.moe.router"][0] == want


# ---------------------------------------------------------------- QLoRA on GPT-2 (Conv1D)
def test_qlora_on_gpt2_against_float64_dequantised_reference(tiny, tmp_path):
    from test_quantize import reference_roundtrip
    model = tiny("gpt2")
    spec = "attn.c_attn, mlp.c_fc: quantize block=32\nattn.c_attn, mlp.c_fc: lora r=4 alpha=8"
    gm = adaptc.compile(model, spec).eval()
    randomize_adapters(gm, 0.05)
    params = adapter_leaves(gm)
    ref = copy.deepcopy(model.module).double()
    for site, t in by_site(params, "lora").items():
        layer = ref.get_submodule(site)
        # blocks run along the stored Conv1D weight [in, out] (bitsandbytes, through
        # transformers, quantises its transpose [out, in]: a design difference, not an error)
        deq = reference_roundtrip(model.module.get_submodule(site).weight, 32, True, 256).T

        def run(mod, args, out, t=t, deq=deq, bias=layer.bias):
            x = args[0]
            return x @ deq.T + bias + 2.0 * (x @ t["A"].T) @ t["B"].T
        layer.register_forward_hook(run)
    x = inputs()
    want = main_output(ref(**x))
    assert rel_diff(main_output(gm(**x)), want) <= OUT_TOL
    compare_grads(gm, x, ref, params)
    path = adaptc.save_adapters(gm, tmp_path / "a.safetensors")
    with torch.no_grad():
        for merge in (True, False):
            infer = adaptc.compile(model, spec, "infer", adapters=path, merge=merge)
            assert rel_diff(main_output(infer(**x)), want.detach()) <= OUT_TOL


# ---------------------------------------------------------------- MoV and LoRAMoE
MOV_TARGETS = {"llama": ("k_proj, v_proj", "down_proj"), "gpt2": ("attn.c_attn", "mlp.c_proj"),
               "bert": ("key, value", "output.dense")}


def mov_reference(model, params, top_k, feedforward_sites, seen):
    """l(x) = Σ_e g_e(x)·l_e; y ⊙ l(x), or W₀(l(x) ⊙ x) + b with `feedforward`."""
    ref = copy.deepcopy(model.module).double()
    for site, t in by_site(params, "mov").items():
        layer = ref.get_submodule(site)
        if site in feedforward_sites:
            def pre(mod, args, t=t, site=site):
                gates, probs = route(args[0], t["router"], top_k)
                seen[site] = (gates, probs)
                return (args[0] * (gates @ t["vectors"]),)
            layer.register_forward_pre_hook(pre)
        else:
            def post(mod, args, out, t=t, site=site):
                gates, probs = route(args[0], t["router"], top_k)
                seen[site] = (gates, probs)
                return out * (gates @ t["vectors"])
            layer.register_forward_hook(post)
    return ref


@pytest.mark.parametrize("family", ["llama", "gpt2", "bert"])
@pytest.mark.parametrize("router,k", [("topk", 2), ("soft", 2)])
def test_mov_against_float64_reference(tiny, tmp_path, family, router, k):
    model = tiny(family)
    out_sites, ff_sites = MOV_TARGETS[family]
    spec = (f"{out_sites}: ia3\n{ff_sites}: ia3 feedforward\n"
            f"mixture moe k={k} experts=3 router={router} balance=0.2")
    gm = adaptc.compile(model, spec).eval()
    x = x_for(family)
    # vectors start at 1: the base model, up to the rounding of Σ_e g_e = 1
    assert (main_output(gm(**x)) - main_output(model.module(**x))).abs().max().item() <= 1e-6
    feedforward = set()
    count = 0
    for row in adaptc.report_of(gm).sites:
        w = model.module.get_submodule(row["path"]).weight
        d_out, d_in = (w.shape[1], w.shape[0]) if family == "gpt2" else tuple(w.shape)
        ff = "ffn" in row.get("options", {}).get("feedforward", "") or row["path"].endswith(
            ("down_proj", "mlp.c_proj", "output.dense"))
        if ff:
            feedforward.add(row["path"])
        count += 3 * (d_in if ff else d_out) + 3 * d_in
    assert adaptc.report_of(gm).trainable == count
    randomize_adapters(gm, 0.5)
    params = adapter_leaves(gm)
    seen = {}
    ref = mov_reference(model, params, k if router == "topk" else 3, feedforward, seen)
    want = main_output(ref(**x))
    got = main_output(gm(**x))
    assert rel_diff(got, want) <= OUT_TOL
    ours_loss, ref_loss = adaptc.balance_loss(gm), switch_loss(seen, 0.2)
    assert ours_loss.item() == pytest.approx(ref_loss.item(), rel=1e-5)
    (probe(got) + ours_loss).backward()
    (probe(want) + ref_loss).backward()
    assert_grads_close(gm, params, GRAD_TOL)
    path = saved_and_reloaded(model, spec, gm, x, tmp_path)
    assert_infer_matches(model, spec, path, x, want)


def loramoe_loss(seen, types, knowledge, experts, delta, balance):
    total = 0.0
    for gates, _ in seen.values():
        q = gates.sum(1)  # [B, E]
        own = torch.tensor([[(e < knowledge) == (t == 1) for e in range(experts)] for t in types])
        z = (q * torch.where(own, 1 + delta, 1 - delta)).flatten()
        total = total + z.var() / z.mean() ** 2
    return balance * total


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_loramoe_gradients_round_trip_and_infer(tiny, tmp_path, family):
    model = tiny(family)
    spec = (f"{MIX_TARGETS[family]}: lora r=2 alpha=4 rslora\n"
            "mixture loramoe experts=4 delta=0.2 balance=0.3")
    gm = adaptc.compile(model, spec).eval()
    randomize_adapters(gm, 0.2)
    params = adapter_leaves(gm)
    seen = {}
    ref = mixture_reference(model, params, 4, 4 / 2 ** 0.5, seen)  # rslora: alpha/sqrt(r)
    x = x_for(family)
    want, got = main_output(ref(**x)), main_output(gm(**x))
    assert rel_diff(got, want) <= OUT_TOL
    types = torch.tensor([0, 1, 1])
    ours_loss = adaptc.balance_loss(gm, sample_types=types)
    ref_loss = loramoe_loss(seen, types, 2, 4, 0.2, 0.3)  # knowledge=0: half of 4
    assert ours_loss.item() == pytest.approx(ref_loss.item(), rel=1e-5)
    (probe(got) + ours_loss).backward()
    (probe(want) + ref_loss).backward()
    assert_grads_close(gm, params, GRAD_TOL)
    assert_infer_matches(model, spec, adaptc.save_adapters(gm, tmp_path / "a.safetensors"),
                         x, want)


@pytest.mark.parametrize("spec", [
    "q_proj, down_proj: lora r=3 alpha=6\nmixture moe k=2 experts=3",
    "k_proj: ia3\ndown_proj: ia3 feedforward\nmixture moe k=2 experts=3"])
def test_a_float64_model_routes_in_float64(tiny, tmp_path, spec):
    """README: updates are computed in float32, float64 for a float64 model. The router
    must not round a float64 model's logits (or the infer op its residual) to float32."""
    from adaptc.frontend.models import wrap
    model = tiny("llama")
    model = wrap(model.module.double(), source="llama")
    gm = adaptc.compile(model, spec).eval()
    randomize_adapters(gm, 0.5)
    params = adapter_leaves(gm)
    if "ia3" in spec:
        down = {f"model.layers.{i}.mlp.down_proj" for i in range(2)}
        ref = mov_reference(model, params, 2, down, {})
    else:
        ref = mixture_reference(model, params, 2, 2.0, {})
    x = inputs()
    with torch.no_grad():
        want = main_output(ref(**x))
        assert rel_diff(main_output(gm(**x)), want) <= 1e-12
        path = adaptc.save_adapters(gm, tmp_path / "a.safetensors")
        infer = adaptc.compile(model, spec, "infer", adapters=path)
        assert rel_diff(main_output(infer(**x)), want) <= 1e-12


def test_bitfit_on_a_model_without_biases_says_so(tiny):
    """Llama has no bias parameters: the error says that, not only the nearest names."""
    with pytest.raises(adaptc.SpecError) as err:
        adaptc.compile(tiny("llama"), "q_proj: lora r=2\n*.bias: train")
    first = err.value.first
    assert (first.code, first.line, first.column) == ("E301", 2, 1)
    assert "'*.bias' matches no parameter" in str(err.value)
    assert "this model has no bias parameters" in str(err.value)
    with pytest.raises(adaptc.SpecError) as err:  # GPT-2 has biases: no such note
        adaptc.compile(tiny("gpt2"), "*.bais: train")
    assert "no bias parameters" not in str(err.value)


@pytest.mark.parametrize("family,up", [("bert", "encoder.layer.{i}.intermediate.dense"),
                                       ("opt", "model.decoder.layers.{i}.fc1")])
def test_a_parallel_ffn_adapter_reads_the_ffn_input(tiny, family, up):
    """He et al.'s parallel adapter (MAM) reads the FFN's input x and adds to its output.
    Where `ffn` is the FFN's output linear (BERT's output.dense, OPT's fc2), the adapter
    must read the input of the FFN's first linear (width hidden), not the intermediate
    activations (width d_ff) that the output linear reads."""
    if family == "opt":
        from helpers import small_decoder
        from adaptc.frontend.models import wrap
        model = wrap(small_decoder("opt"), source="opt")
    else:
        model = tiny(family)
    gm = adaptc.compile(model, "ffn: adapter bottleneck=5 placement=parallel activation=relu").eval()
    hidden = model.module.config.hidden_size
    assert {row["in"] for row in adaptc.report_of(gm).sites} == {hidden}
    randomize_adapters(gm, 0.2)
    params = adapter_leaves(gm)
    ref = copy.deepcopy(model.module).double()
    stash = {}
    for site, t in by_site(params, "adapter").items():
        i = next(int(s) for s in site.split(".") if s.isdigit())
        ref.get_submodule(up.format(i=i)).register_forward_pre_hook(
            lambda mod, args, i=i: stash.__setitem__(i, args[0]))

        def hook(mod, args, out, t=t, i=i):
            return out + F.relu(stash[i] @ t["down"].T + t["down_bias"]) @ t["up"].T + t["up_bias"]
        ref.get_submodule(site).register_forward_hook(hook)
    x = x_for(family) if family == "bert" else inputs(vocab=128)
    want = main_output(ref(**x))
    assert rel_diff(main_output(gm(**x)), want) <= OUT_TOL
    compare_grads(gm, x, ref, params)


def test_a_parallel_ffn_adapter_decodes_bart_through_the_cache(tmp_path, monkeypatch):
    """The decoder graphs of cached decoding find the FFN's input too (BART's fc1)."""
    import test_decode_seq2seq as seq2seq
    spec = "ffn: adapter bottleneck=8 placement=parallel"
    monkeypatch.setitem(seq2seq.SPECS, "parallel ffn", (spec, spec))
    seq2seq.test_cached_decoding_equals_the_train_graph(tmp_path, "bart", "parallel ffn")


def test_an_empty_experts_list_is_a_check_problem_not_a_crash():
    """The spec's E203 stops `experts=[]` first; built from the API, check() said min()
    of an empty sequence."""
    from adaptc.methods.mixture import MixtureConfig
    assert MixtureConfig(experts=[]).check() == [("experts", "experts list must not be empty")]


@pytest.mark.parametrize("saved,loaded,change", [
    ("ffn: adapter bottleneck=4", "ffn: adapter bottleneck=4 placement=parallel",
     "model.layers.0.mlp: adapter/sequential in the file, adapter/parallel here"),
    ("q_proj: lora r=2\nmixture moe k=1 experts=3", "q_proj: lora r=2\nmixture loramoe experts=3",
     "model.layers.0.self_attn.q_proj: moe[3] in the file, loramoe[3] here"),
])
def test_adapters_saved_with_another_placement_or_mixture_kind_are_refused(
        tiny, tmp_path, saved, loaded, change):
    """Same tensor names and shapes, other outputs: a sequential adapter's tensors loaded
    as a parallel one's (Llama's mlp reads and writes the same width), top-1 experts as
    LoRAMoE's dense mixture. The file's options were keyed by the report's method label,
    so a different label skipped the check."""
    model = tiny("llama")
    path = adaptc.save_adapters(adaptc.compile(model, saved), tmp_path / "a.safetensors")
    other = adaptc.compile(model, loaded)
    before = {k: v.clone() for k, v in adaptc.adapter_state_dict(other).items()}
    with pytest.raises(adaptc.WeightsError, match="trained with other options") as err:
        adaptc.load_adapters(other, path)
    assert change in str(err.value)
    assert all(torch.equal(before[k], v) for k, v in adaptc.adapter_state_dict(other).items())


def test_loramoe_over_ia3_vectors_against_float64_reference(tiny):
    """LoRAMoE's dense routing and localized balancing over (IA)³ experts (MoV sites)."""
    model = tiny("llama")
    gm = adaptc.compile(model, "k_proj: ia3\ndown_proj: ia3 feedforward\n"
                               "mixture loramoe experts=4 knowledge=1 delta=0.3 balance=0.2")
    randomize_adapters(gm, 0.5)
    params = adapter_leaves(gm)
    seen = {}
    ref = mov_reference(model, params, 4, {f"model.layers.{i}.mlp.down_proj" for i in range(2)},
                        seen)
    x = inputs()
    assert rel_diff(main_output(gm(**x)), main_output(ref(**x))) <= OUT_TOL
    types = torch.tensor([1, 0, 1])
    assert adaptc.balance_loss(gm, sample_types=types).item() == pytest.approx(
        loramoe_loss(seen, types, 1, 4, 0.3, 0.2).item(), rel=1e-5)
