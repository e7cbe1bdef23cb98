"""Run the adaptc Triton kernels on CPU tensors through triton's interpreter (TRITON_INTERPRET=1).

tests/interpreted_triton.py (imported by tests/conftest.py before anything imports triton)
decorates the kernels under the interpreter on a machine without CUDA; the autouse fixture below
sets the variable again for each test in this directory only, since the ops read it per call
to choose kernels or reference (`use_triton`).

Caveats:
- everything triton decorates stays interpreted for the rest of the pytest process;
- with CUDA the kernels are compiled and every test here skips, saying so: run tests/backends
  in a pytest process of its own with TRITON_INTERPRET=1 set in its environment.
"""
import pytest
from interpreted_triton import KERNELS_INTERPRETED


@pytest.fixture(autouse=True)
def triton_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    """TRITON_INTERPRET=1 for this test only; skip when the kernels were compiled for a GPU."""
    if not KERNELS_INTERPRETED:
        pytest.skip("the Triton kernels were compiled for a GPU, so they cannot run on CPU "
                    "tensors; run tests/backends in a pytest process of its own with "
                    "TRITON_INTERPRET=1 set")
    monkeypatch.setenv("TRITON_INTERPRET", "1")


@pytest.fixture(params=[True, False])
def interpret(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch,
              triton_interpreter: None) -> bool:
    """Runs a test twice: with TRITON_INTERPRET=1 (True: CPU tensors take the kernels' path)
    and without it (False: they take the reference), so checks that both paths share, such
    as the ops' input checks, are tested on each."""
    if not request.param:
        monkeypatch.delenv("TRITON_INTERPRET")
    return request.param
