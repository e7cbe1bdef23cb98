"""Unmerged LoRA updates added in place by their B GEMM (`accumulate_updates`): the same
outputs as the train graph, one addmm_ per site instead of a GEMM and an add, and no rewrite
where the base output is read elsewhere or the dtypes differ."""
from __future__ import annotations

import pytest
import torch
from helpers import FAMILIES, inputs
from test_fuse_siblings import unmerged
from test_infer import ROOT, max_diff, trained
from torch.fx import Graph, GraphModule, Node

import adaptc
from adaptc.frontend.models import build_preset
from adaptc.passes import accumulate_updates
from adaptc.passes.accumulate_updates import AccumulateUpdates, add_product_
from adaptc.passes.base import INSERTED
from adaptc.passes.bind_ops import aten_op
from adaptc.passes.graph import aten

ALL_LINEAR = "attn.*,ffn.*: lora r=4 alpha=12"


def accumulated(gm, method: str | None = "lora") -> int:
    """In-place GEMMs at LoRA sites (`method` "lora": one adding a LoRA update, or a base GEMM
    adding into its site's update) or adding base products into a residual stream (None)."""
    def site(node) -> str | None:
        return node.meta.get(INSERTED) or ("lora" if lora_update(node.args[0]) else None)
    return sum(n.op == "call_function" and n.target is add_product_ and site(n) == method
               for n in gm.graph.nodes)


def lora_update(node) -> bool:
    """A LoRA B GEMM, before or after bind_ops."""
    return node.meta.get(INSERTED) == "lora" and aten_op(node) == aten.linear.default


def base_gemms_into_updates(gm) -> int:
    """In-place GEMMs adding a base product into a LoRA update's output."""
    return sum(n.op == "call_function" and n.target is add_product_
               and lora_update(n.args[0]) for n in gm.graph.nodes)


def adds_of_lora_updates(gm) -> int:
    """Adds with a B GEMM operand: what the pass replaces."""
    return sum(n.op == "call_function" and aten_op(n) == aten.add.Tensor
               and any(isinstance(a, Node) and lora_update(a) for a in n.args)
               for n in gm.graph.nodes)


@pytest.fixture(scope="module")
def all_linear(tmp_path_factory):
    """family → (model, train graph, unmerged infer graph, adapter file) of ALL_LINEAR,
    compiled once per module for the tests that read them (none modifies them)."""
    compiled = {}

    def get(family: str):
        if family not in compiled:
            model = build_preset(family, layers=2)
            path = tmp_path_factory.mktemp(family) / "a.safetensors"
            train, infer = trained(model, ALL_LINEAR, path), unmerged(model, ALL_LINEAR, path)
            compiled[family] = model, train, infer, path
        return compiled[family]
    return get


@pytest.mark.parametrize("family", FAMILIES)
def test_unmerged_updates_are_added_by_their_gemm(family, all_linear):
    model, train, infer, _ = all_linear(family)
    x = inputs()
    assert max_diff(infer(**x), train(**x)) <= 1e-5
    counts = adaptc.report_of(infer).counts
    assert counts["lora_updates_accumulated"] == accumulated(infer)
    assert adds_of_lora_updates(infer) == 0
    assert accumulated(infer) == counts["lora_inserted"]  # GPT-2's base GEMMs are addmm
    assert base_gemms_into_updates(infer) == 0  # on the CPU the B GEMM adds into y


@pytest.mark.parametrize("family", FAMILIES)
def test_on_a_gpu_the_base_gemm_adds_into_the_update(family, monkeypatch, all_linear):
    """Where the GEMM with the longer reduction adds into the other's output (a GPU's choice,
    here forced on the CPU): at q, k, v, gate and up (2 layers) the bias-free base GEMM adds
    into the B GEMM's output; o and down add both into the stream; biased base GEMMs (GPT-2,
    BERT) keep y as the target."""
    model, train, _, weights = all_linear(family)
    monkeypatch.setattr(accumulate_updates, "INTO_SHORTER_ON", {"cpu"})
    infer = unmerged(model, ALL_LINEAR, weights)
    x = inputs(segments=family == "bert")
    assert max_diff(infer(**x), train(**x)) <= 1e-5
    assert base_gemms_into_updates(infer) == (10 if family in ("llama", "mistral") else 0)
    counts = adaptc.report_of(infer).counts
    assert accumulated(infer) == counts["lora_updates_accumulated"] == counts["lora_inserted"]
    assert adds_of_lora_updates(infer) == 0


def test_bf16_unmerged_stays_close_to_float32(tiny, all_linear):
    """In bf16 the in-place GEMM rounds y + h·Bᵀ once, in its float32 accumulator."""
    _, _, reference, weights = all_linear("llama")
    x = inputs()
    expected = reference(**x)
    model = tiny("llama")  # a copy of the shared model, to convert
    model.module.to(torch.bfloat16)
    infer = unmerged(model, ALL_LINEAR, weights)
    assert accumulated(infer) == adaptc.report_of(infer).counts["lora_inserted"]
    assert max_diff(infer(**x), expected) <= 0.1  # logits O(1); bf16 through two layers


def site_graph(second_reader: bool, weight_dtype=torch.float32) -> GraphModule:
    """x → y = linear(x, W); u = linear(x, B) (a LoRA update); y + u (and y·2 if asked)."""
    root = torch.nn.Module()
    root.W = torch.nn.Parameter(torch.randn(6, 4), requires_grad=False)
    root.B = torch.nn.Parameter(torch.randn(6, 4).to(weight_dtype), requires_grad=False)
    graph = Graph()
    x = graph.placeholder("x")
    y = graph.call_function(aten.linear.default, (x, graph.get_attr("W")))
    y.meta["val"] = torch.empty(3, 6)
    u = graph.call_function(aten.linear.default, (x, graph.get_attr("B")))
    u.meta[INSERTED] = "lora"
    out = graph.call_function(aten.add.Tensor, (y, u))
    out.meta["val"] = torch.empty(3, 6)
    if second_reader:
        out = graph.call_function(aten.add.Tensor, (out, graph.call_function(
            aten.mul.Tensor, (y, 2.0))))
    graph.output(out)
    return GraphModule(root, graph)


def test_rewrites_only_a_fresh_output_nothing_else_reads():
    x = torch.randn(3, 4)
    gm = site_graph(second_reader=False)
    expected = gm(x)
    assert AccumulateUpdates().run(gm, None).counts == {"lora_updates_accumulated": 1,
                                                        "stream_adds_accumulated": 0}
    torch.testing.assert_close(gm(x), expected, rtol=1e-6, atol=1e-6)
    assert accumulated(gm) == 1 and adds_of_lora_updates(gm) == 0
    for kept in (site_graph(second_reader=True), site_graph(False, torch.float64)):
        assert AccumulateUpdates().run(kept, None).counts["lora_updates_accumulated"] == 0


def test_exported_program_of_an_accumulating_graph_matches(all_linear):
    infer = all_linear("llama")[2]
    x = inputs()
    exported = torch.export.export(infer, (), x)
    assert torch.ops.aten.addmm_.default in {n.target for n in exported.graph.nodes}
    assert max_diff(exported.module()(**x), infer(**x)) <= 1e-6


@pytest.mark.parametrize("family", FAMILIES)
def test_residual_adds_take_the_sublayers_last_gemm(family, all_linear):
    """stream + o_proj(·) and stream + down_proj(·) become stream.addmm_ (two per layer, two
    layers), merged or not (then the LoRA update joins the same stream); GPT-2's and BERT's
    projections have biases and keep their adds."""
    model, train, kept, weights = all_linear(family)
    x = inputs(segments=family == "bert")
    expected = 4 if family in ("llama", "mistral") else 0
    for infer in (adaptc.compile(model, ALL_LINEAR, "infer", adapters=weights), kept):
        assert max_diff(infer(**x), train(**x)) <= 1e-5
        assert adaptc.report_of(infer).counts["stream_adds_accumulated"] == expected
        assert accumulated(infer, None) == expected


def test_quantized_blocks_after_the_first_accumulate_too(tiny, tmp_path):
    """QLoRA: every layer's o_proj and down_proj read a dequantised weight. Block reuse copied
    layer 0's weight nodes for the other layers without their fake values, so there only
    layer 0's adds accumulated (2 of 4), the shape check finding no weight shape."""
    spec = "*_proj: quantize; *_proj: lora r=4"
    model = tiny("llama")
    train = trained(model, spec, tmp_path / "a.safetensors")
    x = inputs()
    for merge in (True, False):
        infer = adaptc.compile(model, spec, "infer", adapters=tmp_path / "a.safetensors",
                               merge=merge)
        assert max_diff(infer(**x), train(**x)) <= 1e-5
        assert adaptc.report_of(infer).counts["stream_adds_accumulated"] == 4


def stream_graph(later_reader: bool, input_is_view: bool) -> GraphModule:
    """x → s = x + x; n = s·2 (read before); y = linear(n, W) (or of a view of s); s + y
    (and + s·3 after, if asked)."""
    root = torch.nn.Module()
    root.W = torch.nn.Parameter(torch.randn(4, 4), requires_grad=False)
    graph = Graph()
    x = graph.placeholder("x")
    s = graph.call_function(aten.add.Tensor, (x, x))
    n = graph.call_function(aten.mul.Tensor, (s, 2.0))
    h = graph.call_function(aten.view.default, (s, [3, 4])) if input_is_view else n
    y = graph.call_function(aten.linear.default, (h, graph.get_attr("W")))
    out = graph.call_function(aten.add.Tensor, (s, y))
    if later_reader:
        out = graph.call_function(aten.add.Tensor, (out, graph.call_function(
            aten.mul.Tensor, (s, 3.0))))
    for node, shape in ((x, (3, 4)), (s, (3, 4)), (n, (3, 4)), (h, (3, 4)), (y, (3, 4)),
                        (out, (3, 4))):
        node.meta["val"] = torch.empty(shape)
    graph.output(out)
    return GraphModule(root, graph)


@pytest.mark.parametrize(("later_reader", "input_is_view", "rewrites"),
                         [(False, False, 1), (True, False, 0), (False, True, 0)])
def test_stream_updates_in_place_only_when_no_one_sees_it(later_reader, input_is_view,
                                                          rewrites):
    """The stream is updated in place only if nothing reads it after the add and the GEMM's
    input is not a view of it."""
    gm = stream_graph(later_reader, input_is_view)
    x = torch.randn(3, 4)
    expected = gm(x)
    assert AccumulateUpdates().run(gm, None).counts["stream_adds_accumulated"] == rewrites
    assert accumulated(gm, None) == rewrites
    torch.testing.assert_close(gm(x), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(("spec", "on_stream"), [
    ("o_proj,down_proj: lora r=4\nmixture moe k=2 experts=3", 4),  # o, down × 2 layers
    (str(ROOT / "specs/loramoe.adapt"), 2)])  # down × 2 (and o_proj's plain add × 2)
def test_mixtures_after_o_and_down_read_the_updated_stream(tiny, tmp_path, spec, on_stream):
    """stream + (o_proj(a) + moe(a)) → (stream += a·W_oᵀ) + moe(a): the GEMM adds into the
    stream and the fused mixture op takes it as its residual (LoRAMoE's FFN mixtures)."""
    model = tiny("llama")
    train = trained(model, spec, tmp_path / "a.safetensors")
    infer = adaptc.compile(model, spec, "infer", adapters=tmp_path / "a.safetensors")
    x = inputs()
    assert max_diff(infer(**x), train(**x)) <= 1e-5
    assert max_diff(infer(**x), model.module(**x)) > 1e-3
    counts = adaptc.report_of(infer).counts
    assert counts["stream_adds_accumulated"] == accumulated(infer, None) == 4
    mixtures = [n for n in infer.graph.nodes
                if n.target == torch.ops.adaptc.mixture_lora.default]
    assert sum(call.args[1].target is add_product_ for call in mixtures) == on_stream
