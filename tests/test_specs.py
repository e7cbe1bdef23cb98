"""Every example in specs/ parses, validates and compiles onto the default model."""
from __future__ import annotations

from pathlib import Path

import pytest

import adaptc

SPECS = sorted((Path(__file__).resolve().parents[1] / "specs").glob("*.adapt"))


@pytest.fixture(scope="module")
def default_model():
    from adaptc.frontend.models import build_preset
    return build_preset("llama")


@pytest.mark.parametrize("path", SPECS, ids=lambda p: p.name)
def test_example_spec_compiles(default_model, path):
    gm = adaptc.compile(default_model, path)
    report = adaptc.report_of(gm)
    inserted = sum(v for k, v in report.counts.items() if k.endswith("_inserted"))
    own = [row for row in report.sites if not row.get("shared")]  # shared: prefix encoders
    assert inserted == len(own) > 0
    assert report.trainable == sum(row["params"] for row in report.sites)
