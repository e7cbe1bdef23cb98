"""Each statement kind trains: the loss on a tiny next-token task falls within 50 steps
(prefix and prompt methods alone: test_training_prompts.py)."""
from __future__ import annotations

import pytest
import torch

import adaptc
from helpers import lm_loss, next_token_batch

# (spec, learning rate, the loss after 50 steps must be below this share of the loss before)
CASES = [
    ("q_proj,v_proj: lora r=8 alpha=16", 1e-2, 0.8),
    ("q_proj,v_proj: lora r=8 alpha=16 init=pissa", 1e-2, 0.8),
    ("*_proj: lora r=8 alpha=16 freeze_a", 1e-2, 0.8),
    ("*_proj: lora r=8 alpha=16 dora", 1e-2, 0.8),
    ("*_proj: quantize; *_proj: lora r=8 alpha=16", 1e-2, 0.8),  # QLoRA
    ("*_proj: vera r=64", 5e-2, 0.8),  # VeRA trains vectors: higher rates, as in the paper
    ("ffn: adapter bottleneck=32", 1e-2, 0.8),
    ("*norm*: train", 5e-2, 0.9),  # 640 numbers: like (IA)³, moves the loss only
    ("q_proj,v_proj: lora r=4 alpha=8; mixture moe k=2 experts=4", 1e-2, 0.8),
    ("ffn.*: lora r=4 alpha=8; mixture loramoe experts=4", 1e-2, 0.8),  # half the rows: knowledge
    # (IA)³ trains 944 numbers here (LoRA r=8 on q,v: 7,168) and only rescales activations
    # of a random tiny model: it is expected to move the loss, not to fit the task
    ("k_proj,v_proj: ia3; down_proj: ia3 feedforward", 5e-2, 0.95),
    # MoV: the same sites as routed mixtures of 4 vectors
    ("k_proj,v_proj: ia3; down_proj: ia3 feedforward; mixture moe router=soft experts=4",
     5e-2, 0.95),
    # MAM adapter and UniPELT
    ("attn: prefix tokens=4 projection=32; ffn: adapter placement=parallel bottleneck=16 scale=4",
     1e-2, 0.8),
    ("attn.q,attn.v: lora r=4 gate; attn: prefix tokens=4 gate; ffn: adapter bottleneck=16 gate",
     1e-2, 0.8),
]


@pytest.mark.parametrize("spec,lr,share", CASES, ids=[c[0] for c in CASES])
def test_loss_goes_down(tiny, spec, lr, share):
    torch.manual_seed(0)
    gm = adaptc.compile(tiny("llama"), spec)
    gm.train()
    ids = next_token_batch()
    params = [p for p in gm.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr)
    with torch.no_grad():
        before = lm_loss(gm, ids).item()
    for _ in range(50):
        loss = lm_loss(gm, ids) + adaptc.balance_loss(gm, sample_types=torch.arange(len(ids)) % 2)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        after = lm_loss(gm, ids).item()
    assert after < share * before, (before, after)


def test_half_precision_models_train_float32_adapters_as_peft_does(tiny):
    """float16 model, AdamW with its defaults: the adapters are float32 like PEFT's
    (autocast_adapter_dtype), so eps=1e-8 does not round to 0 (float16 adapters: NaN from
    step 1); forward and five optimizer steps follow PEFT's within float16 rounding."""
    from helpers import peft_twin, randomize_and_copy

    model = tiny("llama")
    model.module.half()
    gm = adaptc.compile(model, "q_proj,v_proj: lora r=4 alpha=8")
    twin = peft_twin(model.module, ["q_proj", "v_proj"], 4, 8)
    ours = [p for p in gm.parameters() if p.requires_grad]
    theirs = [p for p in twin.parameters() if p.requires_grad]
    assert {p.dtype for p in ours} == {p.dtype for p in theirs} == {torch.float32}
    assert sum(p.numel() for p in ours) == sum(p.numel() for p in theirs)
    randomize_and_copy(gm, twin)
    gm.train(), twin.train()
    ids = next_token_batch()
    losses = {}
    for name, module, params in [("ours", gm, ours), ("peft", twin, theirs)]:
        optimizer = torch.optim.AdamW(params, lr=1e-2)
        losses[name] = []
        for _ in range(5):
            loss = lm_loss(module, ids)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses[name].append(loss.item())
    assert all(torch.isfinite(p).all() for p in ours)
    assert losses["ours"][-1] < losses["ours"][0]
    # the losses are float16: 1e-2 is two units in the last place at 6
    assert max(abs(a - b) for a, b in zip(losses["ours"], losses["peft"])) <= 1e-2, losses
    assert all(p.dtype == torch.float16 for n, p in gm.named_parameters() if not p.requires_grad)


def test_resuming_with_the_optimizer_state_continues_the_same_run(tiny, tmp_path):
    """An optimizer's state_dict maps to parameters by position, so resuming in a new process
    (a fresh compile, the saved adapters and optimizer state) needs `parameters()` in one
    order every time: each replicated layer lists its tensors in block 0's order (they came
    in the order of a set of nodes, which follows memory addresses: Adam's moments of q_proj
    went to v_proj, or failed on their shapes)."""
    import re

    from adaptc.frontend.models import build_preset

    spec = "*_proj: lora r=2 alpha=4"
    model = build_preset("llama", layers=4)
    gm = adaptc.compile(model, spec)
    layers: dict[str, list[str]] = {}
    for name, _ in gm.named_parameters():
        if found := re.match(r"model\.layers\.(\d+)\.(.*)", name):
            layers.setdefault(found[1], []).append(found[2])
    assert len(layers) == 4 and all(names == layers["0"] for names in layers.values())

    ids = next_token_batch()

    def steps(module, optimizer, n):
        losses = []
        for _ in range(n):
            loss = lm_loss(module, ids)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        return losses

    def adam(module):
        return torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-2)

    optimizer = adam(gm)
    steps(gm, optimizer, 2)
    adaptc.save_adapters(gm, tmp_path / "a.safetensors")
    torch.save(optimizer.state_dict(), tmp_path / "opt.pt")
    straight = steps(gm, optimizer, 3)
    again = adaptc.compile(model, spec)
    adaptc.load_adapters(again, tmp_path / "a.safetensors")
    resumed = adam(again)
    resumed.load_state_dict(torch.load(tmp_path / "opt.pt"))
    assert steps(again, resumed, 3) == straight


def test_dora_with_a_gate_is_refused_at_the_gate(tiny):
    """`dora gate` compiled a gate that DoRA's forward never called: two trainable tensors per
    site that got no gradient, and infer mode failed in merge_scaling."""
    with pytest.raises(adaptc.SpecError, match="gate does not combine with dora") as err:
        adaptc.compile(tiny("llama"), "q_proj: lora r=2 dora gate")
    first = err.value.first
    assert (first.code, first.line, first.column, first.end_column) == ("E205", 1, 23, 27)


def test_gated_prefix_on_gpt2_reads_the_attention_input_per_example(tiny):
    """GPT-2's c_attn reads its input flattened to [B·S, F]; the prefix gate read that view
    and its mean over the sequence failed on the first batch. It reads the attention input
    [B, S, F]: each row equals the ungated prefix scaled by that row's
    G = mean_t σ(w·ln_1(x)_t + b), computed here by hand."""
    from adaptc.frontend.models import build_preset

    model = build_preset("gpt2", layers=1)
    gated = adaptc.compile(model, "attn: prefix tokens=2 gate").eval()
    plain = adaptc.compile(model, "attn: prefix tokens=2").eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        prefix = torch.randn(gated.adaptc.prefix_0.prefix.shape, generator=gen)
        gated.adaptc.prefix_0.prefix.copy_(prefix)
        gate = gated.get_submodule("transformer.h.0.attn.prefix.gate")
        gate.weight.copy_(torch.randn(gate.weight.shape, generator=gen) * 0.3)
    ids = next_token_batch()
    mask = torch.ones_like(ids)
    seen = {}
    hook = model.module.transformer.h[0].ln_1.register_forward_hook(
        lambda module, args, out: seen.setdefault("x", out))
    with torch.no_grad():
        shifted = torch.arange(2, 2 + ids.shape[1]).expand_as(ids)  # after the 2 prefix slots
        model.module(input_ids=ids, attention_mask=mask, position_ids=shifted)
        hook.remove()
        g = torch.sigmoid(seen["x"] @ gate.weight.T + gate.bias).mean(dim=(1, 2))
        out = gated(input_ids=ids, attention_mask=mask).logits
        for row in range(len(ids)):
            plain.adaptc.prefix_0.prefix.copy_(prefix * g[row])
            expected = plain(input_ids=ids[row:row + 1], attention_mask=mask[row:row + 1]).logits
            assert (out[row] - expected[0]).abs().max().item() <= 1e-5
    assert g.max() - g.min() > 1e-3  # the rows' gates differ
