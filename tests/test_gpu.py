"""On a CUDA device: the compiled Triton kernels (autotuned, Llama-sized shapes) against
their float32 PyTorch reference, and infer-mode graphs on the GPU against train mode.

Skipped without CUDA. Run it in a process of its own (`pytest tests/test_gpu.py`):
tests/backends/conftest.py makes triton interpret kernels for the rest of its process.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from helpers import TRITON_CASES, autotuned_kernels, inputs, main_output, triton_case_calls

import adaptc

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
TOLERANCES = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 3e-2}  # atol = rtol
TOKENS = [1, 37, 4099]  # one decode token, an odd count, more than a block of 4096
CARD = Path(__file__).resolve().parents[1] / "specs" / "card.adapt"


@pytest.fixture(autouse=True)
def compiled_kernels():
    from triton.runtime.interpreter import InterpretedFunction

    from adaptc.backends.triton import bottleneck
    if isinstance(bottleneck._activate, InterpretedFunction):
        pytest.skip("triton interprets the kernels in this process (tests/backends ran "
                    "first); run tests/test_gpu.py on its own")


ALL_TILES = {name: list(kernel.configs) for name, kernel in autotuned_kernels().items()}


@pytest.fixture(autouse=True)
def first_tile_only(compiled_kernels):
    """Each kernel runs its first autotune config. Tuning compiles and times every config at
    each new shape and token bucket, in each xdist worker: on the H200 that kept 7 of this
    file's tests from finishing in the device run's time. test_every_tile_computes_the_reference
    runs the other configs."""
    from adaptc.backends.triton import CHOSEN
    kernels = autotuned_kernels()
    for name, kernel in kernels.items():
        kernel.configs = ALL_TILES[name][:1]
    CHOSEN.clear()
    yield
    for name, kernel in kernels.items():
        kernel.configs = ALL_TILES[name]
    CHOSEN.clear()


def randn(*shape: int, dtype: torch.dtype, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(*shape, device="cuda") * scale).to(dtype)


def tile_case(case: str, dtype: torch.dtype) -> tuple[list[str], Callable, Callable]:
    """(the kernels `case` launches, a call of its Triton path, a call of its reference), at
    widths and token counts that are not multiples of any tile."""
    n = 1000 if case.startswith("bottleneck") else 1500
    return TRITON_CASES[case], *triton_case_calls(case, dtype, tokens=300, d=1000, n=n,
                                                  fused_width=64, device="cuda")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("case", list(TRITON_CASES))
def test_every_tile_computes_the_reference(case, dtype):
    """Every autotune config of every kernel, each launched as the only one (the autotuner
    picks among them by time alone, so a tile that masked its edges wrongly would be chosen
    wherever it was fastest)."""
    from adaptc.backends.triton import CHOSEN
    names, triton_path, reference = tile_case(case, dtype)
    kernels, expected, tol = autotuned_kernels(), reference(), TOLERANCES[dtype]
    for i in range(max(len(ALL_TILES[name]) for name in names)):
        for name in names:
            tiles = ALL_TILES[name]
            kernels[name].configs = [tiles[min(i, len(tiles) - 1)]]
        CHOSEN.clear()
        tiles = [kernels[name].configs[0] for name in names]
        torch.testing.assert_close(triton_path(), expected, atol=tol, rtol=tol,
                                   msg=lambda message, tiles=tiles: f"{case}, {tiles}: {message}")


@pytest.mark.parametrize("dtype", list(TOLERANCES), ids=str)
@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("bottleneck", [64, 136])  # fused kernel; two launches above 128
def test_bottleneck_kernels_on_cuda(dtype, tokens, bottleneck):
    """The fused kernel with the residual stream folded in (`skip`, as infer graphs run it
    after a sublayer), the two launches without (the no-skip fused kernel runs in
    test_fused_ops_never_synchronize_the_host)."""
    from adaptc.backends.triton.bottleneck import (
        bottleneck_adapter_reference,
        bottleneck_adapter_triton,
    )
    torch.manual_seed(0)
    d = 2048
    args = (randn(tokens, d, dtype=dtype), randn(tokens, d, dtype=dtype),
            randn(bottleneck, d, dtype=dtype, scale=d**-0.5), randn(bottleneck, dtype=dtype),
            randn(d, bottleneck, dtype=dtype, scale=bottleneck**-0.5), randn(d, dtype=dtype),
            "gelu", randn(tokens, d, dtype=dtype) if bottleneck <= 128 else None)
    out = bottleneck_adapter_triton(*args)
    tol = TOLERANCES[dtype]
    torch.testing.assert_close(out, bottleneck_adapter_reference(*args), atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", list(TOLERANCES), ids=str)
@pytest.mark.parametrize("bottleneck", [64, 136])
def test_bottleneck_scale_and_gate_on_cuda(dtype, bottleneck):
    """MAM's scale and UniPELT's per-example gate [B, 1, 1] in both paths' epilogues."""
    from adaptc.backends.triton.bottleneck import (
        bottleneck_adapter_reference,
        bottleneck_adapter_triton,
    )
    torch.manual_seed(0)
    d, batch, seq = 2048, 4, 128
    args = (randn(batch, seq, d, dtype=dtype), randn(batch, seq, d, dtype=dtype),
            randn(bottleneck, d, dtype=dtype, scale=d**-0.5), randn(bottleneck, dtype=dtype),
            randn(d, bottleneck, dtype=dtype, scale=bottleneck**-0.5), randn(d, dtype=dtype),
            "relu", randn(batch, seq, d, dtype=dtype), 4.0,
            torch.rand(batch, 1, 1, device="cuda").to(dtype))
    tol = 4 * TOLERANCES[dtype]  # the update is four times as large
    torch.testing.assert_close(bottleneck_adapter_triton(*args),
                               bottleneck_adapter_reference(*args), atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", list(TOLERANCES), ids=str)
@pytest.mark.parametrize("tokens,path", [(1, "per-token"), (1, "stacked"), (1, "grouped"),
                                         (16, "per-token"), (37, "stacked"), (37, "grouped"),
                                         (4099, "stacked"), (4099, "grouped")])
@pytest.mark.parametrize("top_k", [1, 2, 8])  # k = experts: soft routing
def test_mixture_kernels_on_cuda(dtype, tokens, path, top_k):
    """Every path: the per-token kernel (the op's choice up to 16 tokens), the stacked ones (its
    choice above, E·r = 64 here) and the grouped ones."""
    from adaptc.backends.triton.moe_lora import mixture_lora_reference, mixture_lora_triton
    torch.manual_seed(0)
    d, experts, rank = 2048, 8, 8
    args = (randn(tokens, d, dtype=dtype), randn(tokens, d, dtype=dtype),
            randn(experts, d, dtype=dtype, scale=d**-0.5),
            randn(experts, rank, d, dtype=dtype, scale=d**-0.5),
            randn(experts, d, rank, dtype=dtype, scale=rank**-0.5), 2.0, top_k)
    out = mixture_lora_triton(*args, path=path)
    tol = TOLERANCES[dtype]
    torch.testing.assert_close(out, mixture_lora_reference(*args), atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", list(TOLERANCES), ids=str)
@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("top_k", [1, 2, 8])
@pytest.mark.parametrize("feedforward", [False, True], ids=["output", "feedforward"])
def test_vectors_kernel_on_cuda(dtype, tokens, top_k, feedforward):
    """MoV's kernel at the benchmark's widths: output scaling (router on a 2048-wide input,
    5632-wide values) and feedforward (values are the router's input)."""
    from adaptc.backends.triton.moe_vectors import mixture_vectors_reference, mixture_vectors_triton
    torch.manual_seed(0)
    d, n, experts = 2048, 5632, 8
    x = randn(tokens, d, dtype=dtype)
    values = x if feedforward else randn(tokens, n, dtype=dtype)
    args = (values, x, randn(experts, d, dtype=dtype, scale=d**-0.5),
            1 + randn(experts, values.shape[-1], dtype=dtype, scale=0.1), top_k)
    tol = TOLERANCES[dtype]
    torch.testing.assert_close(mixture_vectors_triton(*args), mixture_vectors_reference(*args),
                               atol=tol, rtol=tol)


@pytest.mark.parametrize("tokens", TOKENS)
def test_fused_ops_never_synchronize_the_host(tokens):
    """After the first call (autotuning measures, so it waits), no op reads a device value
    back: the host keeps queueing kernels. torch's sync debug mode raises on any op that
    synchronises (`torch.bincount` did, in the mixture's grouping)."""
    torch.manual_seed(0)
    d, n, experts, rank, dtype = 256, 384, 8, 8, torch.bfloat16
    x, res = randn(tokens, d, dtype=dtype), randn(tokens, d, dtype=dtype)
    calls = [
        lambda: torch.ops.adaptc.bottleneck_adapter(
            x, res, randn(64, d, dtype=dtype), randn(64, dtype=dtype), randn(d, 64, dtype=dtype),
            randn(d, dtype=dtype), "gelu"),
        lambda: torch.ops.adaptc.mixture_lora(
            x, res, randn(experts, d, dtype=dtype), randn(experts, rank, d, dtype=dtype),
            randn(experts, d, rank, dtype=dtype), 2.0, 2),
        lambda: torch.ops.adaptc.mixture_vectors(
            randn(tokens, n, dtype=dtype), x, randn(experts, d, dtype=dtype),
            randn(experts, n, dtype=dtype), 2)]
    for call in calls:
        call()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for call in calls:
            call()
    finally:
        torch.cuda.set_sync_debug_mode("default")


def card_on_cuda(model, tmp_path: Path, scale: float):
    """(the model moved to CUDA, its train-mode card graph with random adapters scaled by
    `scale`, those adapters saved to a file)."""
    model.module.cuda()
    model.example_inputs = {k: v.cuda() for k, v in model.example_inputs.items()}
    train = adaptc.compile(model, CARD)
    gen = torch.Generator(device="cuda").manual_seed(0)
    with torch.no_grad():
        for p in adaptc.adapter_state_dict(train).values():
            p.copy_(torch.randn(p.shape, generator=gen, device="cuda") * scale)
    return model, train, adaptc.save_adapters(train, tmp_path / "a.safetensors")


@pytest.mark.parametrize("merge,fuse", [(True, False), (False, False), (True, True)])
def test_infer_graph_on_cuda_equals_train(tiny, tmp_path, merge, fuse):
    """The card spec (LoRA, bottleneck, mixture) on a CUDA model: kernels in the graph,
    eager and under torch.compile, merged or not, projections fused or not, equal the
    train-mode graph."""
    model, train, weights = card_on_cuda(tiny("llama"), tmp_path, scale=0.1)
    infer = adaptc.compile(model, CARD, "infer", adapters=weights, merge=merge,
                           fuse_projections=fuse)
    x = {k: v.cuda() for k, v in inputs().items()}
    with torch.no_grad():
        expected = main_output(train.eval()(**x))
        got = main_output(infer(**x))
        compiled = main_output(torch.compile(infer)(**x))
    assert (got - expected).abs().max().item() <= 1e-4
    assert (compiled - expected).abs().max().item() <= 1e-4


def test_cached_decoding_on_cuda_equals_full_forward(tiny, tmp_path):
    """The KV-cache decoder on a CUDA model (inputs and cache on the GPU, kernels in the
    graph) picks the tokens of full-sequence forward passes of the infer-mode module."""
    from adaptc.decode import compile_decoder
    model, _, weights = card_on_cuda(tiny("llama"), tmp_path, scale=0.3)
    prompt = [5, 17, 42, 7, 99]
    tokens = compile_decoder(model, CARD, adapters=weights, max_cache_len=32).generate(prompt, 8)
    full = adaptc.compile(model, CARD, "infer", adapters=weights)
    ids = torch.tensor([tokens], device="cuda")
    with torch.no_grad():
        logits = full(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0]
    assert tokens[len(prompt):] == logits[len(prompt) - 1:-1].argmax(-1).tolist()


def test_cli_compiles_and_exports_for_cuda(tiny, tmp_path, capsys):
    """`compile --mode infer --device cuda --dtype bfloat16 -o`: a checkpoint traced on the
    GPU; the reloaded program runs there and equals the in-memory module."""
    from adaptc.cli import main
    tiny("llama").module.save_pretrained(tmp_path / "base")
    out = tmp_path / "serve"
    assert main(["compile", str(CARD), "--model", str(tmp_path / "base"), "--mode", "infer",
                 "--device", "cuda", "--dtype", "bfloat16", "-o", str(out)]) == 0
    assert "max abs error" in capsys.readouterr().out
    program = adaptc.load_program(out).module()
    model = adaptc.load_model(str(tmp_path / "base"), dtype="bfloat16", device="cuda")
    infer = adaptc.compile(model, CARD, "infer")
    x = {k: v.cuda() for k, v in inputs().items()}
    with torch.no_grad():
        got, want = main_output(program(**x)), main_output(infer(**x))
    assert got.dtype == torch.bfloat16 and got.device.type == "cuda"
    tol = TOLERANCES[torch.bfloat16]  # autotuning may pick other kernel configs per module
    torch.testing.assert_close(got, want, atol=tol, rtol=tol)


def test_saved_decoder_on_cuda(tiny, tmp_path):
    """A cached decoder compiled on the GPU (Triton kernels in the graph), saved and loaded
    back, gives the compiled decoder's tokens on the GPU."""
    from adaptc.decode import compile_decoder
    from adaptc.decoding_program import load_decoding, save_decoding
    model, _, weights = card_on_cuda(tiny("llama"), tmp_path, scale=0.3)
    compiled = compile_decoder(model, CARD, adapters=weights, max_cache_len=32)
    about = save_decoding(compiled, tmp_path / "decoding")
    saved = load_decoding(tmp_path / "decoding")
    assert saved.device.type == "cuda" and about["check"]["same_tokens"]
    assert saved.generate([5, 17, 42], 8) == compiled.generate([5, 17, 42], 8)


def test_cuda_graph_steps_give_the_same_tokens_and_logits(tiny, tmp_path):
    """One-token steps replayed from a CUDA graph (fused bottleneck and mixture kernels in
    it): the eager decoder's tokens twice over (the replay leaves no state behind), its
    logits step by step, and the loaded program's tokens with cuda_graph=True."""
    from adaptc.decode import compile_decoder
    from adaptc.decoding_program import load_decoding, save_decoding
    model, _, weights = card_on_cuda(tiny("llama"), tmp_path, scale=0.3)
    eager = compile_decoder(model, CARD, adapters=weights, max_cache_len=32)
    graphed = compile_decoder(model, CARD, adapters=weights, max_cache_len=32, cuda_graph=True)
    prompt = [5, 17, 42]
    tokens = eager.generate(prompt, 10)
    assert graphed.generate(prompt, 10) == tokens
    assert graphed.generate(prompt[:2], 10) == eager.generate(prompt[:2], 10)
    want = [eager.logits(prompt, 0)] + [eager.logits([t], i) for i, t in enumerate(tokens)
                                         if i >= len(prompt)]
    got = [graphed.logits(prompt, 0)] + [graphed.logits([t], i) for i, t in enumerate(tokens)
                                         if i >= len(prompt)]
    assert (torch.cat(got) - torch.cat(want)).abs().max().item() <= 1e-4
    save_decoding(eager, tmp_path / "decoding")
    assert load_decoding(tmp_path / "decoding", cuda_graph=True).generate(prompt, 10) == tokens
