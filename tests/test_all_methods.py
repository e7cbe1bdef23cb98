"""Every method of this family in one spec: artifacts round-trip (save, load, same outputs),
`inspect` lists each site, and gradients reach exactly the trainable tensors."""
from __future__ import annotations

import torch

import adaptc
from helpers import inputs, main_output, perturb_adapters

SPEC = """q_proj: lora r=4 alpha=8 dora
k_proj: ia3
v_proj: vera r=8
o_proj: lora r=2 init=pissa freeze_a
*norm*[0]: train
down_proj: quantize
down_proj: adalora init_r=4 target_r=2 total_step=10
up_proj[1]: lora r=2 init=gaussian
"""


def test_artifact_round_trip(tiny, tmp_path):
    model = tiny("llama")
    gm = adaptc.compile(model, SPEC)
    perturb_adapters(gm, 0.05)
    adaptc.write_artifact(gm, model, tmp_path / "dist")
    again = adaptc.load(tmp_path / "dist")
    x = inputs()
    assert torch.equal(main_output(gm(**x)), main_output(again(**x)))
    counts = adaptc.report_of(again).counts
    assert (counts["dora_inserted"], counts["ia3_inserted"], counts["vera_inserted"],
            counts["lora_inserted"], counts["train_inserted"], counts["quantize_inserted"],
            counts["adalora_inserted"]) == (2, 2, 2, 3, 2, 2, 2)


def test_inspect_lists_every_method(tiny):
    text = adaptc.inspect(tiny("llama"), SPEC)
    for method in ("dora", "ia3/output", "vera", "lora", "train", "quantize/nf4", "adalora"):
        assert f" {method} " in text, method


def test_gradients_reach_exactly_the_trainable_tensors(tiny):
    gm = adaptc.compile(tiny("llama"), SPEC)
    perturb_adapters(gm, 0.05)
    main_output(gm(**inputs())).square().mean().backward()
    trainable = {n for n, p in gm.named_parameters() if p.requires_grad}
    saved = set(adaptc.adapter_state_dict(gm))
    frozen_a = {n for n in saved if n.endswith("o_proj.lora.A")}
    assert trainable == saved - frozen_a and len(frozen_a) == 2
    for name, param in gm.named_parameters():
        assert (param.grad is not None) == (name in trainable), name
