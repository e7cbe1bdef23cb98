"""Parity of the mixture-of-LoRA op's kernel paths (per-token, stacked, grouped) with its
PyTorch reference and with the eager MixtureOfLora (`residual + module(x)`, gates from
`module.gates`), plus routing, grouping, dispatch, input checks, export and compile.

Kernels run under triton's interpreter (see conftest.py). Shapes are deliberately not multiples
of the block sizes (T=37, in=72, out=100, E=5, r=3; the per-token kernel, one program per token
and out block, gets FEW=5 tokens to keep the interpreter quick). Ground truth is the eager
module in float32 holding the same dtype-rounded values as the kernel inputs, so both pick the
same experts.
"""
import pytest
import torch
from torch import nn

from adaptc.backends.triton import moe_lora as op_module
from adaptc.backends.triton.moe_lora import (MAX_EXPERTS, PER_TOKEN_MAX_TOKENS,
                                             STACKED_MAX_COLUMNS, choose_path,
                                             mixture_lora_reference, mixture_lora_triton,
                                             route_tokens, sort_by_expert, stacked_step)
from adaptc.methods import LoraConfig, MixtureConfig, MixtureOfLora

TOKENS, D_IN, D_OUT, EXPERTS, RANK = 37, 72, 100, 5, 3
LORA = LoraConfig(r=RANK, alpha=6.0)  # scale 2
TOLERANCES = {  # outputs are O(1); half precision rounds x·A, the update and the output
    torch.float32: {"atol": 1e-5, "rtol": 1e-5},
    torch.float16: {"atol": 1e-2, "rtol": 1e-2},
    torch.bfloat16: {"atol": 3e-2, "rtol": 3e-2},  # interpreted: 1.3e-2 needed (top_k=1)
}
FP32 = TOLERANCES[torch.float32]
KERNEL_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TOP_KS = [1, 2, EXPERTS]  # EXPERTS: soft routing
FEW = 5


def make_case(top_k: int, dtype: torch.dtype = torch.float32,
              lead: tuple[int, ...] = (TOKENS,)) -> tuple[MixtureOfLora, dict]:
    """A float32 mixture with random non-zero weights rounded to `dtype`; op inputs in `dtype`."""
    torch.manual_seed(0)
    mixture = MixtureConfig(k=top_k, experts=EXPERTS, router="soft" if top_k == EXPERTS else "topk")
    module = MixtureOfLora(LORA, mixture, EXPERTS, D_IN, D_OUT)
    with torch.no_grad():
        module.B.copy_(torch.randn(EXPERTS, D_OUT, RANK))
    module = module.to(dtype).float().requires_grad_(False)
    inputs = {"x": torch.randn(*lead, D_IN).to(dtype),
              "residual": torch.randn(*lead, D_OUT).to(dtype),
              "router": module.router.to(dtype), "A": module.A.to(dtype), "B": module.B.to(dtype),
              "scale": module.scale, "top_k": top_k}
    return module, inputs


def eager(module: MixtureOfLora, inputs: dict) -> torch.Tensor:
    return inputs["residual"].float() + module(inputs["x"].float())


@pytest.mark.parametrize("top_k", TOP_KS)
def test_router_kernel_matches_module_gates(top_k: int) -> None:
    module, inputs = make_case(top_k)
    gates, chosen, counts = route_tokens(inputs["x"], inputs["router"], top_k)
    expected, _ = module.gates(inputs["x"])
    torch.testing.assert_close(gates, expected, **FP32)
    assert torch.equal(chosen.long(), expected.topk(top_k, dim=-1).indices)
    # counts summed over the router kernel's programs (T=37: three blocks of 16 tokens)
    assert counts.tolist() == torch.bincount(chosen.flatten(), minlength=EXPERTS).tolist()


@pytest.mark.parametrize("path", ["stacked", "grouped"])
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("top_k", TOP_KS)
def test_kernels_match_reference_and_module(top_k: int, dtype: torch.dtype, path: str) -> None:
    module, inputs = make_case(top_k, dtype)
    out = mixture_lora_triton(**inputs, path=path)
    assert out.dtype == dtype and out.shape == (TOKENS, D_OUT)
    torch.testing.assert_close(out, mixture_lora_reference(**inputs), **TOLERANCES[dtype])
    torch.testing.assert_close(out.float(), eager(module, inputs), **TOLERANCES[dtype])


@pytest.mark.parametrize(("top_k", "dtype"), [(1, torch.float32), (EXPERTS, torch.float32)] +
                         [(2, dtype) for dtype in KERNEL_DTYPES], ids=str)
def test_per_token_kernel_matches_reference_and_module(top_k: int, dtype: torch.dtype) -> None:
    module, inputs = make_case(top_k, dtype, lead=(FEW,))
    out = mixture_lora_triton(**inputs, path="per-token")
    assert out.dtype == dtype and out.shape == (FEW, D_OUT)
    torch.testing.assert_close(out, mixture_lora_reference(**inputs), **TOLERANCES[dtype])
    torch.testing.assert_close(out.float(), eager(module, inputs), **TOLERANCES[dtype])
    for path in ("stacked", "grouped"):
        torch.testing.assert_close(out, mixture_lora_triton(**inputs, path=path),
                                   **TOLERANCES[dtype])


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
def test_stacked_expand_steps_through_the_columns(dtype: torch.dtype) -> None:
    """E·r = 40 stacked columns (a 64-wide block, masked past 40): float32 takes them 16 per
    dot, in four steps; half precision in one."""
    torch.manual_seed(0)
    experts, rank = 8, 5
    inputs = {"x": torch.randn(TOKENS, D_IN).to(dtype),
              "residual": torch.randn(TOKENS, D_OUT).to(dtype),
              "router": torch.randn(experts, D_IN).to(dtype),
              "A": (torch.randn(experts, rank, D_IN) / D_IN**0.5).to(dtype),
              "B": torch.randn(experts, D_OUT, rank).to(dtype), "scale": 2.0, "top_k": 3}
    assert stacked_step(64, dtype) == (16 if dtype == torch.float32 else 64)
    torch.testing.assert_close(mixture_lora_triton(**inputs, path="stacked"),
                               mixture_lora_reference(**inputs), **TOLERANCES[dtype])


def test_op_chooses_its_path_by_tokens_and_width(monkeypatch: pytest.MonkeyPatch) -> None:
    """Up to PER_TOKEN_MAX_TOKENS tokens: one launch; more: stacked while E·r ≤
    STACKED_MAX_COLUMNS, else grouped (the only path that sorts)."""
    assert choose_path(PER_TOKEN_MAX_TOKENS, 64, 64) == "per-token"
    assert choose_path(PER_TOKEN_MAX_TOKENS + 1, 8, STACKED_MAX_COLUMNS // 8) == "stacked"
    assert choose_path(PER_TOKEN_MAX_TOKENS + 1, 8, STACKED_MAX_COLUMNS // 8 + 1) == "grouped"
    taken = []
    for name in ("_per_token", "_stacked", "sort_by_expert"):
        monkeypatch.setattr(op_module, name, lambda *a, name=name, run=getattr(op_module, name):
                            taken.append(name) or run(*a))
    for lead in ((1, FEW), (PER_TOKEN_MAX_TOKENS + 1,)):
        module, inputs = make_case(2, lead=lead)
        torch.testing.assert_close(torch.ops.adaptc.mixture_lora(**inputs),
                                   eager(module, inputs), **FP32)
    assert taken == ["_per_token", "_stacked"]
    monkeypatch.setattr(op_module, "STACKED_MAX_COLUMNS", EXPERTS * RANK - 1)
    module, inputs = make_case(2, lead=(PER_TOKEN_MAX_TOKENS + 1,))
    torch.testing.assert_close(torch.ops.adaptc.mixture_lora(**inputs), eager(module, inputs),
                               **FP32)
    assert taken == ["_per_token", "_stacked", "sort_by_expert"]
    with pytest.raises(ValueError, match="stacked kernels take E·r ≤ 14, got 5·3"):
        mixture_lora_triton(**inputs, path="stacked")
    with pytest.raises(ValueError, match="path must be one of per-token, stacked, grouped"):
        mixture_lora_triton(**inputs, path="dense")


@pytest.mark.parametrize("path", ["per-token", "stacked", "grouped"])
@pytest.mark.parametrize("top_k", [1, 2])
def test_all_tokens_routed_to_the_same_experts(top_k: int, path: str) -> None:
    module, inputs = make_case(top_k, lead=(FEW if path == "per-token" else TOKENS,))
    tokens = inputs["x"].shape[0]
    inputs["x"] = torch.rand(tokens, D_IN) + 0.1  # positive, so the logit order is that of `weight`
    weight = torch.tensor([-1.0, -2.0, 3.0, -3.0, 1.0])  # expert 2 first, then expert 4
    inputs["router"] = weight[:, None] * torch.full((EXPERTS, D_IN), 0.05)
    module.router.copy_(inputs["router"])
    _, chosen, counts = route_tokens(inputs["x"], inputs["router"], top_k)
    assert counts.tolist() == [0, 0, tokens, 0, tokens if top_k == 2 else 0]
    out = mixture_lora_triton(**inputs, path=path)
    torch.testing.assert_close(out, eager(module, inputs), **FP32)


def test_sort_by_expert_sorts_assignments_stably() -> None:
    chosen = torch.tensor([[2, 0], [0, 1], [2, 1]], dtype=torch.int32)
    order = sort_by_expert(chosen)
    assert order.tolist() == [1, 2, 3, 5, 0, 4]  # token·k + slot: expert 0, 0, 1, 1, 2, 2
    assert (order // 2).tolist() == [0, 1, 1, 2, 0, 2]


def test_op_runs_kernels_on_leading_dims_and_no_tokens() -> None:
    module, inputs = make_case(2, lead=(3, 5))
    out = torch.ops.adaptc.mixture_lora(**inputs)
    torch.testing.assert_close(out, eager(module, inputs), **FP32)
    _, empty = make_case(2, lead=(0,))
    assert torch.ops.adaptc.mixture_lora(**empty).shape == (0, D_OUT)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_reference_path_matches_module(monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype) -> None:
    monkeypatch.delenv("TRITON_INTERPRET")
    monkeypatch.setattr(op_module, "mixture_lora_triton", None)  # the kernels must not run
    module, inputs = make_case(2, dtype)
    out = torch.ops.adaptc.mixture_lora(**inputs)
    torch.testing.assert_close(out.float(), eager(module, inputs), **TOLERANCES[dtype])


@pytest.mark.parametrize(("change", "error", "names"), [
    ({"top_k": EXPERTS + 1}, ValueError, "top_k"),
    ({"top_k": 0}, ValueError, "top_k"),
    ({"A": torch.zeros(MAX_EXPERTS + 1, RANK, D_IN), "router": torch.zeros(MAX_EXPERTS + 1, D_IN),
      "B": torch.zeros(MAX_EXPERTS + 1, D_OUT, RANK)}, ValueError, "experts"),
    ({"B": torch.zeros(EXPERTS, D_OUT, RANK + 1)}, ValueError, "`B`"),
    ({"router": torch.zeros(EXPERTS, D_IN, dtype=torch.float16)}, TypeError, "`router`"),
    ({"residual": torch.zeros(TOKENS + 1, D_OUT)}, ValueError, "`residual`"),
])
@pytest.mark.usefixtures("interpret")  # both paths: kernels and reference
def test_rejects_bad_inputs_naming_them(change: dict, error: type, names: str) -> None:
    _, inputs = make_case(2)
    with pytest.raises(error, match=names):
        torch.ops.adaptc.mixture_lora(**{**inputs, **change})


class MixtureSite(nn.Module):
    """A linear site whose output gets a routed LoRA update through the custom op."""

    def __init__(self, mixture: MixtureOfLora):
        super().__init__()
        self.base = nn.Linear(D_IN, D_OUT)
        self.mixture = mixture

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.mixture
        return torch.ops.adaptc.mixture_lora(x, self.base(x), m.router, m.A, m.B, m.scale, m.top_k)


def test_exported_program_keeps_op_and_matches_eager() -> None:
    module, inputs = make_case(2)
    site = MixtureSite(module).eval()
    exported = torch.export.export(site, (inputs["x"],))
    assert torch.ops.adaptc.mixture_lora.default in {node.target for node in exported.graph.nodes}
    expected = site.base(inputs["x"]) + module(inputs["x"])
    torch.testing.assert_close(exported.module()(inputs["x"]), expected, **FP32)


@torch.no_grad()  # inference only: the op has no autograd formula
def test_compiles_in_one_graph() -> None:
    module, inputs = make_case(EXPERTS)
    site = MixtureSite(module).eval()
    compiled = torch.compile(site, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(inputs["x"]), site(inputs["x"]), **FP32)
