"""Every GPU autotune config of every kernel, launched alone under triton's interpreter against
the PyTorch reference, at small shapes that are multiples of no tile.

Under the interpreter each autotuned kernel holds one small config (tuning would time them all
on the CPU), so the tiles a GPU picks among are otherwise computed only by
tests/test_gpu.py::test_every_tile_computes_the_reference, on a GPU. The autotuner picks by time
alone: a tile that masked its edges wrongly would be chosen wherever it was fastest. Warps and
pipeline stages mean nothing to the interpreter; the block sizes are what this checks.
"""
from collections.abc import Callable

import pytest
import torch
import triton
from helpers import TRITON_CASES, autotuned_kernels, triton_case_calls

from adaptc.backends.triton import CHOSEN, bottleneck, moe_lora, moe_vectors

TOLERANCES = {torch.float32: 1e-5, torch.bfloat16: 2e-2}  # atol = rtol; outputs are O(1)
GPU_TILES = {  # each autotuned kernel's GPU configs
    "_bottleneck_fused_kernel": bottleneck._fused_configs,
    "_linear_kernel": bottleneck._linear_configs,
    "_router_kernel": moe_lora._router_configs,
    "_shrink_kernel": moe_lora._shrink_configs,
    "_expand_kernel": moe_lora._expand_configs,
    "_stacked_shrink_kernel": moe_lora._stacked_shrink_configs,
    "_stacked_expand_kernel": moe_lora._stacked_expand_configs,
    "_per_token_kernel": moe_lora._per_token_configs,
    "_mixture_vectors_kernel": moe_vectors._configs,
}


def gpu_tiles() -> dict[str, list[triton.Config]]:
    """The configs each kernel would hold on a GPU (the config functions read the knob), one per
    distinct set of block sizes: configs that differ only in warps or pipeline stages run the
    same computation under the interpreter, so a second one would repeat the first.

    The knob's own `scope` restores it: setting it also writes TRITON_INTERPRET, and
    monkeypatch's undo would leave a Python-level override that outlives a later `delenv`.
    """
    with triton.knobs.runtime.scope():
        triton.knobs.runtime.interpret = False
        return {name: distinct_tiles(configs()) for name, configs in GPU_TILES.items()}


def distinct_tiles(configs: list[triton.Config]) -> list[triton.Config]:
    """The first config of each distinct `kwargs` (block sizes and other constexprs), in order."""
    tiles: dict[tuple, triton.Config] = {}
    for config in configs:
        tiles.setdefault(tuple(sorted(config.kwargs.items())), config)
    return list(tiles.values())


def calls(case: str, dtype: torch.dtype) -> tuple[Callable, Callable]:
    """(the case's Triton path, its reference), on CPU tensors."""
    return triton_case_calls(case, dtype, tokens=70, d=100, n=150, fused_width=24, device="cpu")


def test_every_kernel_has_its_tiles_listed() -> None:
    assert set(GPU_TILES) == set(autotuned_kernels())
    assert set(GPU_TILES) == {name for names in TRITON_CASES.values() for name in names}


@pytest.mark.parametrize("dtype", list(TOLERANCES), ids=str)
@pytest.mark.parametrize("case", list(TRITON_CASES))
def test_every_gpu_tile_computes_the_reference(monkeypatch: pytest.MonkeyPatch, case: str,
                                               dtype: torch.dtype) -> None:
    names, (triton_path, reference) = TRITON_CASES[case], calls(case, dtype)
    kernels, all_tiles, tol = autotuned_kernels(), gpu_tiles(), TOLERANCES[dtype]
    expected = reference()
    for i in range(max(len(all_tiles[name]) for name in names)):
        tiles = [all_tiles[name][min(i, len(all_tiles[name]) - 1)] for name in names]
        for name, tile in zip(names, tiles):
            monkeypatch.setattr(kernels[name], "configs", [tile])
        CHOSEN.clear()
        torch.testing.assert_close(triton_path(), expected, atol=tol, rtol=tol,
                                   msg=lambda message, tiles=tiles: f"{case}, {tiles}: {message}")
        launched = {kernel: config for (kernel, _), config in CHOSEN.items()}
        assert [launched[kernels[name]] for name in names] == [t.all_kwargs() for t in tiles]
    CHOSEN.clear()
