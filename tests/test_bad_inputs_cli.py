"""Bad input through the command line: exit 1 with one message naming the file (line and
column for specs) or the tensor or module at fault, no traceback, and no output left."""
from __future__ import annotations

import pytest
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import adaptc
from adaptc.adapters import OPTIONS_KEY
from adaptc.cli import main

SPEC = "q_proj,v_proj: lora r=4\n"


@pytest.fixture
def spec(tmp_path):
    path = tmp_path / "a.adapt"
    path.write_text(SPEC)
    return path


@pytest.fixture
def weights(tiny, tmp_path):
    return adaptc.save_adapters(adaptc.compile(tiny("llama"), SPEC), tmp_path / "a.safetensors")


def test_adapters_with_damaged_option_metadata_are_refused_before_the_model(
        spec, weights, tmp_path, capsys, monkeypatch):
    """Was `pass 'load_adapters' failed (after: ...): 'list' object has no attribute 'items'`
    after the model and the train graph had been built."""
    with safe_open(str(weights), "pt") as handle:
        metadata = handle.metadata()
    bad = tmp_path / "bad.safetensors"
    save_file(load_file(weights), bad, metadata={**metadata, OPTIONS_KEY: "[1, 2]"})
    monkeypatch.setattr("adaptc.cli.placed_model", lambda args: pytest.fail("model loaded"))
    out = tmp_path / "out"
    assert main(["compile", str(spec), "--mode", "infer", "--adapters", str(bad),
                 "-o", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"{bad}: the metadata entry 'adaptc.options' holds a JSON list")
    assert "pass 'load_adapters'" not in err and not out.exists()
