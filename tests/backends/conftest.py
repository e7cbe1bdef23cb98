"""Run the adaptc Triton kernels on CPU tensors through triton's interpreter (TRITON_INTERPRET=1).

Triton chooses interpreter or compiler when a function is *decorated* with `triton.jit`: its own
`triton.language` helpers (`tl.zeros`, ...) when triton is first imported, adaptc's kernels when
`adaptc.backends.triton` is. So if triton is not imported yet, this file imports both with
TRITON_INTERPRET=1 set and then restores the variable; an autouse fixture sets it again for each
test in this directory only, since the ops read it per call to choose kernels or reference
(`use_triton`).

Caveats:
- everything triton decorates stays interpreted for the rest of the pytest process: on a GPU
  machine, run tests/backends in a process of its own when other tests need compiled Triton
  (torch.compile's GPU code, adaptc's kernels on CUDA tensors);
- if triton was imported before this file without TRITON_INTERPRET=1 (`import torch._dynamo`
  does so, e.g. from a parent conftest or a test module collected earlier), the kernels cannot
  run on CPU and every test here skips, saying so; setting TRITON_INTERPRET=1 in the
  environment of that pytest run avoids it.
"""
import os
import sys

import pytest


def _import_interpreted() -> bool:
    """Import triton and the ops, under the interpreter if triton is not imported yet.

    True when both triton's language helpers and adaptc's kernels ended up interpreted.
    """
    previous = os.environ.get("TRITON_INTERPRET")
    if "triton" not in sys.modules:
        os.environ["TRITON_INTERPRET"] = "1"
    try:
        import triton.language as tl
        from triton.runtime.interpreter import InterpretedFunction

        from adaptc.backends.triton import bottleneck
    finally:
        _restore("TRITON_INTERPRET", previous)
    return all(isinstance(fn, InterpretedFunction) for fn in (tl.zeros, bottleneck._activate))


def _restore(name: str, value: str | None) -> None:
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value


KERNELS_INTERPRETED = _import_interpreted()


@pytest.fixture(autouse=True)
def triton_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    """TRITON_INTERPRET=1 for this test only; skip when the kernels were compiled for a GPU."""
    if not KERNELS_INTERPRETED:
        pytest.skip("triton was imported before tests/backends/conftest.py without "
                    "TRITON_INTERPRET=1, so the kernels cannot run on CPU; "
                    "run pytest with TRITON_INTERPRET=1 set")
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
