"""Compiled modules pickle (adaptc/pickling.py): `pickle` and `torch.save` / `torch.load`
give back the same graph and state, so the same outputs, trainable adapters, dropout under
train(), and an infer graph's `torch.ops.adaptc.*` calls, in this process or another."""
from __future__ import annotations

import copy
import pickle
import subprocess
import sys
import textwrap

import pytest
import torch

import adaptc
from adaptc.pickling import CompiledModule, ExportGuards
from helpers import inputs, lm_loss, next_token_batch

SPECS = {"llama": "q_proj,v_proj: lora r=4; mlp: adapter bottleneck=8",
         "gpt2": "c_attn: lora r=4; mlp: adapter bottleneck=8"}


def pickled(module):
    return pickle.loads(pickle.dumps(module))


def saved(module, folder):
    torch.save(module, folder / "module.pt")
    return torch.load(folder / "module.pt", weights_only=False)


def trainable(module) -> list[str]:
    return [name for name, p in module.named_parameters() if p.requires_grad]


def adaptc_ops(module) -> list[str]:
    return [str(n.target) for n in module.graph.nodes
            if n.op == "call_function" and str(n.target).startswith("adaptc.")]


@pytest.mark.parametrize("mode", ["train", "infer"])
@pytest.mark.parametrize("family", SPECS)
def test_round_trip_keeps_graph_outputs_and_trainable_set(tiny, tmp_path, family, mode):
    gm = adaptc.compile(tiny(family), SPECS[family], mode=mode).eval()
    x = inputs()
    expected = gm(**x).logits
    for back in (pickled(gm), saved(gm, tmp_path)):
        assert isinstance(back, CompiledModule) and back is not gm
        assert back.code == gm.code
        assert (back(**x).logits - expected).abs().max().item() == 0
        assert trainable(back) == trainable(gm)  # the same names; the base stays frozen
        assert all(".lora." in n or ".adapter." in n for n in trainable(back))
        assert bool(trainable(back)) == (mode == "train")
        assert adaptc.report_of(back).peft_line() == adaptc.report_of(gm).peft_line()
        assert adaptc_ops(back) == adaptc_ops(gm)
    if mode == "infer":
        assert adaptc_ops(gm)  # the bottleneck adapters are fused ops, and stay so


def test_loaded_module_trains(tiny):
    gm = adaptc.compile(tiny("llama"), "q_proj,v_proj: lora r=4 alpha=8")
    back = pickled(gm)
    frozen = {n: p.clone() for n, p in back.named_parameters() if not p.requires_grad}
    opt = torch.optim.AdamW([p for p in back.parameters() if p.requires_grad], lr=1e-2)
    ids, losses = next_token_batch(batch=4, seq=8), []
    for _ in range(4):
        loss = lm_loss(back, ids)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert all(torch.equal(p, frozen[n]) for n, p in back.named_parameters() if n in frozen)
    assert all(p.grad is None for n, p in gm.named_parameters())  # the original is untouched


def test_loaded_module_follows_train_and_eval(tiny):
    """GPT-2's dropout (follow_train_mode): the loaded module draws the same masks under one
    seed in train(), and none in eval()."""
    gm = adaptc.compile(tiny("gpt2"), "c_attn: lora r=4 dropout=0.1")
    back, x = pickled(gm), inputs()
    torch.manual_seed(3)
    expected = gm(**x).logits
    torch.manual_seed(3)
    assert torch.equal(back(**x).logits, expected)
    assert not torch.equal(back(**x).logits, expected)  # other masks
    back.eval()
    assert torch.equal(back(**x).logits, back(**x).logits)
    assert torch.equal(back(**x).logits, gm.eval()(**x).logits)


def test_export_guards_come_back_as_conditions(tiny):
    gm = adaptc.compile(tiny("llama"), "q_proj: lora r=4")
    back = pickled(gm)
    assert isinstance(back._guards_fn, ExportGuards)
    assert "attention_mask.size()[1] == input_ids.size()[1]" in back._guards_fn.conditions
    ids = inputs()["input_ids"]
    back._guards_fn(ids, torch.ones_like(ids))
    with pytest.raises(AssertionError, match="Guard failed: attention_mask"):
        back._guards_fn(ids, torch.ones_like(ids[:, :3]))
    with pytest.raises(TypeError, match="missing input 'attention_mask'"):  # InputCheck kept
        back(input_ids=ids)


def test_deep_copy_pickles_too(tiny):
    gm = adaptc.compile(tiny("llama"), "q_proj: lora r=4").eval()
    x = inputs()
    back = pickled(copy.deepcopy(gm))
    assert isinstance(back, CompiledModule)
    assert torch.equal(back(**x).logits, gm(**x).logits)


def test_a_hook_that_does_not_pickle_is_named(tiny):
    gm = adaptc.compile(tiny("llama"), "q_proj: lora r=4")
    gm.register_forward_hook(lambda module, args, out: None)
    with pytest.raises(adaptc.AdaptcError, match="forward hook .*lambda.* does not pickle"):
        pickle.dumps(gm)


def test_infer_module_loads_in_a_fresh_process(tiny, tmp_path):
    """Unpickling imports what the graph calls: the adaptc ops are registered on load."""
    gm = adaptc.compile(tiny("llama"), SPECS["llama"], mode="infer")
    x = inputs()
    torch.save({"module": gm, "inputs": x, "logits": gm(**x).logits}, tmp_path / "m.pt")
    script = textwrap.dedent(f"""
        import torch
        saved = torch.load({str(tmp_path / "m.pt")!r}, weights_only=False)
        module = saved["module"]
        ops = {{str(n.target) for n in module.graph.nodes if n.op == "call_function"}}
        assert "adaptc.bottleneck_adapter.default" in ops, ops
        assert torch.equal(module(**saved["inputs"]).logits, saved["logits"])
        print("ok")
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "ok"


def other_message(*args):
    torch._assert(args[0].size()[0] == 2, "some other message")


def nested_input(*args):
    torch._assert(args[0].size()[0] == 2, "Guard failed: z['k'].size()[0] == 2")


@pytest.mark.parametrize("function", [other_message, nested_input])
def test_guards_in_another_form_are_an_error(function):
    """The conditions are read from the function torch.export generates (named `_`); one in
    another form, or over inputs that are not the graph's, is refused rather than carried
    over without its checks."""
    function.__name__ = "_"
    guards = torch.nn.Module()
    guards.forward = function
    with pytest.raises(adaptc.AdaptcError, match="input guards .* not in the form"):
        ExportGuards.of(guards, ["input_ids"])
