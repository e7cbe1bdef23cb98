"""The Triton kernels compile for real GPUs, on this CPU machine: every autotune config, for the
benchmark's launches, through triton's compiler and ptxas (adaptc.backends.triton.precompile).

The interpreter tests (tests/backends) check what the kernels compute; these check what only
the compiler sees. Half-precision kernels on the GPUs inference runs on (A100 sm_80, H100/H200
sm_90) must compile onto the tensor cores, with no register spills and within the block's
shared-memory limit; float32 ones (tl.dot on FMA units, not tensor cores) must compile and
fit, and may spill in their largest tiles, which the autotuner then times and passes over.

Each (dtype, arch) compiles in its own subprocess, since the kernels cannot be compiled in a
process where tests/backends made triton interpret them; the subprocesses run side by side.
"""
import json
import os
import subprocess
import sys

import pytest

from adaptc.backends.triton.precompile import SHARED_LIMIT

CASES = [("bfloat16", 90), ("float16", 80), ("float32", 90)]


def compile_env(cache: os.PathLike) -> dict[str, str]:
    """This process's environment without TRITON_INTERPRET, with a fresh triton cache."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(cache)
    return env


@pytest.fixture(scope="module")
def reports(tmp_path_factory) -> dict[tuple[str, int], list[dict]]:
    """Every config's ptxas report per (dtype, arch), from `precompile --json` subprocesses."""
    env = compile_env(tmp_path_factory.mktemp("triton-cache"))
    runs = {case: subprocess.Popen(
        [sys.executable, "-m", "adaptc.backends.triton.precompile", "--json",
         "--dtype", case[0], "--arch", str(case[1])],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for case in CASES}
    out = {}
    for case, run in runs.items():
        stdout, stderr = run.communicate(timeout=600)
        assert stdout.strip(), f"precompile {case} printed nothing; stderr:\n{stderr[-3000:]}"
        out[case] = json.loads(stdout)
    return out


@pytest.mark.slow
def test_every_config_compiles_and_fits(reports):
    """One test for the three (dtype, arch) cases, not one each: pytest-xdist hands parametrised
    tests to both workers, and each worker ran the module-scoped `reports` (three compiling
    subprocesses) again."""
    for case in CASES:
        check_reports(case, reports[case])


def check_reports(case: tuple[str, int], results: list[dict]) -> None:
    launches = {r["launch"] for r in results}
    assert launches == {"bottleneck_fused", "bottleneck_down", "bottleneck_up",
                        "mixture_router", "mixture_shrink", "mixture_expand",
                        "mixture_expand_top1", "mixture_stacked_shrink",
                        "mixture_stacked_expand", "mixture_per_token", "mixture_vectors"}, case
    assert len(results) >= 5 * len(launches), case  # the autotune spaces, not one config each
    for r in results:
        assert r["error"] is None, f"{case} {r['launch']} [{r['config']}]: {r['error']}"
        assert r["registers"] > 0 and r["shared"] > 0, (case, r)  # ptxas's report was read
        assert r["shared"] <= SHARED_LIMIT[case[1]], (case, r)
    units = {r["dot_unit"] for r in results if r["launch"] != "mixture_per_token"}
    assert {r["dot_unit"] for r in results if r["launch"] == "mixture_per_token"} == {"none"}, case
    if case[0] == "float32":  # torch's default "highest" precision: an IEEE dot, no TF32
        assert units == {"fma"}, case
    else:
        assert [r for r in results if r["problems"]] == [], case
        assert units == ({"mma", "wgmma"} if case[1] == 90 else {"mma"}), case  # tensor cores only


OVERSIZED = """
import json, torch, triton
from adaptc.backends.triton.precompile import compile_launch, llama_launches
up = next(x for x in llama_launches(torch.float16) if x.name == "bottleneck_up")
big = triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 128}, num_warps=8, num_stages=5)
result = compile_launch(up, big, 90)
print(json.dumps([result.error, result.shared, result.problems(90)]))
"""


@pytest.mark.slow
def test_reports_a_config_that_does_not_fit(tmp_path):
    """The check can fail: a 128×128×128 tile with 5 stages needs 320 KiB of shared memory."""
    run = subprocess.run([sys.executable, "-c", OVERSIZED], env=compile_env(tmp_path),
                         capture_output=True, text=True, timeout=300, check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    error, shared, problems = json.loads(run.stdout)
    assert error is None and shared == 327680
    assert problems == ["needs 327680 B shared memory, sm_90 allows 232448 B"]
