"""AdaLoRA equals PEFT's AdaLoraModel: the forward with identical weights, the orthogonality
regulariser, and the rank allocator's pruning decisions step by step; it trains."""
from __future__ import annotations

import copy

import pytest
import torch
from peft import AdaLoraConfig, get_peft_model

import adaptc
from helpers import inputs, lm_loss, main_output, next_token_batch

TOL = 1e-5
TARGETS = {"llama": ["q_proj", "v_proj", "down_proj"],
           "bert": ["query", "value", "intermediate.dense"]}
SPEC = "adalora init_r=6 target_r=2 alpha=12 total_step=10 tinit=2 tfinal=3"


def twins(tiny, family):
    model = tiny(family)
    gm = adaptc.compile(model, f"{','.join(TARGETS[family])}: {SPEC}").eval()
    config = AdaLoraConfig(init_r=6, target_r=2, lora_alpha=12, target_modules=TARGETS[family],
                           total_step=10, tinit=2, tfinal=3, lora_dropout=0.0)
    twin = get_peft_model(copy.deepcopy(model.module), config)
    gen = torch.Generator().manual_seed(0)
    inner = twin.base_model.model
    with torch.no_grad():
        for path, ours in adaptc.adapters.adapter_modules(gm).items():
            layer = inner.get_submodule(path.rsplit(".", 1)[0])
            for name, theirs in (("A", layer.lora_A), ("E", layer.lora_E), ("B", layer.lora_B)):
                mine = getattr(ours, name)
                mine.copy_(torch.randn(mine.shape, generator=gen) * 0.1)
                theirs["default"].copy_(mine)
    return model, gm, twin


@pytest.mark.parametrize("family", list(TARGETS))
def test_adalora_equals_peft(tiny, family):
    model, gm, twin = twins(tiny, family)
    twin.eval()
    x = inputs()
    ours = main_output(gm(**x))
    assert (ours - main_output(twin(**x))).abs().max().item() <= TOL
    assert (ours - main_output(model.module(**x))).abs().max().item() > 1e-3
    report = adaptc.report_of(gm)
    assert report.counts["adalora_inserted"] == len(report.sites)
    assert (report.trainable, report.total) == twin.get_nb_trainable_parameters()


def test_zero_e_starts_at_the_base_model(tiny):
    model = tiny("llama")
    gm = adaptc.compile(model, "q_proj: adalora total_step=100")
    x = inputs()
    assert torch.equal(main_output(gm(**x)), main_output(model.module(**x)))


def test_orth_loss_and_allocator_follow_peft(tiny):
    """Ten SGD steps on both with the same data: losses (with the regulariser), and the
    triplets kept per site after each allocator step, agree."""
    _, gm, twin = twins(tiny, "llama")
    gm.train()
    twin.train()
    ids = next_token_batch()
    mask = torch.ones_like(ids)
    ours_opt = torch.optim.SGD([p for p in gm.parameters() if p.requires_grad], lr=0.1)
    theirs_opt = torch.optim.SGD([p for p in twin.parameters() if p.requires_grad], lr=0.1)
    allocator = adaptc.AdaLoraAllocator(gm)
    inner = twin.base_model.model
    for step in range(10):
        ours = lm_loss(gm, ids) + adaptc.orth_loss(gm)
        theirs = twin.base_model(input_ids=ids, attention_mask=mask, labels=ids).loss
        assert ours.item() == pytest.approx(theirs.item(), abs=1e-5)
        for loss, opt in ((ours, ours_opt), (theirs, theirs_opt)):
            loss.backward()
            opt.step()
        kept = allocator.step(step)
        twin.base_model.update_and_allocate(step)
        ours_opt.zero_grad()
        theirs_opt.zero_grad()
        peft_kept = {path: int((inner.get_submodule(path.rsplit(".", 1)[0]).lora_E["default"]
                                != 0).sum()) for path in kept}
        assert kept == peft_kept, step
    assert sum(kept.values()) == 2 * len(kept)  # the target budget: target_r per site


def test_adalora_trains_to_its_budget(tiny):
    torch.manual_seed(0)
    gm = adaptc.compile(tiny("llama"), "*_proj: adalora init_r=8 target_r=4 alpha=16 "
                                       "total_step=50 tinit=5 tfinal=10")
    gm.train()
    ids = next_token_batch()
    optimizer = torch.optim.AdamW([p for p in gm.parameters() if p.requires_grad], lr=1e-2)
    allocator = adaptc.AdaLoraAllocator(gm)
    with torch.no_grad():
        before = lm_loss(gm, ids).item()
    for step in range(50):
        loss = lm_loss(gm, ids) + adaptc.orth_loss(gm)
        loss.backward()
        optimizer.step()
        kept = allocator.step(step)
        optimizer.zero_grad()
    with torch.no_grad():
        after = lm_loss(gm, ids).item()
    assert after < 0.8 * before, (before, after)
    assert sum(kept.values()) == 4 * len(kept)


def test_allocator_needs_adalora_sites_and_gradients(tiny):
    with pytest.raises(adaptc.AdaptcError, match="no adalora sites"):
        adaptc.AdaLoraAllocator(adaptc.compile(tiny("llama"), "q_proj: lora r=2"))
    gm = adaptc.compile(tiny("llama"), "q_proj: adalora total_step=4 init_r=4 target_r=1")
    with pytest.raises(adaptc.AdaptcError, match="after loss.backward"):
        adaptc.AdaLoraAllocator(gm).step(2)


def test_allocator_resumed_in_the_final_phase_keeps_the_saved_rank_pattern(tiny, tmp_path):
    """Training resumed after total_step - tfinal from saved adapters: a new allocator has
    no final allocation of its own, so it re-applies the saved one (Λ_i = 0); before, the
    pruned triplets grew back and all 16 were kept instead of the budget's 8."""
    spec = "q_proj,v_proj: adalora init_r=4 target_r=2 total_step=6 tfinal=4"
    model = tiny("llama")
    ids = next_token_batch()

    def steps(gm, optimizer, allocator, at):
        for step in at:
            (lm_loss(gm, ids) + adaptc.orth_loss(gm)).backward()
            optimizer.step()
            kept = allocator.step(step)
            optimizer.zero_grad()
        return kept

    def sgd(gm):
        return torch.optim.SGD([p for p in gm.parameters() if p.requires_grad], lr=0.1)

    gm = adaptc.compile(model, spec)
    optimizer, allocator = sgd(gm), adaptc.AdaLoraAllocator(gm)
    steps(gm, optimizer, allocator, range(4))
    adaptc.save_adapters(gm, tmp_path / "a.safetensors")
    straight = steps(gm, optimizer, allocator, range(4, 8))
    again = adaptc.compile(model, spec)
    adaptc.load_adapters(again, tmp_path / "a.safetensors")
    resumed = steps(again, sgd(again), adaptc.AdaLoraAllocator(again), range(4, 8))
    assert resumed == straight and sum(resumed.values()) == 2 * 4
    ours, theirs = adaptc.adapter_state_dict(again), adaptc.adapter_state_dict(gm)
    assert max((ours[k] - theirs[k]).abs().max().item() for k in ours) <= 1e-6
