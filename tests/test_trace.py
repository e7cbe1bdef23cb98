"""Tracing: block reuse gives the same graph behaviour as exporting the whole model."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import adaptc
from adaptc.errors import ModelError, SpecError
from adaptc.frontend.blocks import find_stack
from adaptc.frontend.models import build_preset, wrap
from adaptc.frontend.trace import InputCheck, trace
from helpers import inputs, main_output, randomize_adapters, small_decoder


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "gpt2", "bert"])
def test_block_reuse_equals_whole_model_export(family):
    model = build_preset(family, layers=3)
    reused, whole = trace(model), trace(model, reuse_blocks=False)
    x = inputs(batch=2, seq=9, segments=family == "bert")
    expected = main_output(model.module(**x))
    assert torch.equal(main_output(reused(**x)), expected)
    assert torch.equal(main_output(whole(**x)), expected)
    assert dict(reused.named_parameters()).keys() == dict(whole.named_parameters()).keys()
    assert len(reused.graph.nodes) == len(whole.graph.nodes)
    for name, param in reused.named_parameters():  # the user's tensors, not copies
        assert param is model.module.get_parameter(name)


def test_dynamic_batch_and_sequence():
    gm = trace(build_preset("llama", layers=2))
    for batch, seq in [(1, 1), (5, 3), (2, 40)]:
        ids = torch.randint(0, 512, (batch, seq))
        assert gm(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.shape == (batch, seq, 512)


class Uneven(nn.Module):
    """A ModuleList whose blocks differ: block reuse must not apply."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([nn.Linear(4, 4), nn.Linear(4, 4, bias=False)])

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x


def test_uneven_blocks_are_traced_whole():
    model = Uneven()
    assert find_stack(model) is None
    gm = adaptc.compile(model, "blocks.*: lora r=2", example_inputs={"x": torch.randn(3, 4)})
    x = torch.randn(5, 4)
    assert torch.equal(gm(x=x), model(x))
    assert wrap(model, example_inputs={"x": x}).family is None


@pytest.mark.parametrize("mode", ["train", "infer"])
def test_a_float_input_keeps_its_traced_shape_but_the_batch(mode):
    """Only dim 0 of a custom module's float input is dynamic: another size of dim 1 failed
    as the graph's "Guard failed: x.size()[1] == 3" AssertionError."""
    model = Uneven()
    gm = adaptc.compile(model, "blocks.*: lora r=2", mode,
                        example_inputs={"x": torch.randn(2, 3, 4)})
    x = torch.randn(5, 3, 4)
    assert torch.allclose(gm(x=x), model(x), atol=1e-6)
    with pytest.raises(ValueError, match=r"input 'x' has shape \(2, 6, 4\); the compiled module "
                                         r"takes \(batch, 3, 4\) as traced"):
        gm(x=torch.randn(2, 6, 4))


def test_llama_70b_compiles_on_meta():
    gm = adaptc.compile("llama-70b", "attn.q,attn.v: lora r=8 alpha=16")
    report = adaptc.report_of(gm)
    # 80 layers × (8·(8192+8192) + 8·(8192+1024)) LoRA parameters
    assert report.trainable == 80 * (8 * (8192 + 8192) + 8 * (8192 + 1024))
    assert report.total == 68_976_648_192 + report.trainable


def test_tracing_leaves_the_users_model_as_it_was():
    model = build_preset("llama", layers=2)
    model.module.train()
    model.module.config.use_cache = True
    trace(model)
    trace(model, reuse_blocks=False)
    assert model.module.training and all(m.training for m in model.module.modules())
    assert model.module.config.use_cache is True


class LengthGuard(nn.Module):
    """Branches on the sequence length: true for the example (8), not over the named range
    1..4096, so torch.export refuses the named dim and the trace falls back to Dim.AUTO (as
    torch 2.11 needs for grouped-query attention). `pin` reshapes to the example's length."""

    def __init__(self, pin: bool = False):
        super().__init__()
        self.embed, self.pin = nn.Embedding(16, 4), pin

    def forward(self, input_ids):
        h = self.embed(input_ids)
        if self.pin:
            return h.reshape(input_ids.shape[0], 32)
        return h * 2 if input_ids.shape[1] > 4 else h


def test_unprovable_guard_falls_back_to_automatic_dims():
    model = wrap(LengthGuard(), example_inputs={"input_ids": torch.zeros(2, 8, dtype=torch.long)})
    gm = trace(model)
    for batch, seq in [(1, 5), (3, 40)]:  # still dynamic in both dims
        ids = torch.randint(0, 16, (batch, seq))
        assert torch.equal(gm(input_ids=ids), model.module(ids))


def test_a_dim_that_cannot_stay_dynamic_is_an_error():
    model = wrap(LengthGuard(pin=True),
                 example_inputs={"input_ids": torch.zeros(2, 8, dtype=torch.long)})
    with pytest.raises(ModelError, match="could not keep dim 1 of input 'input_ids' dynamic: "
                                         "the graph would take size 8 only"):
        trace(model)


@pytest.mark.parametrize("mode", ["train", "infer"])
def test_calls_that_do_not_fit_the_traced_inputs_name_the_input(tiny, mode):
    gm = adaptc.compile(tiny("llama"), "q_proj: lora r=2", mode)
    ids = torch.randint(0, 100, (2, 5))
    mask = torch.ones_like(ids)
    for call, message in [
        (lambda: gm(ids), r"takes keyword inputs \(input_ids, attention_mask\), got 1 positional"),
        (lambda: gm(input_ids=ids), "missing input 'attention_mask'.*torch.ones_like"),
        (lambda: gm(input_ids=ids, attention_mask=mask, labels=ids),
         "unexpected input 'labels'.*logits"),
        (lambda: gm(input_ids=ids.float(), attention_mask=mask),
         "'input_ids' must be a 2-D integer tensor .*got 2-D torch.float32"),
        (lambda: gm(input_ids=ids[0], attention_mask=mask[0]),
         "'input_ids' must be a 2-D integer tensor .*got 1-D torch.int64"),
        (lambda: gm(input_ids=ids.tolist(), attention_mask=mask), "must be a tensor, got list"),
    ]:
        with pytest.raises(TypeError, match=message):
            call()
    for call, message in [  # were "Guard failed" and a reshape error inside the graph
        (lambda: gm(input_ids=ids, attention_mask=mask[:, :3]),
         r"'attention_mask' has shape \(2, 3\) and input 'input_ids' \(2, 5\)"),
        (lambda: gm(input_ids=ids, attention_mask=mask[:1]), r"has shape \(1, 5\)"),
        (lambda: gm(input_ids=ids[:, :0], attention_mask=mask[:, :0]),
         r"input 'input_ids' is empty \(shape \(2, 0\)\)"),
        (lambda: gm(input_ids=ids.index_fill(1, torch.tensor([3]), 512), attention_mask=mask),
         r"input 'input_ids' holds token id 512, outside the model's vocabulary \(0\.\.511\)"),
        (lambda: gm(input_ids=-ids - 1, attention_mask=mask), "holds token id -"),
    ]:
        with pytest.raises(ValueError, match=message):
            call()
    assert gm(input_ids=ids, attention_mask=mask).logits.shape == (2, 5, 512)


@pytest.mark.parametrize("mode", ["train", "infer"])
def test_a_module_moved_after_compiling_says_so(tiny, mode):
    """.to(dtype) failed inside the graph: "Tensor dtype mismatch! Expected: Float, Got:
    c10::BFloat16" (train), a scaled_dot_product_attention dtype error (infer)."""
    gm = adaptc.compile(tiny("llama"), "q_proj: lora r=2", mode)
    x = inputs()
    gm.to(torch.bfloat16)
    with pytest.raises(adaptc.AdaptcError, match=r"compiled with torch.float32 weights on cpu, "
                       r"and 'model.embed_tokens.weight' is now torch.bfloat16 on cpu: .*"
                       r"model.to\(...\) before adaptc.compile"):
        gm(**x)


def test_a_deepcopied_module_checks_its_inputs(tiny):
    """GraphModule's deepcopy drops forward hooks: the copy took a call without a mask and
    failed inside the graph ("forward() missing 1 required positional argument")."""
    gm = adaptc.compile(tiny("llama"), "q_proj: lora r=2")
    twice = copy.deepcopy(copy.deepcopy(gm))
    x = inputs()
    assert torch.equal(twice(**x).logits, gm(**x).logits)
    with pytest.raises(TypeError, match="missing input 'attention_mask'"):
        twice(input_ids=x["input_ids"])
    checks = [h for h in twice._forward_pre_hooks.values() if isinstance(h, InputCheck)]
    assert len(checks) == 1 and checks[0] is not gm.meta["adaptc.input_check"]


@pytest.mark.parametrize("mode", ["train", "infer"])
def test_int32_ids_and_a_bool_mask_run_as_the_traced_int64(tiny, mode):
    """transformers takes them; the graph raised "Tensor dtype mismatch! Expected: Long, Got:
    bool" (train mode's export assertions)."""
    gm = adaptc.compile(tiny("llama"), "q_proj: lora r=2", mode)
    x = inputs()
    expected = gm(**x).logits
    narrow = gm(input_ids=x["input_ids"].int(), attention_mask=x["attention_mask"].bool())
    assert torch.equal(narrow.logits, expected)


def test_batches_beyond_4096_rows_run(tiny):
    """The README says any batch size; the batch dim was traced with max=4096 and a larger
    batch failed the graph's guard ("Guard failed: input_ids.size()[0] <= 4096")."""
    gm = adaptc.compile(tiny("llama"), "q_proj: lora r=2")
    ids = torch.arange(4097).remainder(512).unsqueeze(1)
    with torch.no_grad():
        logits = gm(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        one = gm(input_ids=ids[-1:], attention_mask=torch.ones_like(ids[-1:])).logits
    torch.testing.assert_close(logits[-1:], one, atol=1e-5, rtol=0)  # GEMMs of other shapes


@pytest.mark.parametrize("preset,spec,limit", [
    ("gpt2", "embed: prompt tokens=4", 508),  # the prompt takes 4 rows of wpe
    ("gpt2", "attn: prefix tokens=3", 509),  # positions shift by the prefix
    ("gpt2", "attn: prefix tokens=3; embed: prompt tokens=4", 505),  # both (was 508: the
    # prompt's count replaced the prefix's, and 506 to 508 tokens failed inside the embedding)
    ("bert", "attn: prefix tokens=3", 509),
    ("llama", "embed: prompt tokens=4", 512),  # rotary: no table to run out of
    ("gpt2", "c_attn: lora r=2", 512),
])
def test_sequences_longer_than_the_positions_are_refused(tiny, preset, spec, limit):
    gm = adaptc.compile(tiny(preset), spec)
    assert adaptc.report_of(gm).max_tokens == limit
    ids = torch.randint(0, 100, (1, limit))
    assert main_output(gm(input_ids=ids, attention_mask=torch.ones_like(ids))).shape[1] == limit
    ids = torch.randint(0, 100, (1, limit + 1))
    taken = f", {512 - limit} of them for the virtual tokens" if limit < 512 else ""
    with pytest.raises(ValueError, match=f"input 'input_ids' has {limit + 1} tokens; the "
                       f"compiled module takes at most {limit} \\(the model's 512 positions{taken}\\)"):
        gm(input_ids=ids, attention_mask=torch.ones_like(ids))


@pytest.mark.parametrize("spec,column,message", [
    ("embed: prompt tokens=512", 22, "tokens=512 virtual tokens take all 512 rows"),
    ("attn: prefix tokens=600", 21, "tokens=600 virtual tokens take all 512 rows"),
    ("attn: prefix tokens=300; embed: prompt tokens=212", 47,
     "tokens=212 virtual tokens \\(besides the prefix's 300\\) take all 512 rows of the "
     "model's position table, leaving none for the input; need tokens < 212"),
])
def test_virtual_tokens_that_take_the_whole_position_table_are_spec_errors(tiny, spec, column,
                                                                           message):
    """They compiled into a module whose max_tokens was 0 or less: every call refused."""
    with pytest.raises(SpecError, match=message) as err:
        adaptc.compile(tiny("gpt2"), spec)
    assert (err.value.first.code, err.value.first.column) == ("E307", column)


def test_blocks_with_lifted_constants_are_traced_whole(tmp_path):
    """Falcon's attention makes a tensor in its forward, which torch.export lifts as a block
    constant: the block is not replicated (the constant might differ per layer), the whole
    model is exported, and an adapter's infer graph equals its train graph."""
    model = small_decoder("falcon")
    train = adaptc.compile(model, "mlp: adapter bottleneck=4")
    randomize_adapters(train, 0.1)
    adaptc.save_adapters(train, tmp_path / "a.safetensors")
    infer = adaptc.compile(model, "mlp: adapter bottleneck=4", "infer",
                           adapters=tmp_path / "a.safetensors")
    x = inputs(vocab=128)
    assert (main_output(infer(**x)) - main_output(train.eval()(**x))).abs().max() <= 1e-5
    assert (main_output(train(**x)) - main_output(model(**x))).abs().max() > 1e-3


class EinsumLinear(nn.Linear):
    """An nn.Linear whose forward is no linear op the compiler knows (not aten.linear, addmm,
    or FalconLinear's `x @ W.T`)."""

    def forward(self, x):
        return torch.einsum("bi,oi->bo", x, self.weight)


def test_linear_layer_computed_otherwise_is_named():
    model = nn.Sequential()
    model.add_module("proj", EinsumLinear(4, 4))
    with pytest.raises(ModelError, match=r"module 'proj' computes no aten.linear or aten.addmm in "
                                         r"the traced graph \(its ops: einsum.default\)"):
        adaptc.compile(model, "proj: lora r=2", example_inputs={"input": torch.randn(2, 4)})


def test_a_read_only_layer_types_does_not_break_block_reuse():
    """MambaConfig's `layer_types` is a property of the depth, with no setter: cutting the
    config to one layer raised AttributeError, a traceback from `adaptc inspect`/`compile`
    on a Mamba checkpoint. The one-layer copy is made, and torch.export's refusal is the
    ModelError it is for every model."""
    from transformers import MambaConfig, MambaForCausalLM

    from adaptc.frontend.blocks import restore_configs, shallow_model

    torch.manual_seed(0)
    module = MambaForCausalLM(MambaConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2,
                                          state_size=4)).eval()
    model = wrap(module)
    path, _ = find_stack(module)
    small = shallow_model(model, path)
    assert small.module.config.layer_types == ["linear_attention"]
    restore_configs(small)
    assert module.config.num_hidden_layers == 2 and module.backbone.config is module.config
    with pytest.raises(ModelError, match="cannot trace MambaForCausalLM with torch.export"):
        trace(model)
