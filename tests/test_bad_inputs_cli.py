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
def weights(tmp_path):
    """Adapter weights for SPEC on the CLI's default model (the 4-layer llama preset)."""
    return adaptc.save_adapters(adaptc.compile("llama", SPEC), tmp_path / "a.safetensors")


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


def test_an_infer_artifact_with_nan_outputs_is_not_written(spec, weights, tmp_path, capsys):
    """Adapter weights near float32's limit overflow the activations (not the merged weights):
    the artifact was written, its report.json verification 'max abs error nan'."""
    tensors = {k: v.fill_(3e38) if k.endswith(".B") else v for k, v in load_file(weights).items()}
    with safe_open(str(weights), "pt") as handle:
        metadata = handle.metadata()
    big = tmp_path / "big.safetensors"
    save_file(tensors, big, metadata=metadata)
    out = tmp_path / "out"
    assert main(["compile", str(spec), "--mode", "infer", "--adapters", str(big),
                 "-o", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"{out}: not written: on random inputs the exported program and the "
                          "train-mode graph give NaN or infinite outputs")
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == [
        "a.adapt", "a.safetensors", "big.safetensors"]


def test_a_peft_adapter_directory_given_as_model_says_what_it_is(spec, tmp_path, capsys):
    """Was only 'not a Hugging Face checkpoint directory (no config.json)'."""
    peft = tmp_path / "peft"
    peft.mkdir()
    (peft / "adapter_config.json").write_text('{"peft_type": "LORA"}')
    assert main(["inspect", str(spec), "--model", str(peft)]) == 1
    assert capsys.readouterr().err == (
        f"{peft}: not a Hugging Face checkpoint directory (no config.json); it holds a PEFT "
        "adapter (adapter_config.json), not a model: give its base model here, and convert the "
        "adapter with `adaptc import-peft DIR --model MODEL`\n")


def test_version_prints_the_version(capsys):
    """`adaptc --version` was an argument error (exit 2: 'the following arguments are
    required: COMMAND')."""
    with pytest.raises(SystemExit) as caught:
        main(["--version"])
    assert caught.value.code == 0
    assert capsys.readouterr().out == f"adaptc {adaptc.__version__}\n"


def test_a_damaged_tokenizer_json_is_an_error_naming_the_checkpoint(spec, tmp_path, capsys):
    """tokenizer.json holding {} was a KeyError ('added_tokens') traceback from transformers."""
    checkpoint = tmp_path / "ckpt"
    checkpoint.mkdir()
    (checkpoint / "tokenizer.json").write_text("{}")
    assert main(["generate", str(spec), "--model", str(checkpoint), "--text", "hi"]) == 1
    assert capsys.readouterr().err == (f"{checkpoint}: no tokenizer to encode --text with "
                                       "(KeyError: 'added_tokens'); pass token ids with --prompt\n")
