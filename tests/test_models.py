"""Model sources: local checkpoint directories, bad paths, and per-pass graph dumps."""
from __future__ import annotations

import json

import pytest
import torch

import adaptc
from adaptc.cli import main
from adaptc.errors import ModelError, PassError
from adaptc.frontend.models import load_model
from adaptc.passes import CompileContext, PassManager
from helpers import bert_classifier, inputs


def test_compile_from_checkpoint_directory(tiny, tmp_path, capsys):
    model = tiny("gpt2")
    model.module.save_pretrained(tmp_path / "ckpt")
    loaded = load_model(str(tmp_path / "ckpt"))
    ids = torch.randint(0, 512, (2, 5))
    assert torch.equal(loaded.module(input_ids=ids).logits, model.module(input_ids=ids).logits)
    spec = tmp_path / "s.adapt"
    spec.write_text("attn.qkv: lora r=4\n")
    (tmp_path / "dump").mkdir()
    (tmp_path / "dump" / "17_from_an_earlier_run.py").write_text("stale")
    (tmp_path / "dump" / "notes.txt").write_text("the user's")
    assert main(["compile", str(spec), "--model", str(tmp_path / "ckpt"),
                 "--dump-passes", str(tmp_path / "dump")]) == 0
    assert "lora_inserted=2" in capsys.readouterr().out
    dumps = sorted(p.name for p in (tmp_path / "dump").iterdir())
    assert dumps[:3] == ["01_canonicalize_linears.py", "02_locate_sites.py", "03_insert_lora.py"]
    assert "17_from_an_earlier_run.py" not in dumps and "notes.txt" in dumps
    assert "c_attn.lora" in (tmp_path / "dump" / "03_insert_lora.py").read_text()


@pytest.mark.parametrize(("stored", "config"), [(torch.float32, "bfloat16"),
                                                (torch.bfloat16, "float32")])
def test_a_checkpoint_loads_in_the_dtype_its_files_hold(tiny, tmp_path, stored, config):
    """Without --dtype the weights stay as stored: from_pretrained's "auto" took config.json's
    dtype, rounding float32 files to bfloat16 or doubling bfloat16 ones to float32."""
    model = tiny("llama").module.to(stored)
    model.save_pretrained(tmp_path / "ckpt")
    written = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps({**written, "dtype": config}))
    loaded = load_model(str(tmp_path / "ckpt")).module
    assert {p.dtype for p in loaded.parameters()} == {stored}
    assert all(torch.equal(a, b) for a, b in zip(loaded.parameters(), model.parameters()))
    asked = load_model(str(tmp_path / "ckpt"), dtype="float16").module
    assert {p.dtype for p in asked.parameters()} == {torch.float16}


def test_an_artifact_given_as_model_points_at_its_checkpoint(tiny, tmp_path, capsys):
    """`--model DIR` with a train artifact said only 'no config.json'; it names DIR/model."""
    model = tiny("llama")
    adaptc.write_artifact(adaptc.compile(model, "q_proj: lora r=2"), model, tmp_path / "dist")
    assert main(["inspect", "specs/lora_qv.adapt", "--model", str(tmp_path / "dist")]) == 1
    assert capsys.readouterr().err.strip().endswith(
        f"{tmp_path / 'dist'}: not a Hugging Face checkpoint directory (no config.json); an "
        f"adaptc artifact keeps its checkpoint in {tmp_path / 'dist' / 'model'}")


def test_a_checkpoint_directory_named_like_a_preset(tiny, tmp_path, monkeypatch):
    """`--model ./llama` is the directory; its source was `llama`, taken for the preset by
    the writers: the tokenizer was not copied and `-o ./llama --force` deleted the checkpoint."""
    from helpers import save_word_tokenizer

    monkeypatch.chdir(tmp_path)
    tiny("llama").module.save_pretrained("llama")
    save_word_tokenizer("llama")
    (tmp_path / "s.adapt").write_text("q_proj: lora r=2\n")
    assert main(["compile", "s.adapt", "--model", "./llama", "--mode", "infer", "-o", "out"]) == 0
    assert (tmp_path / "out" / "hf" / "tokenizer.json").is_file()
    model = load_model("./llama")
    with pytest.raises(adaptc.ArtifactError, match="the output is the model checkpoint"):
        adaptc.write_artifact(adaptc.compile(model, "q_proj: lora r=2"), model, "llama",
                              force=True)
    assert (tmp_path / "llama" / "config.json").is_file()
    with pytest.raises(ModelError, match="both a preset and a checkpoint directory here: "
                                         "write ./llama"):
        load_model("llama")  # was the preset's random weights, silently


def test_bad_checkpoint_directories(tmp_path):
    with pytest.raises(ModelError, match="no config.json"):
        load_model(str(tmp_path))
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelError, match="config.json: cannot read the model config"):
        load_model(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": "x"}))
    with pytest.raises(ModelError, match="cannot read the model config: .*'hidden_size'"):
        load_model(str(tmp_path))  # huggingface_hub's validation error, not a traceback
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ModelError, match="cannot load the checkpoint weights"):
        load_model(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "vit"}))
    with pytest.raises(ModelError, match="config.json: model type 'vit' has no "
                                         "AutoModelForCausalLM class"):
        load_model(str(tmp_path))  # was "cannot load the checkpoint weights: <class '...'>"
    (tmp_path / "config.json").write_text(json.dumps(
        {"model_type": "vit", "architectures": ["ViTForImageClassification"]}))
    with pytest.raises(ModelError, match=r"config.json: a 'vit' model reads no token ids .*"
                                         r"adaptc.compile\(module, spec, example_inputs=...\)"):
        load_model(str(tmp_path))  # was "ViTForImageClassification: pass example_inputs"


@pytest.mark.parametrize("damage,message", [
    ("truncate", "cannot load the checkpoint weights: .*model.safetensors: Error while "
                 "deserializing header"),
    ("reshape", r"tensor 'model.layers.0.self_attn.q_proj.weight' has shape \(128, 64\), "
                r"the model's config gives \(128, 128\)"),
    ("drop", "lacks 1 tensor.*first 'model.layers.1.mlp.up_proj.weight'"),
    ("int32", r"model.safetensors: tensor 'model.layers.0.self_attn.q_proj.weight' is stored "
              r"as I32; the model needs floating-point values \(torch.float32\)"),
    ("nan", r"model.safetensors: tensor 'model.layers.0.self_attn.q_proj.weight' has 1 NaN "
            r"or infinite value\(s\)"),
    ("inf", r"model.safetensors: tensor 'model.norm.weight' has 2 NaN or infinite value"),
])
def test_damaged_checkpoint_weights_name_the_tensor(tiny, tmp_path, damage, message):
    """transformers would load these with random weights in place of the bad tensors."""
    from safetensors.torch import load_file, save_file
    tiny("llama").module.save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    if damage == "truncate":
        weights.write_bytes(weights.read_bytes()[:1000])
    else:
        tensors = load_file(weights)
        name = "model.layers.0.self_attn.q_proj.weight"
        if damage == "reshape":
            tensors[name] = tensors[name][:, :64].contiguous()
        elif damage == "int32":  # transformers cast it to float32: whole numbers
            tensors[name] = (tensors[name] * 100).to(torch.int32)
        elif damage == "nan":
            tensors[name][3, 5] = float("nan")
        elif damage == "inf":
            tensors["model.norm.weight"][:2] = torch.tensor([float("inf"), -float("inf")])
        else:
            del tensors["model.layers.1.mlp.up_proj.weight"]
        save_file(tensors, weights, metadata={"format": "pt"})
    with pytest.raises(ModelError, match=message):
        load_model(str(tmp_path))


@pytest.mark.parametrize("damage", ["truncate", "delete", "index"])
def test_a_damaged_shard_is_named(tiny, tmp_path, damage):
    """from_pretrained's error for a sharded checkpoint did not say which of its files was
    truncated or missing ('invalid header length')."""
    tiny("llama").module.save_pretrained(tmp_path, max_shard_size="200KB")
    shards = sorted(tmp_path.glob("model-*.safetensors"))
    assert len(shards) > 2
    bad = shards[1]
    if damage == "truncate":
        bad.write_bytes(bad.read_bytes()[:100])
    elif damage == "delete":
        bad.unlink()
    else:
        bad = tmp_path / "model.safetensors.index.json"
        bad.write_text('{"weight_map": ')
    with pytest.raises(ModelError, match=f"cannot load the checkpoint weights: {bad}: "):
        load_model(str(tmp_path))


class Broken:
    name = "broken"

    def run(self, gm, ctx):
        raise RuntimeError("boom")


class Fine:
    name = "fine"

    def run(self, gm, ctx):
        from adaptc.passes import PassResult
        return PassResult(gm)


def test_pass_failure_names_the_pass_and_those_before(tiny):
    gm = torch.fx.symbolic_trace(torch.nn.Linear(2, 2))
    with pytest.raises(PassError, match=r"pass 'broken' failed \(after: fine\): boom") as info:
        PassManager([Fine(), Broken()]).run(gm, CompileContext(None, None, []))
    assert isinstance(info.value.__cause__, RuntimeError)
    assert adaptc.PassError is PassError


def test_compile_names_a_bad_spec_or_mode_argument(tiny):
    with pytest.raises(TypeError, match="spec must be spec text, a path to a .adapt file or a "
                                        "Plan, got int"):
        adaptc.compile(tiny("llama"), 123)
    with pytest.raises(adaptc.AdaptcError, match="unknown mode 'Infer': choose one of train, infer"):
        adaptc.compile(tiny("llama"), "q_proj: lora", mode="Infer")
    with pytest.raises(TypeError, match="model must be a preset name, a checkpoint directory "
                                        "or an nn.Module, got int"):
        adaptc.compile(42, "q_proj: lora")


def test_report_of_a_module_adaptc_did_not_compile(tiny):
    """An AttributeError ('no attribute meta') or a KeyError from the graph's meta before."""
    with pytest.raises(adaptc.AdaptcError, match="LlamaForCausalLM has no compile report"):
        adaptc.report_of(tiny("llama").module)
    with pytest.raises(adaptc.AdaptcError, match="Linear has no compile report"):
        adaptc.report_of(torch.fx.symbolic_trace(torch.nn.Linear(2, 2)))


def test_load_model_places_presets():
    model = adaptc.load_model("llama", dtype="bfloat16")
    assert {p.dtype for p in model.module.parameters()} == {torch.bfloat16}
    gm = adaptc.compile(model, "q_proj: lora r=2")
    ids = torch.randint(0, 100, (1, 4))
    assert gm(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.dtype == torch.bfloat16
    with pytest.raises(ModelError, match="unknown dtype 'float8'"):
        adaptc.load_model("llama", dtype="float8")


def test_checkpoint_keeps_the_head_its_config_names(tmp_path):
    """A sequence-classification checkpoint compiles with its classifier (config.json's
    `architectures`), trains it with `classifier: train` on sentence pairs, and its merged
    hf/ and program.pt2 load back with the trained module's logits."""
    from transformers import AutoModelForSequenceClassification
    bert_classifier().save_pretrained(tmp_path / "cls")
    spec = "attn.q,attn.v: lora r=2; classifier: train"
    gm = adaptc.compile(str(tmp_path / "cls"), spec)
    x = inputs(vocab=128, batch=4, seq=6, seed=0, segments=True)
    labels = torch.tensor([0, 1, 2, 1])
    optimizer = torch.optim.AdamW([p for p in gm.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(10):
        loss = torch.nn.functional.cross_entropy(gm(**x).logits, labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert gm(**x).logits.shape == (4, 3) and losses[-1] < losses[0]
    adaptc.save_adapters(gm, tmp_path / "a.safetensors")
    (tmp_path / "s.adapt").write_text(spec + "\n")
    assert main(["compile", str(tmp_path / "s.adapt"), "--model", str(tmp_path / "cls"),
                 "--mode", "infer", "--adapters", str(tmp_path / "a.safetensors"),
                 "-o", str(tmp_path / "serve")]) == 0
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "serve" / "hf")
    gm.eval()
    assert (reloaded(**x).logits - gm(**x).logits).abs().max().item() <= 1e-5
    program = adaptc.load_program(tmp_path / "serve").module()
    assert (program(**x).logits - gm(**x).logits).abs().max().item() <= 1e-5
    single = {k: v for k, v in x.items() if k != "token_type_ids"}
    assert (gm(**x).logits - gm(**single).logits).abs().max().item() > 1e-4


def test_cli_prints_one_line_for_a_misshapen_checkpoint(tiny, tmp_path):
    """The ModelError alone, not also transformers' LOAD REPORT table of the same tensors."""
    import subprocess
    import sys
    from pathlib import Path

    from safetensors.torch import load_file, save_file
    tiny("llama").module.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    tensors["model.norm.weight"] = tensors["model.norm.weight"][:64].contiguous()
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    result = subprocess.run([sys.executable, "-m", "adaptc.cli", "compile", "specs/lora_qv.adapt",
                             "--model", str(tmp_path)], capture_output=True, text=True,
                            cwd=Path(__file__).resolve().parents[1], timeout=300)
    assert result.returncode == 1
    assert result.stderr == (f"{tmp_path}: tensor 'model.norm.weight' has shape (64,), the "
                             "model's config gives (128,) (1 tensor(s) mismatched)\n")


def test_only_the_files_the_checkpoint_loads_from_are_checked(tiny, tmp_path):
    """A stray .safetensors beside the weights (a truncated download) was opened by the value
    check and raised SafetensorError with a traceback; a shard of a sharded checkpoint is
    still checked."""
    from safetensors.torch import load_file, save_file
    tiny("llama").module.save_pretrained(tmp_path, max_shard_size="100KB")
    (tmp_path / "partial.safetensors").write_bytes(b"\x00" * 100)
    assert load_model(str(tmp_path)).source == str(tmp_path)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]
    name = "model.layers.0.self_attn.q_proj.weight"
    tensors = load_file(tmp_path / index[name])
    tensors[name] = tensors[name].to(torch.int32)
    save_file(tensors, tmp_path / index[name], metadata={"format": "pt"})
    with pytest.raises(ModelError, match=rf"{index[name]}: tensor '{name}' is stored as I32"):
        load_model(str(tmp_path))


def test_a_checkpoint_of_custom_code_is_refused_without_asking(tiny, tmp_path, capsys):
    """A config.json with auto_map made transformers ask "Do you wish to run the custom code?
    [y/N]" on the terminal (15 s, and 'y' ran the directory's code); adaptc runs none."""
    tiny("llama").module.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config.update(model_type="my_llama", auto_map={"AutoConfig": "modeling.MyConfig"})
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelError, match=r"config.json: the model is defined by custom code in "
                                         r"the checkpoint \(auto_map\), which adaptc does not run"):
        load_model(str(tmp_path))
    assert "Do you wish" not in capsys.readouterr().out


def test_a_pytorch_model_bin_is_checked_as_safetensors_are(tiny, tmp_path):
    """int32 weights in a pytorch_model.bin loaded as whole numbers: only safetensors headers
    were read for the stored dtypes."""
    from safetensors.torch import load_file
    tiny("llama").module.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    (tmp_path / "model.safetensors").unlink()
    name = "model.layers.0.self_attn.q_proj.weight"
    torch.save(tensors, tmp_path / "pytorch_model.bin")
    assert torch.equal(load_model(str(tmp_path)).module.get_parameter(name), tensors[name])
    tensors[name] = (tensors[name] * 100).to(torch.int32)
    torch.save(tensors, tmp_path / "pytorch_model.bin")
    with pytest.raises(ModelError, match=rf"pytorch_model.bin: tensor '{name}' is stored as int32; "
                                         r"the model needs floating-point values"):
        load_model(str(tmp_path))


@pytest.mark.parametrize("name,suggested", [("lama", "llama"), ("Llama", "llama"),
                                            ("llama7b", "llama-7b"), ("gtp2", "gpt2"),
                                            ("flan-t5", "flan-t5-xl")])
def test_an_unknown_model_name_suggests_the_nearest_presets(name, suggested, tmp_path,
                                                            monkeypatch):
    """`--model lama` named every preset but not the one meant; the message also says that
    a checkpoint directory's path is taken."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelError) as err:
        load_model(name)
    message = str(err.value)
    assert message.startswith(f"unknown model '{name}': not a preset")
    assert "did you mean" in message and f"'{suggested}'" in message.split("?")[0]
    assert "checkpoint directory" in message and "config.json" in message


def test_an_unknown_model_name_far_from_every_preset_suggests_none(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelError) as err:
        load_model("no-such-model")
    assert "did you mean" not in str(err.value)
    assert "llama, mistral" in str(err.value)  # the presets are still listed


def test_a_missing_checkpoint_path_is_named_as_a_path(tmp_path):
    """A name with a slash is a path, not a misspelled preset."""
    with pytest.raises(ModelError, match=r"no such checkpoint directory") as err:
        load_model(str(tmp_path / "llama"))
    assert "did you mean" not in str(err.value)


def test_cli_suggests_the_preset_meant(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "x.adapt").write_text("attn.q: lora r=2\n")
    assert main(["inspect", "x.adapt", "--model", "lama"]) == 1
    err = capsys.readouterr().err
    assert "did you mean 'llama'" in err and len(err.strip().splitlines()) == 1


def test_a_model_passed_as_an_object_is_named_by_its_class(tiny):
    """Messages and reports called a Python model "python" ("python has 2 layers")."""
    from adaptc.frontend.models import wrap

    module = tiny("llama").module
    with pytest.raises(adaptc.errors.AdaptcError,
                       match=r"block 9 is out of range: LlamaForCausalLM \(Python object\) "
                             r"has 2 layers"):
        adaptc.inspect(module, "attn.q: lora r=2", block=9)
    gm = adaptc.compile(module, "attn.q: lora r=2")
    assert adaptc.report_of(gm).model == "LlamaForCausalLM (Python object)"
    assert wrap(module, source="mine").source == "mine"
