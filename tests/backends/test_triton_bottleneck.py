"""Parity of the fused bottleneck-adapter op with its PyTorch reference and with the eager
BottleneckAdapter (`residual + module(x)`), plus dispatch, input checks, export and compile.

Kernels run under triton's interpreter (see conftest.py). Shapes are deliberately not multiples
of the block sizes. Ground truth is the eager module in float32 holding the same dtype-rounded
values as the kernel inputs.
"""
import pytest
import torch
import triton
from torch import nn

from adaptc.backends.triton import bottleneck as op_module
from adaptc.backends.triton import cdiv, next_power_of_2, token_bucket, upcast_dot, use_triton
from adaptc.backends.triton.bottleneck import (bottleneck_adapter_reference,
                                               bottleneck_adapter_triton)
from adaptc.methods import AdapterConfig, BottleneckAdapter

TOKENS, D_IN, D_OUT, BOTTLENECK = 37, 72, 100, 24
WIDE_BOTTLENECK = 136  # > MAX_FUSED_BOTTLENECK: the two-launch path
TOLERANCES = {  # outputs are O(1); half precision rounds the hidden state and the output once each
    torch.float32: {"atol": 1e-5, "rtol": 1e-5},
    torch.float16: {"atol": 1e-2, "rtol": 1e-2},
    torch.bfloat16: {"atol": 2e-2, "rtol": 2e-2},  # interpreted: 7.6e-3 needed, ~1 ulp
}
FP32 = TOLERANCES[torch.float32]
KERNEL_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def make_case(activation: str = "gelu", bottleneck: int = BOTTLENECK,
              dtype: torch.dtype = torch.float32,
              lead: tuple[int, ...] = (TOKENS,)) -> tuple[BottleneckAdapter, dict]:
    """A float32 adapter with random non-zero weights rounded to `dtype`; op inputs in `dtype`."""
    torch.manual_seed(0)
    config = AdapterConfig(bottleneck=bottleneck, activation=activation)
    adapter = BottleneckAdapter(config, D_IN, D_OUT)
    with torch.no_grad():
        adapter.down_bias.copy_(torch.randn(bottleneck) * 0.5)
        adapter.up.copy_(torch.randn(D_OUT, bottleneck) / bottleneck**0.5)
        adapter.up_bias.copy_(torch.randn(D_OUT) * 0.5)
    adapter = adapter.to(dtype).float().requires_grad_(False)
    inputs = {"x": torch.randn(*lead, D_IN).to(dtype),
              "residual": torch.randn(*lead, D_OUT).to(dtype),
              **{name: p.to(dtype) for name, p in adapter.named_parameters()},
              "activation": activation}
    return adapter, inputs


def eager(adapter: BottleneckAdapter, inputs: dict) -> torch.Tensor:
    return inputs["residual"].float() + adapter(inputs["x"].float())


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("activation", ["relu", "gelu", "silu", "tanh"])
def test_fused_kernel_matches_reference_and_module(activation: str, dtype: torch.dtype) -> None:
    adapter, inputs = make_case(activation, dtype=dtype)
    out = bottleneck_adapter_triton(**inputs)
    assert out.dtype == dtype and out.shape == (TOKENS, D_OUT)
    torch.testing.assert_close(out, bottleneck_adapter_reference(**inputs), **TOLERANCES[dtype])
    torch.testing.assert_close(out.float(), eager(adapter, inputs), **TOLERANCES[dtype])


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
def test_wide_bottleneck_takes_two_launches_and_matches(dtype: torch.dtype) -> None:
    adapter, inputs = make_case("silu", WIDE_BOTTLENECK, dtype)
    out = bottleneck_adapter_triton(**inputs)
    torch.testing.assert_close(out, bottleneck_adapter_reference(**inputs), **TOLERANCES[dtype])
    torch.testing.assert_close(out.float(), eager(adapter, inputs), **TOLERANCES[dtype])


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("bottleneck", [BOTTLENECK, WIDE_BOTTLENECK])
def test_skip_is_added_in_the_epilogue(bottleneck: int, dtype: torch.dtype) -> None:
    """`skip` (the residual stream), read through strides (a transposed view here), joins the
    sum in float32 on both paths: the eager `skip + (residual + adapter(x))` up to rounding."""
    adapter, inputs = make_case("gelu", bottleneck, dtype)
    skip = torch.randn(D_OUT, TOKENS).to(dtype).t()
    out = bottleneck_adapter_triton(**inputs, skip=skip)
    torch.testing.assert_close(out, bottleneck_adapter_reference(**inputs, skip=skip),
                               **TOLERANCES[dtype])
    torch.testing.assert_close(out.float(), skip.float() + eager(adapter, inputs),
                               **TOLERANCES[dtype])
    assert (out.float() - bottleneck_adapter_triton(**inputs).float()).abs().max() > 1


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("bottleneck", [BOTTLENECK, WIDE_BOTTLENECK])
def test_scale_and_gate_multiply_the_update_on_both_paths(bottleneck: int,
                                                          dtype: torch.dtype) -> None:
    """MAM's output scale and UniPELT's per-example gate [B, 1, 1] multiply the adapter's
    update before the residual (and skip) join it: the eager `residual + adapter(x)·s·g`."""
    adapter, inputs = make_case("relu", bottleneck, dtype, lead=(3, 7))
    gate = torch.rand(3, 1, 1).to(dtype)
    skip = torch.randn(3, 7, D_OUT).to(dtype)
    out = bottleneck_adapter_triton(**inputs, skip=skip, scale=4.0, gate=gate)
    torch.testing.assert_close(out, bottleneck_adapter_reference(**inputs, skip=skip, scale=4.0,
                                                                 gate=gate),
                               **TOLERANCES[dtype])
    expected = skip.float() + inputs["residual"].float() \
        + adapter(inputs["x"].float()) * 4.0 * gate.float()
    tolerance = {k: 4 * v for k, v in TOLERANCES[dtype].items()}  # the update is 4x as large
    torch.testing.assert_close(out.float(), expected, **tolerance)
    unscaled = bottleneck_adapter_triton(**inputs, skip=skip)
    assert (out.float() - unscaled.float()).abs().max() > 1


def test_a_gate_of_one_token_per_row_and_a_single_example() -> None:
    """A gate already one factor per token, and one of a single example (whose flattened
    view would have stride 0), read as the reference does."""
    adapter, inputs = make_case("gelu", lead=(1, 9))
    for gate in (torch.rand(1, 9, 1), torch.rand(1, 1, 1)):
        torch.testing.assert_close(bottleneck_adapter_triton(**inputs, gate=gate),
                                   bottleneck_adapter_reference(**inputs, gate=gate), **FP32)


@pytest.mark.parametrize("splits", [2, 3])
def test_programs_sharing_a_token_block_give_the_same_output(splits: int) -> None:
    """Decoding's grid: several programs per token block, each redoing the down-projection
    and writing its own d_out tiles (D_OUT=100 is four 32-column tiles: 3 splits take 2, 1,
    1), equal to one program per block."""
    adapter, inputs = make_case("gelu", lead=(3,))
    out = bottleneck_adapter_triton(**inputs, splits=splits)
    assert torch.equal(out, bottleneck_adapter_triton(**inputs, splits=1))
    torch.testing.assert_close(out.float(), eager(adapter, inputs), **FP32)


def test_later_calls_launch_the_chosen_config_directly(monkeypatch: pytest.MonkeyPatch) -> None:
    """The first call of a problem and token bucket goes through the autotuner, which records
    its config; the next ones of that bucket (other token counts, other values) launch the JIT
    function with it and match."""
    from adaptc.backends import triton as backend
    monkeypatch.setattr(backend, "CHOSEN", {})
    tuned = []
    run = op_module._bottleneck_fused_kernel.run
    monkeypatch.setattr(op_module._bottleneck_fused_kernel, "run",
                        lambda *a, **k: tuned.append(1) or run(*a, **k))
    for lead in [(TOKENS,), (5,), (2, 3)]:
        adapter, inputs = make_case("relu", lead=lead)
        inputs["x"] = inputs["x"] + len(lead)  # other values each time
        out = bottleneck_adapter_triton(**inputs)
        torch.testing.assert_close(out, bottleneck_adapter_reference(**inputs), **FP32)
    assert tuned == [1, 1]  # 37 tokens, then 5; 6 shares the bucket of 5
    assert list(backend.CHOSEN) == [(op_module._bottleneck_fused_kernel,
                                     (D_IN, D_OUT, BOTTLENECK, torch.float32, bucket))
                                    for bucket in (64, 8)]


def test_token_buckets_are_powers_of_two_up_to_16384() -> None:
    assert [token_bucket(t) for t in (0, 1, 2, 3, 16, 17, 4096, 4099, 1 << 20)] == \
        [1, 1, 2, 4, 16, 32, 4096, 8192, 16384]


def test_host_side_grid_helpers_agree_with_triton() -> None:
    """The plain cdiv / next_power_of_2 the launches call, against triton's own."""
    assert [next_power_of_2(n) for n in range(1, 5000)] == \
        [triton.next_power_of_2(n) for n in range(1, 5000)]
    assert next_power_of_2(0) == 1
    assert all(cdiv(a, b) == triton.cdiv(a, b) for a in range(300) for b in range(1, 40))


def test_op_runs_kernels_on_leading_dims_and_no_tokens() -> None:
    adapter, inputs = make_case("tanh", lead=(3, 5))
    out = torch.ops.adaptc.bottleneck_adapter(**inputs)
    torch.testing.assert_close(out, eager(adapter, inputs), **FP32)
    _, empty = make_case(lead=(0,))
    assert torch.ops.adaptc.bottleneck_adapter(**empty).shape == (0, D_OUT)


def test_dispatch_follows_device_and_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    x = torch.zeros(2, 3)
    assert use_triton(x) and use_triton(x.bfloat16())
    assert upcast_dot(x.bfloat16()) and not upcast_dot(x) and not upcast_dot(x.half())
    monkeypatch.delenv("TRITON_INTERPRET")
    assert not use_triton(x) and not upcast_dot(x.bfloat16())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_reference_path_matches_module(monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype) -> None:
    monkeypatch.delenv("TRITON_INTERPRET")
    monkeypatch.setattr(op_module, "bottleneck_adapter_triton", None)  # the kernels must not run
    adapter, inputs = make_case("relu", dtype=dtype)
    out = torch.ops.adaptc.bottleneck_adapter(**inputs)
    torch.testing.assert_close(out.float(), eager(adapter, inputs), **TOLERANCES[dtype])


@pytest.mark.parametrize(("change", "error", "names"), [
    ({"up": torch.zeros(D_OUT, BOTTLENECK + 1)}, ValueError, "`up`"),
    ({"residual": torch.zeros(TOKENS, D_OUT + 1)}, ValueError, "`residual`"),
    ({"skip": torch.zeros(TOKENS, D_OUT, dtype=torch.float64)}, TypeError, "`skip`"),
    ({"down_bias": torch.zeros(BOTTLENECK, dtype=torch.float16)}, TypeError, "`down_bias`"),
    ({"x": torch.zeros(TOKENS, D_IN, dtype=torch.int64)}, TypeError, "`x`"),
    ({"activation": "swish"}, ValueError, "swish"),
    ({"gate": torch.zeros(TOKENS, 2)}, ValueError, "`gate`"),
    ({"gate": torch.zeros(TOKENS, 1, dtype=torch.float16)}, TypeError, "`gate`"),
])
@pytest.mark.usefixtures("interpret")  # both paths: kernels and reference
def test_rejects_bad_inputs_naming_them(change: dict, error: type, names: str) -> None:
    _, inputs = make_case()
    with pytest.raises(error, match=names):
        torch.ops.adaptc.bottleneck_adapter(**{**inputs, **change})


class AdapterSite(nn.Module):
    """A linear site whose output gets a parallel bottleneck adapter through the custom op."""

    def __init__(self, adapter: BottleneckAdapter):
        super().__init__()
        self.base = nn.Linear(D_IN, D_OUT)
        self.adapter = adapter

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.adapter
        return torch.ops.adaptc.bottleneck_adapter(x, self.base(x), a.down, a.down_bias, a.up,
                                                   a.up_bias, a.config.activation)


def test_exported_program_keeps_op_and_matches_eager() -> None:
    adapter, inputs = make_case("gelu")
    site = AdapterSite(adapter).eval()
    exported = torch.export.export(site, (inputs["x"],))
    targets = {node.target for node in exported.graph.nodes}
    assert torch.ops.adaptc.bottleneck_adapter.default in targets
    expected = site.base(inputs["x"]) + adapter(inputs["x"])
    torch.testing.assert_close(exported.module()(inputs["x"]), expected, **FP32)


@torch.no_grad()  # inference only: the op has no autograd formula
def test_compiles_in_one_graph() -> None:
    adapter, inputs = make_case("silu")
    site = AdapterSite(adapter).eval()
    compiled = torch.compile(site, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(inputs["x"]), site(inputs["x"]), **FP32)
