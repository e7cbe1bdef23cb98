"""bind_ops (the infer pipeline's last pass): aten overloads → torch's Python bindings, no-op
nodes dropped. The same kernels run, so outputs are bitwise those of the graph as exported."""
from __future__ import annotations

import copy

import pytest
import torch
from helpers import FAMILIES, inputs, main_output

import adaptc
from adaptc.decode import compile_decoder
from adaptc.decoding_program import load_decoding, save_decoding
from adaptc.frontend.trace import trace
from adaptc.passes.bind_ops import ATEN, BINDINGS, aten, aten_op, bind_ops


def targets(gm) -> set:
    return {n.target for n in gm.graph.nodes if n.op == "call_function"}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("family", FAMILIES)
def test_bound_graph_computes_bitwise_the_same(tiny, family, dtype):
    model = tiny(family)
    model.module.to(dtype)
    exported = trace(model)
    bound = copy.deepcopy(exported)
    counts = bind_ops(bound)
    x = inputs(segments=family == "bert")
    with torch.no_grad():
        assert torch.equal(main_output(bound(**x)), main_output(exported(**x)))
    assert counts["ops_bound"] > 50 and counts["nodes_dropped"] > 0
    assert not targets(bound) & set(BINDINGS)  # every bindable op was bound
    assert aten._assert_tensor_metadata.default not in targets(bound)
    assert aten.dropout.default not in targets(bound)  # eval-mode dropout (GPT-2, BERT)
    assert {aten_op(n) for n in bound.graph.nodes if ATEN in n.meta} <= set(BINDINGS)
    casts = [n for n in bound.graph.nodes if aten_op(n) is aten.to.dtype]
    assert all(n.args[0].meta["val"].dtype != n.args[1] for n in casts)  # the casts left cast
    if dtype == torch.bfloat16 and family in ("llama", "mistral"):
        assert any(n.args[1] == torch.float32 for n in casts)  # RMSNorm's upcast stays


def test_training_dropout_and_real_casts_stay():
    """Dropout with train=True draws a mask; a cast to another dtype computes."""
    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    x.meta["val"] = torch.empty(2, 3)
    dropped = graph.call_function(aten.dropout.default, (x, 0.5, True))
    half = graph.call_function(aten.to.dtype, (dropped, torch.float16))
    same = graph.call_function(aten.to.dtype, (half, torch.float32))
    graph.output(same)
    gm = torch.fx.GraphModule(torch.nn.Module(), graph)
    assert bind_ops(gm) == {"ops_bound": 2, "nodes_dropped": 0, "modules_shortcut": 0}
    assert [aten_op(n) for n in gm.graph.nodes if n.op == "call_function"] == [
        aten.dropout.default, aten.to.dtype, aten.to.dtype]
    torch.manual_seed(0)
    out = gm(torch.ones(2, 3))
    assert out.dtype == torch.float32 and set(out.flatten().tolist()) <= {0.0, 2.0}


def test_module_shortcuts_follow_the_module(tiny):
    """Submodules are found in their parents' __dict__; tensors are still read from the
    module, so moving it (new buffer objects) or replacing a submodule reads the new ones."""
    model = tiny("llama")
    gm = trace(model)
    bind_ops(gm)
    layer = gm.model.layers._modules["0"]
    assert gm.__dict__["model"] is gm.model and layer.__dict__["self_attn"] is layer.self_attn
    assert "weight" not in layer.self_attn.q_proj.__dict__
    x = inputs()
    with torch.no_grad():
        before = main_output(gm(**x))
        gm.to(torch.float64)  # buffers (rotary inv_freq) become new tensors
        assert main_output(gm(**x)).dtype == torch.float64
        torch.testing.assert_close(main_output(gm(**x)).float(), before, atol=1e-5, rtol=1e-5)
        gm.to(torch.float32)
        zero = copy.deepcopy(layer.self_attn.o_proj)
        torch.nn.init.zeros_(zero.weight)
        layer.self_attn.o_proj = zero  # Module.__setattr__ drops the shortcut
        assert layer.__dict__["self_attn"].o_proj is zero
        assert not torch.equal(main_output(gm(**x)), before)


def test_infer_graphs_and_loaded_decoders_are_bound(tiny, tmp_path):
    model = tiny("llama")
    spec = "q_proj,v_proj: lora r=4; ffn: adapter bottleneck=8"
    infer = adaptc.compile(model, spec, "infer", merge=False)
    assert adaptc.report_of(infer).counts["ops_bound"] > 0
    assert not targets(infer) & set(BINDINGS)
    user = {id(m) for m in model.module.modules()}
    assert not user & {id(m) for m in infer.modules()}  # shortcuts never touch user modules
    assert torch.ops.adaptc.bottleneck_adapter.default in targets(infer)  # custom ops stay
    decoder = compile_decoder(model, spec, max_cache_len=24)
    save_decoding(decoder, tmp_path / "decoding")
    loaded = load_decoding(tmp_path / "decoding")
    assert not targets(loaded.graph) & set(BINDINGS)
    assert loaded.generate([3, 1, 4], 6) == decoder.generate([3, 1, 4], 6)


def test_exported_program_binds_to_the_same_outputs(tiny):
    """An infer module's exported program runs aten ops again; bound, it computes the same."""
    from adaptc.export import export_program
    model = tiny("gpt2")  # Conv1D's addmm, eval dropout, a fused bottleneck op
    infer = adaptc.compile(model, "attn: adapter bottleneck=8; c_attn: lora r=4", "infer",
                           merge=False)
    program = export_program(infer, model).module()
    assert set(BINDINGS) & targets(program)
    bound = copy.deepcopy(program)
    bind_ops(bound)
    x = inputs()
    with torch.no_grad():
        want = main_output(program(**x))
        assert torch.equal(main_output(bound(**x)), want)
        torch.testing.assert_close(main_output(infer(**x)), want, atol=1e-6, rtol=1e-6)
