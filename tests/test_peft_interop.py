"""PEFT adapter directories both ways: export → PeftModel.from_pretrained gives our outputs;
a PEFT directory → spec + weights gives PEFT's outputs; anything else is an InteropError."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from peft import (IA3Config, LNTuningConfig, LoraConfig, PeftModel, PromptTuningConfig,
                  VeraConfig, get_peft_model)

import adaptc
from adaptc.peft_interop import export_peft, import_peft, spec_from_peft
from helpers import inputs, main_output

TOL = 1e-5


def perturb(tensors, seed=0, scale=0.1):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in tensors:
            tensor.add_(torch.randn(tensor.shape, generator=gen) * scale)


def close(a, b) -> float:
    return (main_output(a) - main_output(b)).abs().max().item()


# ---- export -------------------------------------------------------------------------------

EXPORTS = [
    ("llama", "q_proj,v_proj: lora r=4 alpha=8\nv_proj[1]: lora r=8 alpha=4"),
    ("gpt2", "c_attn,c_fc: lora r=4 alpha=8 rslora"),
    ("gpt2", "c_attn,lm_head: lora r=4 alpha=8"),  # Conv1D and Linear: PEFT sets fan_in_fan_out per layer
    ("llama", "q_proj,down_proj: lora r=4 alpha=8 dora"),
    ("llama", "q_proj,v_proj: lora r=4 alpha=8 init=pissa"),
    ("bert", "key,value: ia3\noutput.dense: ia3 feedforward"),
    ("llama", "q_proj,v_proj,down_proj: vera r=16 seed=3"),
    ("llama", "*norm*: train"),  # LN_TUNING
    ("bert", "*LayerNorm*: train"),  # LayerNorm with bias: weight and bias copies
    ("bert", "*.bias: train"),  # BitFit as LN_TUNING of the owners (their weights unchanged)
]


@pytest.mark.parametrize("family,spec", EXPORTS, ids=[s.split(":")[0] + f"-{f}" for f, s in EXPORTS])
def test_export_loads_in_peft(tiny, tmp_path, family, spec):
    model = tiny(family)
    gm = adaptc.compile(model, spec).eval()
    perturb(adaptc.adapter_state_dict(gm).values())
    export_peft(gm, tmp_path)
    theirs = PeftModel.from_pretrained(copy.deepcopy(model.module), tmp_path).eval()
    x = inputs()
    assert close(gm(**x), theirs(**x)) <= TOL
    assert close(gm(**x), model.module(**x)) > 1e-3
    assert theirs.get_nb_trainable_parameters()[0] in (0, adaptc.report_of(gm).trainable)


def test_export_names_match_peft(tiny, tmp_path):
    from safetensors.torch import load_file
    gm = adaptc.compile(tiny("llama"), "q_proj[0]: lora r=2 dora")
    export_peft(gm, tmp_path, task_type="CAUSAL_LM")
    names = set(load_file(str(tmp_path / "adapter_model.safetensors")))
    stem = "base_model.model.model.layers.0.self_attn.q_proj"
    assert names == {f"{stem}.lora_A.weight", f"{stem}.lora_B.weight",
                     f"{stem}.lora_magnitude_vector"}
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert config["target_modules"] == ["model.layers.0.self_attn.q_proj"]


@pytest.mark.parametrize("spec,message", [
    ("q_proj: lora r=2\nk_proj: ia3", "holds one method; this module has IA3 and LORA"),
    ("q_proj: lora r=2\nv_proj: lora r=2 rslora", "one 'use_rslora' per adapter"),
    ("ffn: adapter bottleneck=4", "BottleneckAdapter: adaptc exports lora"),
    ("*norm*: train\nq_proj: lora r=2", "this module has LN_TUNING and LORA"),
    ("q_proj: adalora total_step=5\nk_proj: vera r=4", "this module has ADALORA and VERA"),
])
def test_export_refuses_what_peft_cannot_hold(tiny, tmp_path, spec, message):
    gm = adaptc.compile(tiny("llama"), spec)
    with pytest.raises(adaptc.AdaptcError, match=message):
        export_peft(gm, tmp_path)


# ---- import -------------------------------------------------------------------------------

def saved_peft(model, config, folder, seed=0):
    twin = get_peft_model(copy.deepcopy(model.module), config)
    perturb([p for p in twin.parameters() if p.requires_grad], seed)
    twin.save_pretrained(folder)
    return twin.eval()


IMPORTS = [
    ("llama", LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                         rank_pattern={"layers.1.self_attn.v_proj": 8}, alpha_pattern={"q_proj": 16}),
     "q_proj: lora r=4 alpha=16\nv_proj[0]: lora r=4 alpha=8\nv_proj[1]: lora r=8 alpha=8\n"),
    ("llama", LoraConfig(r=4, lora_alpha=8, target_modules=r".*\.1\.self_attn\.(k|o)_proj",
                         use_dora=True),
     "k_proj[1], o_proj[1]: lora r=4 alpha=8 dora"),
    ("llama", LoraConfig(r=4, lora_alpha=8, layers_to_transform=[1],  # not for full paths
                         target_modules=["model.layers.0.self_attn.q_proj", "v_proj"]),
     "q_proj[0], v_proj[1]: lora r=4 alpha=8"),
    ("llama", LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "lm_head"]),  # PEFT saves
     "lm_head"),  # lm_head's base weight too (save_embedding_layers)
    ("gpt2", LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True,
                        use_rslora=True), "c_attn: lora r=4 alpha=8 rslora"),
    ("bert", LoraConfig(r=4, lora_alpha=8, target_modules=["dense"]), None),
    ("bert", IA3Config(target_modules=["key", "value", "output.dense"],
                       feedforward_modules=["output.dense"]), "output.dense: ia3 feedforward"),
    ("llama", VeraConfig(r=8, target_modules=["q_proj", "down_proj"], projection_prng_key=5),
     "q_proj, down_proj: vera r=8 seed=5"),
    ("llama", LNTuningConfig(target_modules=["input_layernorm", "norm"]),
     "input_layernorm, norm: train"),
    ("bert", LNTuningConfig(target_modules=r".*\.1\..*LayerNorm"), ": train"),
    # a module with submodules: PEFT names their copies `ln_tuning_layers.default.<name>`
    ("gpt2", LNTuningConfig(target_modules=["ln_1", "mlp"]), "transformer.h.0.mlp, "),
    # inits that leave the base weight as it is: the saved A and B are the adapter
    ("llama", LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights="orthogonal"),
     "q_proj: lora r=4 alpha=8\n"),
    # exclude_modules: PEFT's target matching, per module (a container's entry excludes none)
    ("llama", LoraConfig(r=4, target_modules=".*_proj", exclude_modules=["self_attn", "mlp",
                                                                        "layers.0.self_attn.q_proj"]),
     "k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj, q_proj[1]: lora r=4 alpha=8"),
    # modules_to_save: a trained copy (adaptc's train) which no adapter goes inside
    ("llama", LoraConfig(r=4, target_modules=".*proj", exclude_modules=".*k_proj",
                         modules_to_save=["mlp"]), "model.layers.0.mlp, model.layers.1.mlp: train"),
    ("gpt2", IA3Config(target_modules=["c_attn", "c_proj"], feedforward_modules=["c_proj"],
                       exclude_modules=r".*attn\.c_proj"), "mlp.c_proj: ia3 feedforward"),
]


@pytest.mark.parametrize("family,config,fragment", IMPORTS,
                         ids=[f"{f}-{type(c).__name__}-{i}" for i, (f, c, _) in enumerate(IMPORTS)])
def test_import_equals_peft(tiny, tmp_path, family, config, fragment):
    model = tiny(family)
    twin = saved_peft(model, config, tmp_path)
    spec = spec_from_peft(tmp_path, model)
    if fragment:
        assert fragment in spec
    gm = import_peft(model, tmp_path)
    x = inputs()
    assert close(gm(**x), twin(**x)) <= TOL
    assert adaptc.report_of(gm).trainable == twin.get_nb_trainable_parameters()[0]


def test_import_reads_the_pickled_weights_peft_falls_back_to(tiny, tmp_path):
    """save_pretrained(safe_serialization=False) writes adapter_model.bin, which
    PeftModel.from_pretrained reads; the import said the safetensors file did not exist."""
    model = tiny("gpt2")
    config = LoraConfig(r=4, target_modules=["c_attn"], fan_in_fan_out=True, use_dora=True)
    twin = get_peft_model(copy.deepcopy(model.module), config)
    perturb([p for p in twin.parameters() if p.requires_grad])
    twin.save_pretrained(tmp_path, safe_serialization=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md", "adapter_config.json",
                                                           "adapter_model.bin"]
    theirs = PeftModel.from_pretrained(copy.deepcopy(model.module), tmp_path).eval()
    x = inputs()
    assert close(import_peft(model, tmp_path)(**x), theirs(**x)) <= TOL
    (tmp_path / "adapter_model.bin").write_bytes(b"not a pickle")
    with pytest.raises(adaptc.WeightsError, match="adapter_model.bin: cannot read the PEFT "
                                                  "adapter weights"):
        import_peft(model, tmp_path)


def test_ln_tuning_of_a_tied_weight_is_refused_both_ways(tiny, tmp_path):
    """PEFT's LN_TUNING copy of GPT-2's wte replaces the weight in wte only (lm_head reads
    the original; T5's stacks read `shared` as their own embed_tokens, so its copy is never
    read), adaptc's `train` wherever the weight is read: both ways gave other outputs."""
    model = tiny("gpt2")
    twin = saved_peft(model, LNTuningConfig(target_modules=["wte"]), tmp_path / "peft")
    gm = adaptc.compile(model, "wte: train")
    with torch.no_grad():  # PEFT's trained values, as adaptc applies them
        gm.get_parameter("transformer.wte.trained.weight").copy_(
            twin.get_parameter("base_model.model.transformer.wte.ln_tuning_layers.default.weight"))
    x = inputs()
    assert close(gm(**x), twin(**x)) > 1e-1
    with pytest.raises(adaptc.errors.InteropError, match="'transformer.wte' holds a weight "
                                                         "'lm_head' also reads .tied weights."):
        export_peft(gm, tmp_path / "out")
    with pytest.raises(adaptc.errors.InteropError, match="LN_TUNING target 'transformer.wte' "
                                                         "holds 'transformer.wte.weight', tied "
                                                         "to 'lm_head.weight'"):
        import_peft(model, tmp_path / "peft")
    saved_peft(tiny("t5"), LNTuningConfig(target_modules=["shared"]), tmp_path / "t5")
    with pytest.raises(adaptc.errors.InteropError, match="target 'shared' holds 'shared.weight', "
                                                         "tied to 'encoder.embed_tokens.weight'"):
        import_peft(tiny("t5"), tmp_path / "t5")


def test_pissa_on_lm_head_imports_with_its_saved_residual(tiny, tmp_path):
    """PEFT saves a targeted lm_head's base weight, which with PiSSA is the residual: the
    import compared it to the model's weight and refused every such directory."""
    model = tiny("llama")
    twin = saved_peft(model, LoraConfig(r=4, target_modules=["q_proj", "lm_head"],
                                        init_lora_weights="pissa"), tmp_path)
    x = inputs()
    assert close(import_peft(model, tmp_path)(**x), twin(**x)) <= TOL


def test_pissa_on_a_tied_weight_is_refused_both_ways(tiny, tmp_path):
    """PEFT's PiSSA writes the residual into the weight tensor, so GPT-2's wte, tied to
    lm_head, changes too; adaptc's residual replaces it in lm_head only."""
    model = tiny("gpt2")
    twin = saved_peft(model, LoraConfig(r=4, target_modules=["lm_head"],
                                        init_lora_weights="pissa"), tmp_path / "peft")
    wte = twin.get_parameter("base_model.model.transformer.wte.weight")
    assert (wte - model.module.transformer.wte.weight).abs().max() > 1e-2
    with pytest.raises(adaptc.errors.InteropError, match="init_lora_weights='pissa' on "
                                                         "'lm_head', whose 'lm_head.weight' is "
                                                         "tied to 'transformer.wte.weight'"):
        import_peft(model, tmp_path / "peft")
    gm = adaptc.compile(model, "lm_head: lora r=4 init=pissa")
    with pytest.raises(adaptc.errors.InteropError, match="'lm_head': its weight is tied to "
                                                         "another module's, and PEFT's "
                                                         "init_lora_weights='pissa'"):
        export_peft(gm, tmp_path / "out")


def test_named_adapters_import_from_their_subdirectories(tiny, tmp_path):
    """save_pretrained writes an adapter not named `default` into `<dir>/<name>/`: each
    imports from there; the directory itself names them (it said no such file)."""
    model = tiny("llama")
    twin = get_peft_model(copy.deepcopy(model.module), LoraConfig(r=4, target_modules=["q_proj"]),
                          adapter_name="first")
    twin.add_adapter("second", LoraConfig(r=2, target_modules=["v_proj"]))
    perturb([p for p in twin.parameters() if p.requires_grad])
    twin.save_pretrained(tmp_path)
    x = inputs()
    for name in ("first", "second"):
        theirs = PeftModel.from_pretrained(copy.deepcopy(model.module), tmp_path / name).eval()
        assert close(import_peft(model, tmp_path / name)(**x), theirs(**x)) <= TOL
    with pytest.raises(adaptc.errors.InteropError, match="holds no adapter_config.json but PEFT "
                                                         "adapters in subdirectories first, "
                                                         "second: give one of those"):
        import_peft(model, tmp_path)


def classifier(tiny):
    from transformers import AutoModelForSequenceClassification

    from adaptc.frontend.models import wrap
    torch.manual_seed(0)
    return wrap(AutoModelForSequenceClassification.from_config(tiny("bert").module.config).eval())


@pytest.mark.parametrize("config", [
    LoraConfig(r=4, target_modules=["query", "value"], task_type="SEQ_CLS"),
    IA3Config(target_modules=["query", "value"], feedforward_modules=[], task_type="SEQ_CLS"),
    PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=3)],
    ids=["lora", "ia3", "prompt"])
def test_seq_cls_heads_travel_as_modules_to_save(tiny, tmp_path, config):
    """PEFT's SEQ_CLS model keeps its head as modules_to_save, a trained copy read from the
    file: the import refused the option, the export left the head out (PEFT's load raised
    KeyError). The head is adaptc's `train` of it, both ways."""
    model = classifier(tiny)
    twin = saved_peft(model, config, tmp_path / "peft")
    gm = import_peft(model, tmp_path / "peft")
    assert "\nclassifier: train\n" in adaptc.report_of(gm).spec_source
    assert adaptc.report_of(gm).trainable == twin.get_nb_trainable_parameters()[0]
    x = inputs()
    assert close(gm(**x), twin(**x)) <= TOL
    export_peft(gm, tmp_path / "ours", task_type="SEQ_CLS")
    theirs = PeftModel.from_pretrained(copy.deepcopy(model.module), tmp_path / "ours").eval()
    assert close(theirs(**x), twin(**x)) <= TOL
    frozen = adaptc.compile(model, "query, value: lora r=4")  # the model's head, frozen
    perturb(adaptc.adapter_state_dict(frozen).values())
    export_peft(frozen, tmp_path / "frozen", task_type="SEQ_CLS")
    theirs = PeftModel.from_pretrained(copy.deepcopy(model.module), tmp_path / "frozen").eval()
    assert close(frozen.eval()(**x), theirs(**x)) <= TOL


def test_an_adapter_on_a_modules_to_save_head_is_refused(tiny, tmp_path):
    """PEFT's SEQ_CLS model replaces the head by its copy, leaving a LoRA on it unread."""
    with pytest.raises(adaptc.errors.InteropError, match="'classifier.lora' adapts a head "
                                                         "which PEFT's SEQ_CLS model replaces"):
        export_peft(adaptc.compile(classifier(tiny), "classifier: lora r=2"), tmp_path,
                    task_type="SEQ_CLS")


def test_import_is_in_eval_mode_as_from_pretrained_is(tiny, tmp_path):
    """PeftModel.from_pretrained returns an eval-mode model: with adapter dropout the imported
    module gives its outputs as imported (it was in training mode, dropout on)."""
    model = tiny("llama")
    saved_peft(model, LoraConfig(r=4, lora_dropout=0.5, target_modules=["q_proj"]), tmp_path)
    twin = PeftModel.from_pretrained(copy.deepcopy(model.module), tmp_path)
    gm = import_peft(model, tmp_path)
    assert not gm.training and not twin.training
    x = inputs()
    assert close(gm(**x), twin(**x)) <= TOL
    assert gm.train().training  # and it still trains


def test_import_layers_to_transform_writes_paths(tiny, tmp_path):
    model = tiny("llama")
    saved_peft(model, LoraConfig(r=2, target_modules=["q_proj"], layers_to_transform=[1]),
               tmp_path)
    spec = spec_from_peft(tmp_path, model)
    assert spec.splitlines()[1] == "q_proj[1]: lora r=2 alpha=8"


def test_import_refuses_a_saved_base_weight_other_than_the_models(tiny, tmp_path):
    from safetensors.torch import load_file, save_file
    model = tiny("llama")
    saved_peft(model, LoraConfig(r=2, target_modules=["lm_head"]), tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    tensors = load_file(str(path))
    tensors["base_model.model.lm_head.base_layer.weight"] += 1
    save_file(tensors, str(path))
    with pytest.raises(adaptc.WeightsError, match="the saved base weight base_model.model."
                                                  "lm_head.base_layer.weight differs"):
        import_peft(model, tmp_path)


def broken(tmp_path, model, **changes):
    saved_peft(model, LoraConfig(r=2, target_modules=["q_proj"]), tmp_path)
    path = tmp_path / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


@pytest.mark.parametrize("changes,message", [
    ({"target_modules": ["q_proj", "qproj"]}, "entry 'qproj' matches no module of the model"),
    ({"target_modules": ["mlp"]}, "is not a linear layer"),
    ({"target_modules": None}, "target_modules is null"),
    ({"lora_bias": True}, "option lora_bias=True is not supported"),
    ({"exclude_modules": ["q_proj"]}, "layers_to_transform or exclude_modules leaves no module"),
    ({"modules_to_save": ["lm_head"]}, "missing base_model.model.lm_head.weight"),
    ({"bias": "all"}, "bias='all' is not supported"),
    ({"init_lora_weights": "olora"}, "init_lora_weights='olora' is not supported"),
    ({"peft_type": "LOHA"}, "peft_type 'LOHA' is not supported"),
    # each was a TypeError, ValueError or re.error traceback, or a spec that did not compile
    ({"lora_alpha": "x"}, "option lora_alpha='x' is not a number"),
    ({"target_modules": 5}, "option target_modules=5 is not a regex or a list of module names"),
    ({"target_modules": "q_proj["}, r"option target_modules: 'q_proj\[' is not a regex "
                                    r"\(unterminated character set"),
    ({"rank_pattern": {"q_proj": "x"}}, "rank_pattern=.* is not a mapping of module names to "
                                        "numbers"),
    ({"layers_to_transform": "0"}, "layers_to_transform='0' is not a layer index"),
    ({"modules_to_save": "lm_head"}, "modules_to_save='lm_head' is not a list of module names"),
    ({"r": 0}, r"adapter_config.json: the options give an invalid spec: r must be >= 1, got 0"),
    ({"lora_dropout": 2}, r"invalid spec: dropout must be in \[0, 1\), got 2"),
])
def test_import_refuses_what_it_would_change(tiny, tmp_path, changes, message):
    model = tiny("llama")
    broken(tmp_path, model, **changes)
    with pytest.raises(adaptc.AdaptcError, match=message):
        import_peft(model, tmp_path)


def test_an_adapter_config_that_is_not_a_json_object(tiny, tmp_path):
    """A JSON list raised AttributeError ('list' object has no attribute 'get'); bytes that
    are not UTF-8, UnicodeDecodeError."""
    for text, message in ((b"[]", "not a PEFT adapter config .a JSON object.; found a list"),
                          (b"\xff{}", "cannot read the PEFT adapter config: 'utf-8' codec")):
        (tmp_path / "adapter_config.json").write_bytes(text)
        with pytest.raises(adaptc.errors.InteropError, match=message):
            spec_from_peft(tmp_path, tiny("llama"))


def test_cli_import_peft_prints_the_spec(tiny, tmp_path, capsys):
    from adaptc.cli import main
    model = tiny("llama")
    saved_peft(model, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]), tmp_path)
    assert main(["import-peft", str(tmp_path), "--model", "llama"]) == 0
    assert "q_proj, v_proj: lora r=2 alpha=4" in capsys.readouterr().out
    spec = tmp_path / "imported.adapt"
    spec.write_text("# mine\n")
    assert main(["import-peft", str(tmp_path), "--model", "llama", "-o", str(spec)]) == 1
    assert "imported.adapt: file exists (use --force)" in capsys.readouterr().err
    assert spec.read_text() == "# mine\n"
    assert main(["import-peft", str(tmp_path), "--model", "llama", "-o", str(spec),
                 "--force"]) == 0
    assert "q_proj, v_proj: lora r=2 alpha=4" in spec.read_text()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
    same = tmp_path / "both"  # the weights were written over the spec just written
    assert main(["import-peft", str(tmp_path), "--model", "llama", "-o", str(same),
                 "--weights", str(tmp_path / "." / "both")]) == 1
    assert "both: -o and --weights name the same file" in capsys.readouterr().err
    assert not same.exists()


def test_cli_import_peft_weights_serve_in_infer_mode(tiny, tmp_path, capsys):
    """PEFT directory → `import-peft -o spec --weights file` → `compile --mode infer
    --adapters file`: the exported program computes PEFT's outputs. The PEFT file itself, or
    its directory, given to --adapters is refused with that recipe."""
    from adaptc.cli import main
    model = tiny("llama")
    model.module.save_pretrained(tmp_path / "base")
    peft_dir, spec, weights = tmp_path / "peft", tmp_path / "s.adapt", tmp_path / "w.safetensors"
    twin = saved_peft(model, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]),
                      peft_dir)
    base = ["--model", str(tmp_path / "base")]
    assert main(["import-peft", str(peft_dir), *base, "-o", str(spec), "--weights",
                 str(weights)]) == 0
    assert "wrote" in capsys.readouterr().err
    assert main(["import-peft", str(peft_dir), *base, "--weights", str(weights)]) == 1
    assert "w.safetensors: file exists (use --force)" in capsys.readouterr().err
    for wrong in (peft_dir, peft_dir / "adapter_model.safetensors"):
        assert main(["compile", str(spec), *base, "--mode", "infer", "--adapters", str(wrong)]) == 1
        assert "adaptc import-peft DIR" in capsys.readouterr().err
    assert main(["compile", str(spec), *base, "--mode", "infer", "--adapters", str(weights),
                 "-o", str(tmp_path / "serve")]) == 0
    program = adaptc.load_program(tmp_path / "serve").module()
    x = inputs()
    assert close(program(**x), twin(**x)) <= TOL
    assert close(program(**x), model.module(**x)) > 1e-3


def test_cli_import_peft_writes_the_spec_and_the_weights_or_neither(tiny, tmp_path, capsys,
                                                                    monkeypatch):
    """Out of space for --weights, -o's spec was already written; a directory in -o's way,
    the weights were. Either way the command failed and left one of the two."""
    import adaptc.adapters
    from safetensors import SafetensorError

    from adaptc.cli import main
    model = tiny("llama")
    model.module.save_pretrained(tmp_path / "base")
    saved_peft(model, LoraConfig(r=2, target_modules=["q_proj"]), tmp_path / "peft")
    capsys.readouterr()  # save_pretrained's progress bars, when no command has disabled them
    out = tmp_path / "out"
    out.mkdir()
    argv = ["import-peft", str(tmp_path / "peft"), "--model", str(tmp_path / "base"), "-o",
            str(out / "s.adapt"), "--weights", str(out / "w.safetensors")]
    full = "Error while serializing: I/O error: No space left on device (os error 28)"
    def no_space(*args, **kwargs):
        raise SafetensorError(full)
    with monkeypatch.context() as patch:
        patch.setattr(adaptc.adapters, "save_file", no_space)
        assert main(argv) == 1
    assert capsys.readouterr().err == (f"{out / 'w.safetensors'}: cannot write adapter weights: "
                                       f"{full}\n")
    import adaptc.artifact

    def spec_fails(path, *args, **kwargs):
        raise adaptc.ArtifactError(f"{path}: cannot write: No space left on device")
    with monkeypatch.context() as patch:  # the weights were staged, the spec cannot be written
        patch.setattr(adaptc.artifact, "write_file", spec_fails)
        assert main([*argv, "--force"]) == 1
    assert "s.adapt: cannot write" in capsys.readouterr().err
    assert list(out.iterdir()) == []
    (out / "s.adapt").mkdir()  # refused before the import
    assert main([*argv, "--force"]) == 1
    assert capsys.readouterr().err.endswith("s.adapt: is a directory; -o and --weights write "
                                            "files\n")
    assert [p.name for p in out.iterdir()] == ["s.adapt"] and not any((out / "s.adapt").iterdir())


def test_export_refuses_a_non_empty_directory_without_force(tiny, tmp_path):
    gm = adaptc.compile(tiny("llama"), "q_proj: lora r=2")
    (tmp_path / "notes.txt").write_text("keep")
    with pytest.raises(adaptc.AdaptcError, match="not empty \\(use --force\\)"):
        export_peft(gm, tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]
    export_peft(gm, tmp_path, force=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json",
                                                           "adapter_model.safetensors"]


def test_export_refuses_a_task_type_peft_cannot_read(tiny, tmp_path):
    """It was written into adapter_config.json, which PeftConfig then refused to read."""
    from peft import TaskType

    from adaptc.peft_interop import TASK_TYPES
    assert set(TASK_TYPES) == {t.value for t in TaskType}
    gm = adaptc.compile(tiny("llama"), "attn: prefix tokens=2")
    with pytest.raises(adaptc.errors.InteropError, match="unknown PEFT task type 'causal_lm': "
                                                         "PEFT reads only SEQ_CLS, "):
        export_peft(gm, tmp_path / "out", task_type="causal_lm")
    assert not (tmp_path / "out").exists()
    export_peft(gm, tmp_path / "out", task_type="CAUSAL_LM")
    assert json.loads((tmp_path / "out" / "adapter_config.json").read_text())["task_type"] == \
        "CAUSAL_LM"


# ---- AdaLoRA, both ways ---------------------------------------------------------------------

ADALORA = "q_proj,v_proj: adalora init_r=4 target_r=2 total_step=20 alpha=8"


@pytest.mark.parametrize("family,targets", [("llama", "q_proj,v_proj"),
                                            ("bert", "query,value")])
def test_adalora_export_loads_in_peft(tiny, tmp_path, family, targets):
    model = tiny(family)
    gm = adaptc.compile(model, ADALORA.replace("q_proj,v_proj", targets)).eval()
    perturb(adaptc.adapter_state_dict(gm).values())
    with torch.no_grad():  # a pruned triplet: Λ_i = 0 travels as is, no rank_pattern needed
        next(iter(adaptc.adapters.adapter_modules(gm).values())).E[1] = 0
    export_peft(gm, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "ADALORA" and config["init_r"] == 4
    theirs = PeftModel.from_pretrained(copy.deepcopy(model.module), tmp_path).eval()
    x = inputs()
    assert close(gm(**x), theirs(**x)) <= TOL
    assert close(gm(**x), model.module(**x)) > 1e-3


def test_adalora_import_equals_peft(tiny, tmp_path):
    from peft import AdaLoraConfig
    model = tiny("llama")
    config = AdaLoraConfig(init_r=4, target_r=2, total_step=20, lora_alpha=8,
                           target_modules=["q_proj", "v_proj"])
    theirs = saved_peft(model, config, tmp_path)
    gm = import_peft(model, tmp_path)
    x = inputs()
    assert close(gm(**x), theirs(**x)) <= TOL
    assert "adalora init_r=4 target_r=2" in spec_from_peft(tmp_path, model)
