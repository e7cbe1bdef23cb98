"""LoRA options against PEFT with identical weights: init=pissa (PEFT's
init_lora_weights="pissa"), init=gaussian, freeze_a (LoRA-FA), and the LoRA+ parameter groups."""
from __future__ import annotations

import copy

import pytest
import torch
from peft import (LNTuningConfig, LoraConfig, PrefixTuningConfig, PromptEncoderConfig,
                  VeraConfig, get_peft_model)
from peft.optimizers import create_loraplus_optimizer

import adaptc
from helpers import inputs, main_output

TOL = 1e-5
TARGETS = {"llama": ["q_proj", "v_proj"], "gpt2": ["c_attn", "c_fc"],
           "bert": ["query", "value", "intermediate.dense"]}


def peft_twin(model, targets, **options):
    config = LoraConfig(target_modules=targets, lora_dropout=0.0,
                        fan_in_fan_out=model.config.model_type == "gpt2", **options)
    return get_peft_model(copy.deepcopy(model), config).eval()


def layer_of(twin, adapter_path: str):
    return twin.base_model.model.get_submodule(adapter_path.rsplit(".", 1)[0])


@pytest.mark.parametrize("family", ["llama", "gpt2", "bert"])
def test_pissa_matches_peft(tiny, family):
    model = tiny(family)
    before = {k: v.clone() for k, v in model.module.state_dict().items()}
    gm = adaptc.compile(model, f"{','.join(TARGETS[family])}: lora r=4 alpha=8 init=pissa").eval()
    twin = peft_twin(model.module, TARGETS[family], r=4, lora_alpha=8, init_lora_weights="pissa")
    x = inputs()
    base = main_output(model.module(**x))
    # at init the adapted model is the base model, and the user's tensors are untouched
    assert (main_output(gm(**x)) - base).abs().max().item() <= TOL
    assert all(torch.equal(before[k], v) for k, v in model.module.state_dict().items())
    for path, ours in adaptc.adapters.adapter_modules(gm).items():
        layer = layer_of(twin, path)
        # singular vectors are unique up to a joint sign flip of (B column i, A row i)
        sign = torch.sign((layer.lora_A["default"].weight * ours.A).sum(1))
        assert torch.allclose(sign[:, None] * ours.A, layer.lora_A["default"].weight, atol=1e-6)
        assert torch.allclose(ours.B * sign, layer.lora_B["default"].weight, atol=1e-6)
        residual = ours.residual.t() if family == "gpt2" else ours.residual
        peft_weight = layer.base_layer.weight
        assert torch.allclose(residual, peft_weight.t() if family == "gpt2" else peft_weight,
                              atol=1e-6)
    report = adaptc.report_of(gm)
    assert report.counts["pissa_residuals"] == len(report.sites)
    assert (report.trainable, report.total) == twin.get_nb_trainable_parameters()


def test_pissa_trained_weights_match_peft(tiny):
    """After the same change to A and B, our output equals PEFT's (same residual)."""
    model = tiny("llama")
    gm = adaptc.compile(model, "q_proj,v_proj: lora r=4 alpha=8 init=pissa")
    twin = peft_twin(model.module, ["q_proj", "v_proj"], r=4, lora_alpha=8,
                     init_lora_weights="pissa")
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for path, ours in adaptc.adapters.adapter_modules(gm).items():
            layer = layer_of(twin, path)
            for name, theirs in (("A", layer.lora_A), ("B", layer.lora_B)):
                tensor = getattr(ours, name)
                tensor.add_(torch.randn(tensor.shape, generator=gen) * 0.05)
                theirs["default"].weight.copy_(tensor)
    x = inputs()
    assert (main_output(gm(**x)) - main_output(twin(**x))).abs().max().item() <= TOL


def test_pissa_on_meta_shapes_compiles():
    from adaptc.frontend.models import build_preset
    gm = adaptc.compile(build_preset("llama-7b"), "q_proj: lora r=8 init=pissa")
    assert adaptc.report_of(gm).trainable == 32 * 8 * (4096 + 4096)


def test_gaussian_init(tiny):
    model = tiny("llama")
    gm = adaptc.compile(model, "q_proj,v_proj: lora r=4 init=gaussian")
    A = torch.cat([m.A.flatten() for m in adaptc.adapters.adapter_modules(gm).values()])
    assert abs(A.std().item() - 1 / 4) < 0.02 and abs(A.mean().item()) < 0.02
    x = inputs()
    assert torch.equal(main_output(gm(**x)), main_output(model.module(**x)))


def test_freeze_a_counts_and_gradients_like_lorafa(tiny):
    model = tiny("llama")
    gm = adaptc.compile(model, "q_proj,v_proj: lora r=4 alpha=8 freeze_a")
    twin = peft_twin(model.module, ["q_proj", "v_proj"], r=4, lora_alpha=8)
    for name, param in twin.named_parameters():  # what PEFT's create_lorafa_optimizer does
        if "lora_A" in name:
            param.requires_grad_(False)
    report = adaptc.report_of(gm)
    assert (report.trainable, report.total) == twin.get_nb_trainable_parameters()
    adapters = adaptc.adapters.adapter_modules(gm).values()
    with torch.no_grad():
        for adapter in adapters:
            adapter.B.normal_()
    main_output(gm(**inputs())).square().mean().backward()
    for adapter in adapters:
        assert not adapter.A.requires_grad and adapter.A.grad is None
        assert adapter.B.grad is not None and adapter.B.grad.abs().sum() > 0


def test_freeze_a_saves_and_restores_a(tiny, tmp_path):
    model = tiny("llama")
    spec = "q_proj: lora r=4 freeze_a"
    gm = adaptc.compile(model, spec)
    adaptc.save_adapters(gm, tmp_path / "a.safetensors")
    again = adaptc.compile(model, spec)  # a new random A
    adaptc.load_adapters(again, tmp_path / "a.safetensors")
    for (_, ours), (_, theirs) in zip(adaptc.adapters.adapter_modules(gm).items(),
                                      adaptc.adapters.adapter_modules(again).items()):
        assert torch.equal(ours.A, theirs.A)


def test_loraplus_groups_match_peft(tiny):
    model = tiny("llama")
    gm = adaptc.compile(model, "q_proj,v_proj: lora r=4")
    slow, fast = adaptc.loraplus_param_groups(gm, lr=1e-3, ratio=16)
    assert slow["lr"] == 1e-3 and fast["lr"] == pytest.approx(16e-3)
    adapters = adaptc.adapters.adapter_modules(gm).values()
    assert {id(p) for p in fast["params"]} == {id(a.B) for a in adapters}
    assert {id(p) for p in slow["params"]} == {id(a.A) for a in adapters}
    twin = peft_twin(model.module, ["q_proj", "v_proj"], r=4)
    theirs = create_loraplus_optimizer(twin, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=16)
    sizes = sorted((g["lr"], sum(p.numel() for p in g["params"])) for g in theirs.param_groups
                   if g["params"])
    ours = sorted((g["lr"], sum(p.numel() for p in g["params"])) for g in (slow, fast))
    assert [n for _, n in ours] == [n for _, n in sizes]
    assert [lr for lr, _ in ours] == pytest.approx([lr for lr, _ in sizes])
    torch.optim.AdamW(adaptc.loraplus_param_groups(gm, lr=1e-3))  # usable as is


@pytest.mark.parametrize("spec,config", [
    ("q_proj,v_proj: vera r=16", VeraConfig(r=16, target_modules=["q_proj", "v_proj"])),
    ("input_layernorm, norm: train", LNTuningConfig(target_modules=["input_layernorm", "norm"])),
    ("q_proj: lora r=4\nlm_head: train", None)])
def test_loraplus_groups_of_vectors_match_peft(tiny, spec, config):
    """PEFT's LoRA+ gives every 1-D tensor B's rate: VeRA's λ_d, λ_b and tuned norms are fast
    (they kept the base rate, so LoRA+ did nothing there); a trained matrix stays slow."""
    model = tiny("llama")
    gm = adaptc.compile(model, spec)
    ours = sorted((g["lr"], sum(p.numel() for p in g["params"]))
                  for g in adaptc.loraplus_param_groups(gm, lr=1e-3, ratio=16))
    if config is None:  # lm_head [512, 128] slow with A (2·512 + 65536); B (2·512) fast
        assert ours == [(1e-3, 2 * 512 + 65536), (pytest.approx(16e-3), 2 * 512)]
        return
    twin = get_peft_model(copy.deepcopy(model.module), config)
    theirs = create_loraplus_optimizer(twin, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=16)
    sizes = sorted((g["lr"], sum(p.numel() for p in g["params"])) for g in theirs.param_groups
                   if g["params"])
    assert [n for _, n in ours] == [n for _, n in sizes]
    assert [lr for lr, _ in ours] == pytest.approx([lr for lr, _ in sizes])
    assert [lr for lr, _ in ours] == pytest.approx([16e-3])


PEFT_NAMES = {".lora_A.default.weight": ".A", ".lora_B.default.weight": ".B",
              ".lora_magnitude_vector.default.weight": ".magnitude",
              ".modules_to_save.default.": ".", ".base_layer.": "."}


def peft_tensor_name(name: str) -> str:
    """A PEFT parameter name as the model path plus adaptc's tensor name (`...c_attn.B`)."""
    name = name.removeprefix("base_model.model.")
    for theirs, ours in PEFT_NAMES.items():
        name = name.replace(theirs, ours)
    return name


def named_groups(groups, names) -> list[tuple]:
    """(lr, weight_decay, {tensor name: shape}) per non-empty group, in order."""
    return [(pytest.approx(g["lr"]), g["weight_decay"],
             {names[id(p)]: tuple(p.shape) for p in g["params"]}) for g in groups if g["params"]]


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("family,spec,config,kinds", [
    ("gpt2", "c_attn: lora r=4 dora; *.bias: train; ln_*: train",
     dict(target_modules=["c_attn"], use_dora=True, fan_in_fan_out=True, bias="all",
          modules_to_save=["ln_1", "ln_2", "ln_f"]), 3),
    ("llama", "q_proj,v_proj: lora r=4; *norm*: train; lm_head: train",
     dict(target_modules=["q_proj", "v_proj"],
          modules_to_save=["input_layernorm", "post_attention_layernorm", "norm", "lm_head"]), 2)])
def test_loraplus_groups_and_weight_decay_match_peft(tiny, family, spec, config, kinds,
                                                     weight_decay):
    """Group by group, the same tensors with the same lr and weight decay as PEFT's
    create_loraplus_optimizer: A and trained matrices decayed at lr, B and DoRA's magnitude
    decayed at ratio·lr, biases and nn.LayerNorm tensors undecayed at ratio·lr (Llama's
    RMSNorm weights are decayed: PEFT exempts the nn.LayerNorm type only)."""
    model = tiny(family)
    gm = adaptc.compile(model, spec)
    ours = {id(p): f"{path.rpartition('.')[0]}.{name}"
            for path, a in adaptc.adapters.adapter_modules(gm).items()
            for name, p in a.adapter_parameters().items()}
    twin = get_peft_model(copy.deepcopy(model.module), LoraConfig(r=4, **config))
    theirs = {id(p): peft_tensor_name(n) for n, p in twin.named_parameters() if p.requires_grad}
    optimizer = create_loraplus_optimizer(twin, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=16,
                                          loraplus_weight_decay=weight_decay)
    groups = adaptc.loraplus_param_groups(gm, lr=1e-3, ratio=16, weight_decay=weight_decay)
    expected = named_groups(optimizer.param_groups, theirs)
    assert named_groups(groups, ours) == expected
    assert len(expected) == kinds and sum(len(g[2]) for g in expected) == len(theirs)
    assert len(ours) == sum(p.requires_grad for p in gm.parameters())
    # set in every group: AdamW's default 0.01 is not used
    assert [g["weight_decay"] for g in torch.optim.AdamW(groups).param_groups] == [
        decay for _, decay, _ in expected]


ENCODER_NAMES = {"transform.0.weight": "hidden_weight", "transform.0.bias": "hidden_bias",
                 "transform.2.weight": "out_weight", "transform.2.bias": "out_bias",
                 "embedding.weight": "embedding", "mlp_head.": "head.", "lstm_head.": "lstm."}


@pytest.mark.parametrize("spec,config", [
    ("attn: prefix tokens=4 projection=16",
     PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4, prefix_projection=True,
                        encoder_hidden_size=16)),
    ("embed: ptuning tokens=4 hidden=16",
     PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=4, encoder_hidden_size=16)),
    ("embed: ptuning tokens=4 encoder=lstm hidden=16",
     PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=4, encoder_hidden_size=16,
                         encoder_reparameterization_type="LSTM"))])
def test_loraplus_groups_of_prompt_encoders_match_peft(tiny, spec, config):
    """PEFT's LoRA+ gives a prefix MLP's or P-tuning encoder's biases (1-D) ratio·lr and no
    weight decay, like any bias; they kept lr, decayed."""
    model = tiny("llama")
    gm = adaptc.compile(model, spec)
    (encoder,) = [a for a in adaptc.adapters.adapter_modules(gm).values()
                  if a.adapter_parameters()]
    ours = {id(p): name for name, p in encoder.adapter_parameters().items()}
    twin = get_peft_model(copy.deepcopy(model.module), config)
    theirs = {}
    for name, p in twin.named_parameters():
        if p.requires_grad:
            name = name.removeprefix("prompt_encoder.default.")
            for peft_name, our_name in ENCODER_NAMES.items():
                name = name.replace(peft_name, our_name)
            theirs[id(p)] = name
    optimizer = create_loraplus_optimizer(twin, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=16,
                                          loraplus_weight_decay=0.1)
    expected = named_groups(optimizer.param_groups, theirs)
    groups = adaptc.loraplus_param_groups(gm, lr=1e-3, ratio=16, weight_decay=0.1)
    assert named_groups(groups, ours) == expected
    assert [(g[0], g[1]) for g in expected] == [(1e-3, 0.1), (16e-3, 0.0)]


@pytest.mark.parametrize("spec,undecayed", [
    ("ffn: adapter bottleneck=8", {"down_bias", "up_bias"}),
    ("ffn: adapter bottleneck=8 gate", {"down_bias", "up_bias", "gate.bias"}),
    ("q_proj: lora r=2 gate", {"gate.bias"})])
def test_loraplus_leaves_adapter_biases_undecayed_at_the_base_rate(tiny, spec, undecayed):
    """Biases of adapters PEFT lacks (bottleneck adapters, UniPELT gates) take no weight decay,
    as every bias in PEFT's and the HF Trainer's groups; they keep the base rate."""
    gm = adaptc.compile(tiny("llama"), spec)
    adapter = next(iter(adaptc.adapters.adapter_modules(gm).values()))
    names = {id(p): name for name, p in adapter.adapter_parameters().items()}
    groups = adaptc.loraplus_param_groups(gm, lr=1e-3, ratio=16, weight_decay=0.1)
    rows = {(g["lr"], g["weight_decay"]): {names[id(p)] for p in g["params"] if id(p) in names}
            for g in groups}
    assert rows[1e-3, 0.0] == undecayed
    assert undecayed.isdisjoint(rows[1e-3, 0.1])


def test_loraplus_gives_mixture_experts_b_the_fast_rate(tiny):
    """A `mixture moe` turns the LoRA sites into experts: their B's are still LoRA's B."""
    gm = adaptc.compile(tiny("llama"), "q_proj,v_proj: lora r=4; mixture moe k=1 experts=2")
    slow, fast = adaptc.loraplus_param_groups(gm, lr=1e-3, ratio=16)
    adapters = adaptc.adapters.adapter_modules(gm).values()
    assert fast["lr"] == pytest.approx(16e-3)
    assert {id(p) for p in fast["params"]} == {id(a.B) for a in adapters}
    assert {id(p) for p in slow["params"]} == {id(p) for a in adapters for p in (a.A, a.router)}


def test_loraplus_rejects_bad_input(tiny):
    gm = adaptc.compile(tiny("llama"), "q_proj: lora r=2")
    with pytest.raises(adaptc.AdaptcError, match="ratio > 0"):
        adaptc.loraplus_param_groups(gm, lr=1e-3, ratio=0)
    with pytest.raises(adaptc.AdaptcError, match="weight_decay=-0.1"):
        adaptc.loraplus_param_groups(gm, lr=1e-3, weight_decay=-0.1)


def test_pissa_on_a_float64_model_is_exact_to_float64(tiny):
    """The SVD runs in the weight's precision when that is wider than float32: residual + s·B·A
    rebuilds a float64 weight to 1e-12 (a float32 SVD left ~1e-7), and the adapted model's
    output at init is the base model's."""
    model = tiny("llama")
    model.module.double()
    gm = adaptc.compile(model, "q_proj,v_proj: lora r=4 alpha=8 init=pissa")
    for path, ours in adaptc.adapters.adapter_modules(gm).items():
        weight = model.module.get_submodule(path.rsplit(".", 1)[0]).weight
        assert ours.A.dtype == ours.residual.dtype == torch.float64
        rebuilt = ours.residual + ours.scale * (ours.B @ ours.A)
        assert (rebuilt - weight).abs().max().item() <= 1e-12
    x = inputs()
    assert (main_output(gm(**x)) - main_output(model.module(**x))).abs().max().item() <= 1e-10
