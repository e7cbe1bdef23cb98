"""Parity of the MoV op (`mixture_vectors`) with its PyTorch reference and with the eager
MixtureOfVectors, in both of its forms (scaling a site's output, routed on the site's input;
scaling the input itself, `feedforward`), plus column splits, one-expert routing, input
checks, export and compile.

Kernels run under triton's interpreter (see conftest.py). Shapes are deliberately not multiples
of the block sizes (T=37, in=72, n=100, E=5). Ground truth is the eager module in float32
holding the same dtype-rounded values as the kernel inputs, so both pick the same experts.
"""
import pytest
import torch
from torch import nn

from adaptc.backends.triton import column_splits
from adaptc.backends.triton import moe_vectors as op_module
from adaptc.backends.triton.moe_lora import MAX_EXPERTS
from adaptc.backends.triton.moe_vectors import (mixture_vectors_reference,
                                                mixture_vectors_triton)
from adaptc.methods import Ia3Config, MixtureConfig
from adaptc.methods.mixture import MixtureOfVectors

TOKENS, D_IN, N, EXPERTS = 37, 72, 100, 5
TOLERANCES = {  # outputs are O(1); half precision rounds the inputs and the output once
    torch.float32: {"atol": 1e-5, "rtol": 1e-5},
    torch.float16: {"atol": 1e-2, "rtol": 1e-2},
    torch.bfloat16: {"atol": 3e-2, "rtol": 3e-2},
}
FP32 = TOLERANCES[torch.float32]
KERNEL_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TOP_KS = [1, 2, EXPERTS]  # EXPERTS: soft routing


def make_case(top_k: int, dtype: torch.dtype = torch.float32, feedforward: bool = False,
              lead: tuple[int, ...] = (TOKENS,)) -> tuple[MixtureOfVectors, dict]:
    """A float32 MoV site with random vectors rounded to `dtype`; op inputs in `dtype`."""
    torch.manual_seed(0)
    mixture = MixtureConfig(k=top_k, experts=EXPERTS, router="soft" if top_k == EXPERTS else "topk")
    n = D_IN if feedforward else N
    module = MixtureOfVectors(Ia3Config(feedforward=feedforward), mixture, EXPERTS, D_IN, n)
    with torch.no_grad():
        module.vectors.copy_(1 + torch.randn(EXPERTS, n))
    module = module.to(dtype).float().requires_grad_(False)
    x = torch.randn(*lead, D_IN).to(dtype)
    values = x if feedforward else torch.randn(*lead, n).to(dtype)
    return module, {"values": values, "x": x, "router": module.router.to(dtype),
                    "vectors": module.vectors.to(dtype), "top_k": top_k}


def eager(module: MixtureOfVectors, inputs: dict) -> torch.Tensor:
    return module(inputs["values"].float(), inputs["x"].float())


@pytest.mark.parametrize("feedforward", [False, True], ids=["output", "feedforward"])
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("top_k", TOP_KS)
def test_kernel_matches_reference_and_module(top_k: int, dtype: torch.dtype,
                                             feedforward: bool) -> None:
    module, inputs = make_case(top_k, dtype, feedforward)
    out = mixture_vectors_triton(**inputs)
    assert out.dtype == dtype and out.shape == inputs["values"].shape
    torch.testing.assert_close(out, mixture_vectors_reference(**inputs), **TOLERANCES[dtype])
    torch.testing.assert_close(out.float(), eager(module, inputs), **TOLERANCES[dtype])


@pytest.mark.parametrize("splits", [2, 4])
def test_column_splits_give_the_same_output(splits: int) -> None:
    """Programs that share a token block's columns (decoding's grid) each route the tokens
    themselves and write disjoint columns: the result is that of one program per block."""
    module, inputs = make_case(2, lead=(3,))
    out = mixture_vectors_triton(**inputs, splits=splits)
    assert torch.equal(out, mixture_vectors_triton(**inputs, splits=1))
    torch.testing.assert_close(out, eager(module, inputs), **FP32)


def test_column_splits_fill_the_device_and_no_more() -> None:
    cpu = torch.device("cpu")
    assert column_splits(token_blocks=1, column_blocks=16, device=cpu) == 1
    assert column_splits(token_blocks=0, column_blocks=16, device=cpu) == 1
    if torch.cuda.is_available():
        sms = torch.cuda.get_device_properties(0).multi_processor_count
        gpu = torch.device("cuda", 0)
        assert column_splits(1, 1000, gpu) == 2 * sms
        assert column_splits(1, 4, gpu) == 4
        assert column_splits(2 * sms, 16, gpu) == 1
        assert column_splits(2 * sms - 1, 16, gpu) == 1  # the token blocks nearly fill it


def test_column_splits_aim_at_the_programs_per_multiprocessor_asked(monkeypatch) -> None:
    """The bottleneck kernel's configs choose 2, 1 or 0 programs per multiprocessor (0: no
    split); a 132-multiprocessor device stands in for the GPU."""
    import adaptc.backends.triton as triton_ops
    monkeypatch.setattr(triton_ops, "multiprocessors", lambda device: 132)
    gpu = torch.device("cuda")
    assert column_splits(64, 16, gpu) == 4
    assert column_splits(64, 16, gpu, per_multiprocessor=1) == 2
    assert column_splits(64, 16, gpu, per_multiprocessor=0) == 1
    assert column_splits(200, 16, gpu, per_multiprocessor=1) == 1


@pytest.mark.parametrize("top_k", [1, 2])
def test_all_tokens_routed_to_the_same_experts(top_k: int) -> None:
    module, inputs = make_case(top_k)
    inputs["x"] = torch.rand(TOKENS, D_IN) + 0.1  # positive: the logit order is that of `weight`
    weight = torch.tensor([-1.0, -2.0, 3.0, -3.0, 1.0])  # expert 2 first, then expert 4
    inputs["router"] = weight[:, None] * torch.full((EXPERTS, D_IN), 0.05)
    module.router.copy_(inputs["router"])
    gates, _ = module.gates(inputs["x"])
    assert set(gates.nonzero()[:, 1].tolist()) == ({2} if top_k == 1 else {2, 4})
    out = mixture_vectors_triton(**inputs)
    torch.testing.assert_close(out, eager(module, inputs), **FP32)
    if top_k == 1:  # one expert, gate 1: exactly that expert's vector
        torch.testing.assert_close(out, inputs["values"] * inputs["vectors"][2], **FP32)


def test_op_runs_kernel_on_leading_dims_and_no_tokens() -> None:
    module, inputs = make_case(2, lead=(3, 5))
    out = torch.ops.adaptc.mixture_vectors(**inputs)
    torch.testing.assert_close(out, eager(module, inputs), **FP32)
    _, empty = make_case(2, lead=(0,))
    assert torch.ops.adaptc.mixture_vectors(**empty).shape == (0, N)


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
def test_reference_path_matches_module(monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype) -> None:
    monkeypatch.delenv("TRITON_INTERPRET")
    monkeypatch.setattr(op_module, "mixture_vectors_triton", None)  # the kernel must not run
    module, inputs = make_case(2, dtype)
    out = torch.ops.adaptc.mixture_vectors(**inputs)
    torch.testing.assert_close(out.float(), eager(module, inputs), **TOLERANCES[dtype])


@pytest.mark.parametrize(("change", "error", "names"), [
    ({"top_k": EXPERTS + 1}, ValueError, "top_k"),
    ({"top_k": 0}, ValueError, "top_k"),
    ({"vectors": torch.ones(MAX_EXPERTS + 1, N), "router": torch.zeros(MAX_EXPERTS + 1, D_IN)},
     ValueError, "experts"),
    ({"vectors": torch.ones(EXPERTS, N, 1)}, ValueError, "`vectors`"),
    ({"router": torch.zeros(EXPERTS, D_IN + 1)}, ValueError, "`router`"),
    ({"vectors": torch.ones(EXPERTS, N, dtype=torch.float16)}, TypeError, "`vectors`"),
    ({"values": torch.zeros(TOKENS + 1, N)}, ValueError, "`values`"),
    ({"x": torch.zeros(TOKENS, D_IN, dtype=torch.long)}, TypeError, "`x`"),
])
@pytest.mark.usefixtures("interpret")  # both paths: kernels and reference
def test_rejects_bad_inputs_naming_them(change: dict, error: type, names: str) -> None:
    _, inputs = make_case(2)
    with pytest.raises(error, match=names):
        torch.ops.adaptc.mixture_vectors(**{**inputs, **change})


class VectorsSite(nn.Module):
    """A linear site whose output the custom op scales by routed vectors."""

    def __init__(self, mixture: MixtureOfVectors):
        super().__init__()
        self.base = nn.Linear(D_IN, N)
        self.mixture = mixture

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.mixture
        return torch.ops.adaptc.mixture_vectors(self.base(x), x, m.router, m.vectors, m.top_k)


def test_exported_program_keeps_op_and_matches_eager() -> None:
    module, inputs = make_case(2)
    site = VectorsSite(module).eval()
    exported = torch.export.export(site, (inputs["x"],))
    assert torch.ops.adaptc.mixture_vectors.default in {n.target for n in exported.graph.nodes}
    expected = module(site.base(inputs["x"]), inputs["x"])
    torch.testing.assert_close(exported.module()(inputs["x"]), expected, **FP32)


@torch.no_grad()  # inference only: the op has no autograd formula
def test_compiles_in_one_graph() -> None:
    module, inputs = make_case(EXPERTS)
    site = VectorsSite(module).eval()
    compiled = torch.compile(site, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(inputs["x"]), site(inputs["x"]), **FP32)
