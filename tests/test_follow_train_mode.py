"""follow_train_mode: a train-mode module applies the base model's dropout in train() (with
the model's rates, drawing the random numbers the model draws, in its order) and none in
eval(), as the Hugging Face model does when PEFT fine-tunes it."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import adaptc
from adaptc.frontend.trace import DROPOUT_OPS
from adaptc.passes.follow_train_mode import TrainMode
from adaptc.passes.graph import SDPA, sdpa_arg
from helpers import inputs, lm_loss, main_output, next_token_batch

SPECS = {"gpt2": "c_attn,c_fc: lora r=4", "bert": "query,value: lora r=4",
         "t5": "q,v: lora r=4"}  # zero-init B, no adapter dropout: the model's outputs
# per family: the model's dropout ops in two layers (nn.Dropout and F.dropout; attention ops)
DROPOUTS = {"gpt2": (5, 2), "bert": (5, 2), "t5": (18, 6)}


def model_inputs(family: str) -> dict:
    x = inputs(segments=family == "bert")
    if family == "t5":
        x["decoder_input_ids"] = inputs(seq=5, seed=2)["input_ids"]
    return x


def output(out) -> torch.Tensor:
    return main_output(out) if isinstance(out, dict) else out[0]


def seeded(module: nn.Module, x: dict, seed: int) -> torch.Tensor:
    torch.manual_seed(seed)
    return output(module(**x))


def close(a: torch.Tensor, b: torch.Tensor) -> float:
    """The largest difference relative to the outputs' size (T5's logits reach ~40)."""
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("family", SPECS)
def test_train_draws_the_models_dropout_and_eval_none(tiny, family):
    """Zero-init LoRA (B = 0) and no adapter dropout: in train() under one seed the module's
    outputs are the Hugging Face model's in train(), so every dropout of the model is there,
    with its rate, in its order; in eval() they are the model's eval outputs, deterministic."""
    model = tiny(family)
    gm = adaptc.compile(model, SPECS[family])
    hf, x = model.module, model_inputs(family)
    assert gm.training  # compiled modules start in train mode, as nn.Modules do
    mine, theirs = seeded(gm, x, 7), seeded(hf.train(), x, 7)
    assert close(mine, theirs) <= 1e-6
    assert close(seeded(gm, x, 8), mine) > 1e-2  # another seed, other dropout masks
    hf.eval()
    evaluated = output(gm.eval()(**x))
    assert close(evaluated, output(hf(**x))) <= 1e-6
    assert torch.equal(evaluated, output(gm(**x)))
    assert close(seeded(gm.train(), x, 7), theirs) <= 1e-6  # and back


@pytest.mark.parametrize("family", SPECS)
def test_every_dropout_op_reads_the_modules_mode(tiny, family):
    gm = adaptc.compile(tiny(family), SPECS[family])
    graph = gm.graph
    flag = [n for n in graph.nodes if n.op == "call_module"
            and isinstance(gm.get_submodule(n.target), TrainMode)]
    assert len(flag) == 1
    dropouts = [n for n in graph.nodes if n.target in DROPOUT_OPS]
    attentions = [n for n in graph.nodes if n.target == SDPA]
    assert (len(dropouts), len(attentions)) == DROPOUTS[family]
    assert all(n.args[2] is flag[0] for n in dropouts)
    assert all(sdpa_arg(n, "dropout_p").args == (0.1, flag[0]) for n in attentions)
    assert adaptc.report_of(gm).counts["dropout_following_mode"] == sum(DROPOUTS[family])


def test_rates_are_the_models():
    """GPT-2's embedding, residual and attention dropout each keep their config's rate."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("gpt2", vocab_size=128, n_positions=64, n_embd=32, n_layer=2,
                                  n_head=4, embd_pdrop=0.3, resid_pdrop=0.2, attn_pdrop=0.4)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    gm = adaptc.compile(model, SPECS["gpt2"])
    rates = [n.args[1] for n in gm.graph.nodes if n.target in DROPOUT_OPS]
    assert rates == [0.3, 0.2, 0.2, 0.2, 0.2]  # embeddings, then attention and MLP per layer
    assert {sdpa_arg(n, "dropout_p").args[0] for n in gm.graph.nodes if n.target == SDPA} == {0.4}
    x = inputs(vocab=128)
    assert close(seeded(gm, x, 3), seeded(model.train(), x, 3)) <= 1e-6


def test_a_model_without_dropout_gets_no_mode_op(tiny):
    """Llama has no dropout: the train graph is the eval-mode trace's, nothing added."""
    gm = adaptc.compile(tiny("llama"), "q_proj,v_proj: lora r=4")
    assert not any(isinstance(m, TrainMode) for m in gm.modules())
    assert adaptc.report_of(gm).counts["dropout_following_mode"] == 0


@pytest.mark.parametrize("merge", [True, False])
def test_infer_graphs_hold_no_dropout(tiny, merge):
    gm = adaptc.compile(tiny("gpt2"), SPECS["gpt2"], "infer", merge=merge)
    assert not any(n.target in DROPOUT_OPS for n in gm.graph.nodes)
    assert not any(sdpa_arg(n, "dropout_p", 0.0) for n in gm.graph.nodes if n.target == SDPA)
    assert not any(isinstance(m, TrainMode) for m in gm.modules())


def test_adapters_train_with_the_models_dropout_on(tiny):
    """Gradients reach the adapters through dropped activations, and the loss falls."""
    gm = adaptc.compile(tiny("gpt2"), "attn.q,attn.v,ffn.*: lora r=8 alpha=16").train()
    ids = next_token_batch()
    params = [p for p in gm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    torch.manual_seed(0)
    losses = []
    for step in range(8):
        loss = lm_loss(gm, ids)
        opt.zero_grad()
        loss.backward()
        if step == 0:
            assert all(p.grad is not None for p in params)
            assert any(p.grad.abs().sum() > 0 for p in params)
        opt.step()
        losses.append(loss.item())
    with torch.no_grad():
        assert lm_loss(gm.eval(), ids).item() < losses[0]
    assert losses[-1] < losses[0]


def test_torch_compile_follows_the_mode(tiny):
    gm = adaptc.compile(tiny("gpt2"), SPECS["gpt2"])
    x = model_inputs("gpt2")
    expected = output(copy.deepcopy(gm).eval()(**x))
    compiled = torch.compile(gm, backend="aot_eager")
    dropped = seeded(compiled, x, 5)
    assert close(dropped, expected) > 1e-2
    gm.eval()
    assert close(output(compiled(**x)), expected) <= 1e-6


class Jittered(nn.Module):
    """Draws noise in training besides its dropout (as router jitter does)."""

    def __init__(self):
        super().__init__()
        self.proj, self.drop = nn.Linear(8, 8), nn.Dropout(0.5)

    def forward(self, x):
        if self.training:
            x = x * torch.empty_like(x).uniform_(0.9, 1.1)
        return self.drop(self.proj(x))


def test_other_training_randomness_falls_back_to_eval_tracing():
    module = Jittered().eval()
    x = torch.randn(2, 8)
    with pytest.warns(UserWarning, match="traced in eval mode.*besides dropout.*uniform"):
        gm = adaptc.compile(module, "proj: lora r=2", example_inputs={"x": x})
    assert gm.training
    assert torch.equal(gm(x=x), module(x))  # no jitter and no dropout: the eval graph


class Filtered(nn.Module):
    """Its train-mode forward branches on data, which torch.export cannot trace."""

    def __init__(self):
        super().__init__()
        self.proj, self.drop = nn.Linear(8, 8), nn.Dropout(0.5)

    def forward(self, x):
        if self.training and x.sum() > 0:
            x = -x
        return self.drop(self.proj(x))


def test_a_train_mode_forward_that_does_not_export_falls_back_to_eval_tracing():
    module = Filtered().eval()
    x = torch.randn(2, 8)
    with pytest.warns(UserWarning, match="traced in eval mode.*does not export"):
        gm = adaptc.compile(module, "proj: lora r=2", example_inputs={"x": x})
    assert torch.equal(gm(x=x), module(x))
