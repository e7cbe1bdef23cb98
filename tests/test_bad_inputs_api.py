"""Bad input through the Python API: each is refused with an AdaptcError naming the file and
the entry, tensor or module at fault, never a Python error from inside a library."""
from __future__ import annotations

import argparse
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import adaptc
from adaptc.adapters import OPTIONS_KEY, check_adapter_file
from adaptc.decoding_program import load_decoding
from adaptc.errors import ArtifactError, InteropError, ModelError, SpecError, WeightsError
from adaptc.frontend.models import load_model
from adaptc.peft_interop import spec_from_peft
from adaptc.spec import compile_spec

SPEC = "q_proj,v_proj: lora r=4"
SITE = "model.layers.0.self_attn.q_proj lora"


@pytest.fixture
def saved(tiny, tmp_path):
    """(train-mode module, its adapter file)."""
    gm = adaptc.compile(tiny("llama"), SPEC)
    return gm, adaptc.save_adapters(gm, tmp_path / "a.safetensors")


def with_options(saved, tmp_path, text: str) -> str:
    """The saved file with its `adaptc.options` metadata replaced by `text`."""
    with safe_open(str(saved[1]), "pt") as handle:
        metadata = handle.metadata()
    path = tmp_path / "bad.safetensors"
    save_file(load_file(saved[1]), path, metadata={**metadata, OPTIONS_KEY: text})
    return str(path)


@pytest.mark.parametrize(("text", "message"), [
    ("{not json", r"'adaptc.options' is not JSON \(Expecting property name"),
    ("[1, 2]", r"'adaptc.options' holds a JSON list; adaptc.save_adapters writes an object"),
    (f'{{"{SITE}": 5}}', rf"'adaptc.options' has '{SITE}': 5, not an object of options"),
    (f'{{"{SITE}": {{"lora": [4]}}}}', rf"has '{SITE}': {{\"lora\": \[4\]}}, not an object"),
])
def test_damaged_option_metadata_names_the_file_and_entry(saved, tmp_path, text, message):
    """Was a PassError from load_adapters in json's or Python's words ('list' object has no
    attribute 'items'), naming no file; now a WeightsError before any tensor is read."""
    path = with_options(saved, tmp_path, text)
    for check in (lambda: check_adapter_file(path), lambda: adaptc.load_adapters(saved[0], path)):
        with pytest.raises(WeightsError, match=message) as caught:
            check()
        assert str(caught.value).startswith(f"{path}: the metadata entry")


@pytest.mark.parametrize("layers", [1, 0])
def test_a_config_with_fewer_layers_than_the_weights_names_the_first_extra_tensor(
        tiny, tmp_path, layers):
    """config.json saying fewer layers than the weight file holds loaded the first layers,
    dropped the rest with transformers' table of UNEXPECTED keys, and compiled (0 layers: an
    E301 for every pattern); now a ModelError naming the checkpoint and the first tensor of
    the first layer the config has no place for."""
    tiny("llama").module.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "num_hidden_layers": layers}))
    with pytest.raises(ModelError) as caught:
        load_model(str(tmp_path))
    assert str(caught.value) == (
        f"{tmp_path}: the checkpoint holds tensors of {2 - layers} layer(s) the model's config "
        f"has no place for, first 'model.layers.{layers}.input_layernorm.weight'; does "
        f"config.json's layer count (num_hidden_layers={layers}) match the weights?")


@pytest.mark.parametrize("device", ["mps", "xpu", "privateuseone"])
def test_a_device_this_torch_cannot_place_on_is_named_before_the_model_moves(device):
    """torch.device takes any backend's name; moving the model to one this build lacks was a
    RuntimeError (ModuleNotFoundError for privateuseone) from inside nn.Module.to."""
    with pytest.raises(ModelError, match=rf"^device '{device}': this machine's torch cannot "
                                         rf"place tensors on '{device}'"):
        load_model("llama", device=device)


@pytest.mark.parametrize("targets", [[], ""])
def test_a_peft_config_with_empty_target_modules_says_so(tmp_path, targets):
    """Was "layers_to_transform or exclude_modules leaves no module to adapt", naming two
    options the config did not set."""
    config = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": targets}
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(InteropError) as caught:
        spec_from_peft(str(tmp_path), "llama")
    assert str(caught.value) == (f"{tmp_path / 'adapter_config.json'}: target_modules is "
                                 "empty: no module to adapt")


@pytest.mark.parametrize(("line", "column", "key"), [
    ("q_proj: lora alpha=1e308", 20, "alpha"),
    ("q_proj: lora r=4 alpha=" + "1" + "0" * 40, 24, "alpha"),
    ("q_proj: vera d_init=-1e300", 21, "d_init"),
    ("ffn: adapter scale=1e39", 20, "scale"),
])
def test_a_float_option_beyond_float32_is_e204_at_its_value(line, column, key):
    """alpha=1e308 passed the finite check, made the LoRA scale inf in float32, and every
    output of the compiled model NaN (inf · B = inf · 0); an infer artifact was written with
    'max abs error nan'."""
    with pytest.raises(SpecError) as caught:
        compile_spec(f"{line}\n", "big.adapt")
    first = caught.value.first
    assert (first.path, first.line, first.column, first.code) == ("big.adapt", 1, column, "E204")
    assert first.message.startswith(f"{key} must be within float32's range")


def test_the_largest_float32_is_still_accepted():
    assert compile_spec("q_proj: lora alpha=3.4e38").rules[0].config.alpha == 3.4e38


def test_a_merge_that_overflows_the_weights_dtype_names_the_site(tmp_path):
    """Finite adapter weights whose W₀ + s·B·A is beyond float16's 65504: the merge wrote inf
    weights and an infer artifact was exported with NaN outputs ('max abs error nan')."""
    model = load_model("llama", dtype="float16")
    gm = adaptc.compile(model, SPEC)
    with torch.no_grad():
        for name, param in gm.named_parameters():
            if param.requires_grad:
                param.fill_(1e4 if name.endswith(".B") else 1.0)
    weights = adaptc.save_adapters(gm, tmp_path / "big.safetensors")
    with pytest.raises(WeightsError, match=r"^model.layers.0.self_attn.q_proj: merging its lora "
                                           r"update gives NaN or infinite weights in float16"):
        adaptc.compile(model, SPEC, mode="infer", adapters=str(weights))


@pytest.mark.parametrize(("damage", "error", "message"), [
    (lambda a: (a / "spec.adapt").write_text("q_proj lora\n"), SpecError,
     r"spec.adapt:1:8: error\[E102\]: expected ':' after the targets"),
    (lambda a: (a / "spec.adapt").unlink(), SpecError, r"spec.adapt: error\[E100\]"),
    (lambda a: (a / "adapters.safetensors").write_bytes(b"\0" * 4), WeightsError,
     r"adapters.safetensors: cannot read adapter weights"),
])
def test_a_damaged_train_artifact_is_refused_before_its_checkpoint_loads(
        tiny, tmp_path, monkeypatch, damage, error, message):
    """adaptc.load read the checkpoint (and printed its loading bar) before it found the
    artifact's spec or adapter file damaged."""
    artifact = tmp_path / "art"
    adaptc.write_artifact(adaptc.compile(tiny("llama"), SPEC), tiny("llama"), artifact)
    damage(artifact)
    monkeypatch.setattr("adaptc.artifact.load_checkpoint",
                        lambda *a: pytest.fail("the checkpoint was loaded"))
    with pytest.raises(error, match=message) as caught:
        adaptc.load(artifact)
    assert str(caught.value).startswith(str(artifact))


@pytest.mark.parametrize(("text", "column"), [
    ("q_proj: lora r=" + "9" * 5000, 16),
    ("q_proj[" + "9" * 5000 + "]: lora", 8),
    ("q_proj[:-" + "9" * 5000 + "]: lora", 9),
])
def test_an_integer_too_long_for_python_is_e101_at_it(text, column):
    """int() refuses more than 4300 digits: a ValueError traceback from the Lark transformer."""
    with pytest.raises(SpecError) as caught:
        compile_spec(text + "\n", "long.adapt")
    first = caught.value.first
    assert (first.line, first.column, first.code) == (1, column, "E101")
    assert first.message == "an integer of 5000 digits is too long to read (at most 4300)"


@pytest.mark.parametrize(("content", "reason"), [
    (lambda path: path.write_bytes(b"garbage\n"),
     "not a PyTorch checkpoint (torch.save's zip archive)"),
    (lambda path: torch.save({"x": torch.zeros(1), "args": argparse.Namespace(a=1)}, path),
     "holds objects besides tensors, which adaptc does not unpickle (it could run code): save "
     "the checkpoint as safetensors"),
])
def test_an_unreadable_pytorch_model_bin_says_why(tiny, tmp_path, content, reason):
    """Both were torch.load's 'Weights only load failed ... Re-running `torch.load` with
    `weights_only` set to `False` will likely succeed', advice to run arbitrary code, given
    for a damaged file too."""
    tiny("llama").module.save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    content(tmp_path / "pytorch_model.bin")
    with pytest.raises(ModelError) as caught:
        load_model(str(tmp_path))
    assert str(caught.value) == (f"{tmp_path}: cannot load the checkpoint weights: "
                                 f"{tmp_path / 'pytorch_model.bin'}: {reason}")


def test_a_config_value_transformers_cannot_build_names_the_config(tiny, tmp_path):
    """rope_scaling of an unknown type: from_pretrained's KeyError was reported as
    "<dir>: cannot load the checkpoint weights: 'foo'", the bare key, blaming the weights."""
    tiny("llama").module.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["rope_scaling"] = {"type": "foo", "factor": 2.0}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelError) as caught:
        load_model(str(tmp_path))
    assert str(caught.value) == (f"{tmp_path / 'config.json'}: cannot build the model from it: "
                                 "KeyError 'foo' (a value there that transformers does not know?)")


@pytest.mark.parametrize(("about", "reason"), [
    ({"max_cache_len": "x"}, 'max_cache_len is "x", not an integer >= 0'),
    ({"virtual_tokens": -5}, "virtual_tokens is -5, not an integer >= 0"),
    ({"vocab_size": True}, "vocab_size is true, not an integer >= 0"),
])
def test_a_hand_edited_decoding_description_names_the_entry(tmp_path, about, reason):
    """Were a TypeError or IndexError traceback from inside the decoder, once its programs had
    loaded."""
    folder = tmp_path / "decoding"
    folder.mkdir()
    description = {"format": 1, "kind": "causal", "max_cache_len": 128, "vocab_size": 512,
                   "virtual_tokens": 0, **about}
    (folder / "decoding.json").write_text(json.dumps(description))
    with pytest.raises(ArtifactError) as caught:
        load_decoding(tmp_path)
    assert str(caught.value) == (f"{folder / 'decoding.json'}: not a decoding description "
                                 f"({reason})")


def test_merging_on_the_meta_device_skips_the_overflow_check():
    """Shapes only (full-size presets, --device meta): there are no values to check."""
    model = load_model("llama", device="meta")
    gm = adaptc.compile(model, "q_proj: lora r=4; v_proj: ia3", mode="infer")
    assert adaptc.report_of(gm).counts["lora_merged"] == 4


@pytest.mark.parametrize(("line", "column", "note"), [
    ("q_proj: lora init=\u201cgaussian\u201d", 19, "'\u201c' is U+201C, which looks like '\"'; write '\"'"),
    ("q_proj: lora r=\u22121", 16, "'\u2212' is U+2212, which looks like '-'; write '-'"),
    ("q_proj:\u00a0lora", 8, "'\\xa0' is U+00A0, which looks like a space; write a space"),
])
def test_a_lookalike_character_gets_a_note_naming_it(line, column, note):
    """Copied from a word processor: the caret pointed at what looks like a quote, a minus or
    a space, with no word on what was wrong."""
    with pytest.raises(SpecError) as caught:
        compile_spec(line + "\n", "pasted.adapt")
    first = caught.value.first
    assert (first.line, first.column, first.code, first.notes) == (1, column, "E101", (note,))
