"""The kernel tests (tests/backends) must not skip unseen on a machine without CUDA."""
import pytest
import torch
from interpreted_triton import KERNELS_INTERPRETED


def test_the_kernels_run_interpreted_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("with CUDA the kernels are compiled; tests/backends runs in its own process")
    assert KERNELS_INTERPRETED
