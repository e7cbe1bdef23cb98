"""Prefix and prompt methods train: the loss on a tiny unigram task falls within 60 steps.

A soft prompt or prefix cannot re-wire a random-init model's next-token function (the task of
test_training.py); it can steer its output distribution, so the task here is sequences of
tokens drawn from a small subset of the vocabulary, and the bar is a 10% drop."""
from __future__ import annotations

import pytest
import torch

import adaptc
from helpers import lm_loss


@pytest.mark.parametrize("spec", [
    "attn: prefix tokens=16",
    "attn: prefix tokens=16 projection=32",
    "attn: ptuning2 tokens=16",
    "embed: prompt tokens=16",
    "embed: ptuning tokens=16 encoder=mlp",
    "embed: ptuning tokens=16 encoder=lstm hidden=16",
])
def test_loss_goes_down(tiny, spec):
    torch.manual_seed(0)
    gm = adaptc.compile(tiny("llama"), spec)
    gm.train()
    ids = torch.randint(0, 8, (8, 12), generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.AdamW([p for p in gm.parameters() if p.requires_grad], lr=0.1)
    with torch.no_grad():
        before = lm_loss(gm, ids).item()
    for _ in range(60):
        loss = lm_loss(gm, ids)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        after = lm_loss(gm, ids).item()
    assert after < 0.92 * before, (before, after)
