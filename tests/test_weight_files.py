"""Adapter weight files and artifacts that are damaged or do not fit the compiled module are
refused with an error naming the file and the tensor, before any weight is changed."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import adaptc
from adaptc.errors import ArtifactError, WeightsError

SPEC = "q_proj,v_proj: lora r=4"
FIRST = "model.layers.0.self_attn.q_proj.lora.A"


@pytest.fixture
def saved(tiny, tmp_path):
    """(train-mode module, its adapter file)."""
    gm = adaptc.compile(tiny("llama"), SPEC)
    return gm, adaptc.save_adapters(gm, tmp_path / "a.safetensors")


def damaged(saved, tmp_path, change) -> str:
    tensors = load_file(saved[1])
    change(tensors)
    path = tmp_path / "bad.safetensors"
    save_file(tensors, path)
    return str(path)


@pytest.mark.parametrize(("change", "message"), [
    (lambda t: t.pop(FIRST), rf"1 missing, 0 unexpected; missing {FIRST}"),
    (lambda t: t.update(extra=torch.zeros(2)), "0 missing, 1 unexpected; unexpected extra"),
    (lambda t: t.update({FIRST: torch.zeros(5, 128)}),
     rf"tensor '{FIRST}' has shape \(5, 128\), the compiled module expects \(4, 128\)"),
    (lambda t: t.update({FIRST: torch.zeros(4, 128, dtype=torch.int64)}),
     rf"tensor '{FIRST}' has dtype torch.int64, the compiled module expects floating point"),
    (lambda t: t[FIRST].__setitem__((0, 0), float("nan")),
     rf"tensor '{FIRST}' holds NaN or infinite values"),
    (lambda t: t[FIRST].__setitem__((1, 2), float("inf")), "holds NaN or infinite"),
    (lambda t: t.update({FIRST: torch.full((4, 128), float("nan")).to(torch.float8_e4m3fn)}),
     "holds NaN or infinite"),  # torch has no isfinite for fp8: a NotImplementedError
])
def test_bad_adapter_files_name_the_tensor_and_change_nothing(saved, tmp_path, change, message):
    gm, _ = saved
    before = {k: v.clone() for k, v in adaptc.adapter_state_dict(gm).items()}
    path = damaged(saved, tmp_path, change)
    with pytest.raises(WeightsError, match=message) as err:
        adaptc.load_adapters(gm, path)
    assert str(err.value).startswith(path)
    after = adaptc.adapter_state_dict(gm)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_a_file_of_another_spec_is_refused_with_the_spec_it_was_saved_from(saved, tiny):
    """The file's metadata keeps its spec; damaged() rewrote the file without it above."""
    other = adaptc.compile(tiny("llama"), "k_proj: lora r=4")
    with pytest.raises(WeightsError) as err:
        adaptc.load_adapters(other, saved[1])
    assert str(err.value).endswith(
        "(4 missing, 8 unexpected; missing model.layers.0.self_attn.k_proj.lora.A)\n"
        f"  the file was saved from a module compiled from this spec:\n    {SPEC}")


def test_a_file_of_the_same_spec_on_another_model_says_the_model_differs(saved):
    """Saved from a 3-layer model, loaded into the 2-layer one: the spec is the same, so
    printing it as "the spec it was saved from" pointed at the wrong cause."""
    from adaptc.frontend.models import build_preset

    deeper = adaptc.compile(build_preset("llama", layers=3), SPEC)
    path = adaptc.save_adapters(deeper, saved[1].parent / "deeper.safetensors")
    with pytest.raises(WeightsError) as err:
        adaptc.load_adapters(saved[0], path)
    assert str(err.value).endswith(
        "(0 missing, 4 unexpected; unexpected model.layers.2.self_attn.q_proj.lora.A)\n"
        "  the file was saved from a module compiled from the same spec onto another model "
        "(other layers or module names)")


def test_a_torch_compiled_module_saves_and_loads_under_the_compiled_names(saved, tiny, tmp_path):
    """torch.compile wraps the module as `_orig_mod`: its files held `_orig_mod.model...`
    names, which no freshly compiled module loaded."""
    gm, _ = saved
    with torch.no_grad():
        adaptc.adapter_state_dict(gm)[FIRST].fill_(0.25)
    path = adaptc.save_adapters(torch.compile(gm), tmp_path / "compiled.safetensors")
    assert sorted(load_file(path)) == sorted(adaptc.adapter_state_dict(gm))
    fresh = adaptc.compile(tiny("llama"), SPEC)
    adaptc.load_adapters(torch.compile(fresh), path)
    assert torch.equal(adaptc.adapter_state_dict(fresh)[FIRST], torch.full((4, 128), 0.25))


def test_half_precision_adapter_files_load_into_float32(saved, tmp_path):
    """A file saved from a bf16 module loads into a float32 one (values cast, as copy_ does)."""
    gm, _ = saved
    path = damaged(saved, tmp_path, lambda t: t.update(
        {k: (v + 0.5).to(torch.bfloat16) for k, v in t.items()}))
    adaptc.load_adapters(gm, path)
    assert torch.equal(adaptc.adapter_state_dict(gm)[FIRST],
                       load_file(path)[FIRST].float())


def test_values_beyond_the_modules_dtype_are_refused(saved, tiny, tmp_path):
    """A float32 file into a float16 infer-mode module (train mode keeps a float16 model's
    adapters in float32): copy_ turned 1e5 into inf silently."""
    model = tiny("llama")
    model.module.half()
    path = damaged(saved, tmp_path, lambda t: t[FIRST].__setitem__((0, 0), 1e5))
    with pytest.raises(WeightsError, match=rf"tensor '{FIRST}' has values beyond the range "
                                           "of torch.float16"):
        adaptc.compile(model, SPEC, "infer", adapters=path)


def test_unreadable_adapter_files(saved, tmp_path):
    gm, path = saved
    with pytest.raises(WeightsError, match="no-such.safetensors: cannot read adapter weights"):
        adaptc.load_adapters(gm, tmp_path / "no-such.safetensors")
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(path.read_bytes()[:100])
    with pytest.raises(WeightsError, match="cut.safetensors: cannot read adapter weights"):
        adaptc.load_adapters(gm, cut)


def test_an_infer_mode_module_has_no_adapters_to_save(saved, tiny, tmp_path):
    """Its adapters are merged into its weights: the file and the artifact held no tensors
    (an artifact of it reloaded as the initial adapters: the trained weights were lost)."""
    infer = adaptc.compile(tiny("llama"), SPEC, "infer", adapters=saved[1])
    with pytest.raises(WeightsError, match="an infer-mode module holds its adapters merged"):
        adaptc.save_adapters(infer, tmp_path / "i.safetensors")
    with pytest.raises(ArtifactError, match="dist: write_artifact takes a train-mode module"):
        adaptc.write_artifact(infer, tiny("llama"), tmp_path / "dist")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors"]


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    from adaptc.cli import main
    out = tmp_path_factory.mktemp("artifact") / "dist"
    spec = out.parent / "s.adapt"
    spec.write_text(SPEC + "\n")
    assert main(["compile", str(spec), "--model", "llama", "-o", str(out)]) == 0
    return out


@pytest.mark.parametrize(("manifest", "message"), [
    ("{oops", r"manifest.json: not valid JSON \(Expecting property name"),
    ("[1, 2]", r"manifest.json: not an artifact manifest \(a JSON list, not an object\)"),
    ("{}", "manifest.json: no 'format' entry"),
    (json.dumps({"format": "something-else"}), "unsupported artifact format something-else"),
])
def test_damaged_manifests_name_the_file(artifact, tmp_path, manifest, message):
    copy = tmp_path / "copy"
    shutil.copytree(artifact, copy)
    (copy / "manifest.json").write_text(manifest)
    with pytest.raises(ArtifactError, match=message):
        adaptc.load(copy)
    format_ok = json.loads((artifact / "manifest.json").read_text())
    del format_ok["mode"]
    (copy / "manifest.json").write_text(json.dumps(format_ok))
    with pytest.raises(ArtifactError, match="no 'mode' entry"):
        adaptc.load(copy)
    (copy / "manifest.json").write_text(json.dumps({**format_ok, "mode": "banana"}))
    with pytest.raises(ArtifactError, match="manifest.json: unknown mode 'banana'"):
        adaptc.load(copy)  # was the compiler's "unknown mode 'banana'", naming no file


def test_damaged_program_files_are_one_line_errors(tmp_path, capfd):
    """Not a zip, or a zip that is no program: an ArtifactError with the first error torch
    met, and nothing on stderr (torch.export.load logs that error's traceback as a warning)."""
    import zipfile
    garbage = tmp_path / "garbage.pt2"
    garbage.write_bytes(b"not a program")
    with pytest.raises(ArtifactError, match="garbage.pt2: cannot load the exported program: "
                                            "not a zip archive"):
        adaptc.load_program(garbage)
    other = tmp_path / "other.pt2"
    with zipfile.ZipFile(other, "w") as archive:
        archive.writestr("notes/a.txt", "hi")
    with pytest.raises(ArtifactError, match="other.pt2: cannot load the exported program: ") as err:
        adaptc.load_program(other)
    assert "\n" not in str(err.value) and "warnings above" not in str(err.value)
    assert capfd.readouterr().err == ""


def test_adapters_trained_with_another_alpha_are_refused(saved, tiny, tmp_path):
    """Same names and shapes, another scale: the file loaded silently and the module computed
    other outputs. The file records each site's output-changing options; training-only keys
    (dropout) may differ."""
    gm, path = saved
    other = adaptc.compile(tiny("llama"), SPEC + " alpha=32")
    before = {k: v.clone() for k, v in adaptc.adapter_state_dict(other).items()}
    with pytest.raises(WeightsError) as err:
        adaptc.load_adapters(other, path)
    lines = str(err.value).splitlines()
    assert lines[0] == (f"{path}: the adapters were trained with other options than the "
                        "compiled module's, so they would compute other outputs (4 sites):")
    assert lines[1] == "  model.layers.0.self_attn.q_proj lora: alpha=8 in the file, alpha=32 here"
    assert lines[-2:] == ["  the file was saved from a module compiled from this spec:",
                          f"    {SPEC}"]
    after = adaptc.adapter_state_dict(other)
    assert all(torch.equal(before[k], after[k]) for k in before)
    with pytest.raises(WeightsError, match="rslora=false in the file, rslora=true here"):
        adaptc.compile(tiny("llama"), SPEC + " rslora=true", "infer", adapters=path)
    with torch.no_grad():
        adaptc.adapter_state_dict(gm)[FIRST.replace(".A", ".B")].normal_()
    adaptc.save_adapters(gm, path)
    dropout = adaptc.compile(tiny("llama"), SPEC + " dropout=0.5").eval()
    adaptc.load_adapters(dropout, path)
    ids = {"input_ids": torch.tensor([[3, 9, 27, 81]]), "attention_mask": torch.ones(1, 4, dtype=torch.long)}
    with torch.no_grad():
        assert torch.equal(dropout(**ids).logits, gm.eval()(**ids).logits)


def test_a_mixture_with_another_k_is_refused(tiny, tmp_path):
    """The mixture statement's options are recorded beside the LoRA statement's."""
    spec = "q_proj: lora r=2\nmixture moe experts=4 k={k}"
    path = adaptc.save_adapters(adaptc.compile(tiny("llama"), spec.format(k=2)),
                                tmp_path / "m.safetensors")
    with pytest.raises(WeightsError, match=r"q_proj moe: k=2 in the file, k=1 here"):
        adaptc.load_adapters(adaptc.compile(tiny("llama"), spec.format(k=1)), path)
    adaptc.load_adapters(adaptc.compile(tiny("llama"), spec.format(k=2) + " balance=0.5"), path)


def test_a_decoder_checks_the_options_under_its_prefix(saved, tiny, tmp_path):
    """compile_decoder traces the model inside a cache wrapper (site paths start `model.`);
    the error names the sites as the file does."""
    from adaptc.decode import compile_decoder
    folder = tmp_path / "ckpt"
    tiny("llama").module.save_pretrained(folder)
    with pytest.raises(WeightsError, match=r"\n  model\.layers\.0\.self_attn\.q_proj lora: "
                                           "alpha=8 in the file, alpha=2 here"):
        compile_decoder(str(folder), SPEC + " alpha=2", adapters=saved[1], max_cache_len=8)
    compile_decoder(str(folder), SPEC, adapters=saved[1], max_cache_len=8)
