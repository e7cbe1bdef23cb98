"""Shared fixtures: tiny seeded models (the presets, two layers deep)."""
from __future__ import annotations

import copy
import os

import pytest

os.environ.setdefault("ADAPTC_VERIFY", "1")  # lint the graph after every pass in tests

import interpreted_triton  # noqa: E402, F401  (before anything imports triton)
import torch  # noqa: E402

from adaptc.frontend.models import build_preset  # noqa: E402

if os.environ.get("PYTEST_XDIST_WORKER"):  # pytest -n N: the workers share the cores
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def preset_cache():
    return {}


@pytest.fixture
def tiny(preset_cache):
    """tiny(name) → a fresh deep copy of a seeded preset model (LoadedModel)."""
    def make(name: str = "llama"):
        if name not in preset_cache:
            preset_cache[name] = build_preset(name, layers=2)
        return copy.deepcopy(preset_cache[name])
    return make
