"""The residual-stream add after a fused bottleneck adapter, folded into the op's `skip`
(`fold_stream_adds`): the train graph's outputs, no add left reading an adapter, and no fold
where the adapter's output is read elsewhere or the add broadcasts."""
from __future__ import annotations

import pytest
import torch
from helpers import FAMILIES, inputs
from test_infer import max_diff, trained
from torch.fx import Graph, GraphModule

import adaptc
from adaptc.passes.bind_ops import aten_op
from adaptc.passes.fold_stream_adds import FoldStreamAdds
from adaptc.passes.graph import aten

HOULSBY = "attn.o: adapter bottleneck=8 activation=gelu\nffn: adapter bottleneck=8"
PARALLEL = "attn.o,ffn: adapter bottleneck=8 placement=parallel activation=silu"


def adapter_calls(gm) -> list:
    op = torch.ops.adaptc.bottleneck_adapter.default
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target == op]


@pytest.mark.parametrize("spec", [HOULSBY, PARALLEL])
@pytest.mark.parametrize("family", FAMILIES)
def test_stream_adds_join_the_adapter_op(tiny, tmp_path, family, spec):
    """Every adapter after attention or the FFN (two layers: four) feeds the block's residual
    add (GPT-2 and BERT through eval-mode dropout); all four take it as `skip`. Parallel
    adapters beside Llama's and Mistral's bias-free o_proj and down_proj read the stream as
    their residual instead: `accumulate_updates` added those GEMMs into it first."""
    model = tiny(family)
    train = trained(model, spec, tmp_path / "a.safetensors")
    infer = adaptc.compile(model, spec, "infer", adapters=tmp_path / "a.safetensors")
    x = inputs(segments=family == "bert")
    assert max_diff(infer(**x), train(**x)) <= 1e-5
    assert max_diff(infer(**x), model.module(**x)) > 1e-3
    calls, counts = adapter_calls(infer), adaptc.report_of(infer).counts
    accumulated = 4 if spec == PARALLEL and family in ("llama", "mistral") else 0
    assert counts["stream_adds_accumulated"] == accumulated
    assert counts["stream_adds_folded"] == len(calls) - accumulated == 4 - accumulated
    assert sum(len(call.args) == 8 for call in calls) == 4 - accumulated  # skip given
    assert not [user for call in calls for user in call.users
                if aten_op(user) == aten.add.Tensor]


def test_bf16_fold_stays_close_to_float32(tiny, tmp_path):
    """In bf16 the stream joins the float32 sum, rounded once instead of twice."""
    model = tiny("llama")
    trained(model, HOULSBY, tmp_path / "a.safetensors")
    x = inputs()
    expected = adaptc.compile(model, HOULSBY, "infer", adapters=tmp_path / "a.safetensors")(**x)
    model.module.to(torch.bfloat16)
    infer = adaptc.compile(model, HOULSBY, "infer", adapters=tmp_path / "a.safetensors")
    assert adaptc.report_of(infer).counts["stream_adds_folded"] == 4
    assert max_diff(infer(**x), expected) <= 0.1  # logits O(1); bf16 through two layers


def adapter_graph(stream_shape: tuple[int, ...], second_reader: bool) -> GraphModule:
    """x, s → b = bottleneck_adapter(x, x, …); s + b (and b·2 if asked)."""
    import adaptc.backends.triton  # noqa: F401  registers the op

    torch.manual_seed(0)
    root = torch.nn.Module()
    for name, shape in (("down", (3, 4)), ("down_bias", (3,)), ("up", (4, 3)), ("up_bias", (4,))):
        setattr(root, name, torch.nn.Parameter(torch.randn(shape), requires_grad=False))
    graph = Graph()
    x, s = graph.placeholder("x"), graph.placeholder("s")
    x.meta["val"], s.meta["val"] = torch.empty(2, 4), torch.empty(stream_shape)
    weights = [graph.get_attr(name) for name in ("down", "down_bias", "up", "up_bias")]
    b = graph.call_function(torch.ops.adaptc.bottleneck_adapter.default, (x, x, *weights, "relu"))
    b.meta["val"] = torch.empty(2, 4)
    out = graph.call_function(aten.add.Tensor, (s, b))
    if second_reader:
        out = graph.call_function(aten.add.Tensor, (out, graph.call_function(
            aten.mul.Tensor, (b, 2.0))))
    graph.output(out)
    return GraphModule(root, graph)


@pytest.mark.parametrize(("stream_shape", "second_reader", "folds"),
                         [((2, 4), False, 1), ((2, 4), True, 0), ((4,), False, 0)])
def test_folds_only_a_same_shape_add_that_alone_reads_the_adapter(stream_shape, second_reader,
                                                                  folds):
    gm = adapter_graph(stream_shape, second_reader)
    x, s = torch.randn(2, 4), torch.randn(stream_shape)
    expected = gm(x, s)
    result = FoldStreamAdds().run(gm, None)
    assert result.counts["stream_adds_folded"] == folds
    assert sum(len(call.args) == 8 for call in adapter_calls(result.module)) == folds
    torch.testing.assert_close(result.module(x, s), expected, rtol=1e-6, atol=1e-6)
