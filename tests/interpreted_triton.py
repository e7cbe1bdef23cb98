"""Import triton and adaptc's kernels under triton's interpreter (TRITON_INTERPRET=1) on a
machine without CUDA, before anything else imports triton.

Triton chooses interpreter or compiler when a function is *decorated* with `triton.jit`: its own
`triton.language` helpers when triton is first imported, adaptc's kernels when
`adaptc.backends.triton` is. Importing a transformers model or torch.export imports triton
(through torch._dynamo), so tests/conftest.py imports this module first; the variable is then
restored, and tests/backends/conftest.py sets it again for each test there only, since the ops
read it per call to choose kernels or reference (`use_triton`).

With CUDA, nothing is imported here: the GPU tests need compiled kernels, and the interpreted
tests skip (run tests/backends in a pytest process of its own with TRITON_INTERPRET=1 set).
"""
from __future__ import annotations

import os
import sys

import torch


def import_interpreted() -> bool:
    """True when triton's language helpers and adaptc's kernels ended up interpreted."""
    previous = os.environ.get("TRITON_INTERPRET")
    if "triton" not in sys.modules and not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"
    try:
        import triton.language as tl
        from triton.runtime.interpreter import InterpretedFunction

        from adaptc.backends.triton import bottleneck
    finally:
        if previous is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = previous
    return all(isinstance(fn, InterpretedFunction) for fn in (tl.zeros, bottleneck._activate))


KERNELS_INTERPRETED = import_interpreted()
