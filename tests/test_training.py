"""Each statement kind trains: the loss on a tiny next-token task falls within 50 steps
(prefix and prompt methods alone: test_training_prompts.py)."""
from __future__ import annotations

import pytest
import torch

import adaptc
from helpers import lm_loss, next_token_batch


@pytest.mark.parametrize("spec", [
    "q_proj,v_proj: lora r=8 alpha=16",
    "ffn: adapter bottleneck=32",
    "q_proj,v_proj: lora r=4 alpha=8; mixture moe k=2 experts=4",
    "attn: prefix tokens=4 projection=32; ffn: adapter placement=parallel bottleneck=16 scale=4",
    "attn.q,attn.v: lora r=4 gate; attn: prefix tokens=4 gate; ffn: adapter bottleneck=16 gate",
])
def test_loss_goes_down(tiny, spec):
    torch.manual_seed(0)
    gm = adaptc.compile(tiny("llama"), spec)
    gm.train()
    ids = next_token_batch()
    params = [p for p in gm.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    with torch.no_grad():
        before = lm_loss(gm, ids).item()
    for _ in range(50):
        loss = lm_loss(gm, ids) + adaptc.balance_loss(gm)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        after = lm_loss(gm, ids).item()
    assert after < 0.8 * before, (before, after)  # a drop of over 20% in 50 steps
