"""PEFT's prompt-learning adapters both ways: a prompt or prefix exported by adaptc loads in
PeftModel with our outputs on the real tokens; PEFT's PROMPT_TUNING, P_TUNING and
PREFIX_TUNING directories import to PEFT's outputs (float32); what PEFT lays out otherwise is
an InteropError."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from peft import (PeftModel, PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig,
                  TaskType, get_peft_model)

import adaptc
from adaptc.errors import InteropError, WeightsError
from adaptc.frontend.models import wrap
from adaptc.peft_interop import export_peft, import_peft, spec_from_peft
from helpers import inputs, main_output, randomize_adapters, small_bart
from test_seq2seq import model_of, seq2seq_inputs, shift_right

TOL = 1e-5
TASKS = {"llama": "CAUSAL_LM", "gpt2": "CAUSAL_LM", "bert": "FEATURE_EXTRACTION"}


def real_token_diff(ours, theirs, x) -> float:
    """Max difference on the real tokens; PEFT's decoder outputs also hold the n virtual
    tokens' rows first (its prompt tuning), ours the real tokens only."""
    a, b = main_output(ours), main_output(theirs)
    b = b[:, b.shape[1] - a.shape[1]:]
    return (a - b)[x["attention_mask"].bool()].abs().max().item()


@pytest.mark.parametrize("family", ["llama", "gpt2", "bert"])
@pytest.mark.parametrize("spec", ["embed: prompt tokens=3", "embed: ptuning tokens=3",
                                  "attn: prefix tokens=3 projection=8",
                                  "attn: ptuning2 tokens=3"])
def test_export_loads_in_peft_and_imports_back(tiny, tmp_path, family, spec):
    """PEFT gets what its model reads at inference: the prompt encoder's or prefix MLP's
    output, as PROMPT_TUNING or PREFIX_TUNING."""
    model = tiny(family)
    gm = adaptc.compile(model, spec)
    randomize_adapters(gm, 0.5)
    export_peft(gm, tmp_path, task_type=TASKS[family])
    theirs = PeftModel.from_pretrained(copy.deepcopy(model.module), tmp_path).eval()
    assert theirs.peft_config["default"].peft_type.value == (
        "PREFIX_TUNING" if "prefix" in spec or "ptuning2" in spec else "PROMPT_TUNING")
    x = inputs()
    ours = gm.eval()(**x)
    assert real_token_diff(ours, theirs(**x), x) <= TOL
    assert (main_output(ours) - main_output(model.module(**x))).abs().max().item() > 1e-3
    back = import_peft(model, tmp_path)
    assert real_token_diff(back(**x), ours, x) <= TOL


def randomized(peft_model, seed: int = 0):
    """PEFT's prompt encoder with N(0, 0.5²) weights (its prefix MLP's output starts small)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in peft_model.prompt_encoder["default"].parameters():
            param.copy_(torch.randn(param.shape, generator=gen) * 0.5)
    return peft_model


CONFIGS = {
    "prompt": lambda task: PromptTuningConfig(task_type=task, num_virtual_tokens=4),
    "ptuning-mlp": lambda task: PromptEncoderConfig(task_type=task, num_virtual_tokens=4,
                                                    encoder_hidden_size=16),
    "ptuning-lstm": lambda task: PromptEncoderConfig(task_type=task, num_virtual_tokens=4,
                                                     encoder_hidden_size=16,
                                                     encoder_reparameterization_type="LSTM"),
    "prefix": lambda task: PrefixTuningConfig(task_type=task, num_virtual_tokens=4),
    "prefix-mlp": lambda task: PrefixTuningConfig(task_type=task, num_virtual_tokens=4,
                                                  prefix_projection=True,
                                                  encoder_hidden_size=16),
}


@pytest.mark.parametrize("family", ["llama", "bert"])
@pytest.mark.parametrize("kind", list(CONFIGS))
def test_peft_directories_import_to_peft_outputs(tiny, tmp_path, family, kind):
    """Llama has 2 key/value heads for 4 query heads: PEFT's prefix holds the 2."""
    model = tiny(family)
    trained = randomized(get_peft_model(copy.deepcopy(model.module),
                                        CONFIGS[kind](TASKS[family])))
    trained.save_pretrained(tmp_path)
    theirs = PeftModel.from_pretrained(copy.deepcopy(model.module), tmp_path).eval()
    ours = import_peft(model, tmp_path)
    x = inputs()
    assert real_token_diff(ours(**x), theirs(**x), x) <= TOL
    assert (main_output(ours(**x)) - main_output(model.module(**x))).abs().max().item() > 1e-3
    method = "prefix" if kind.startswith("prefix") else "prompt"
    target = "attn" if method == "prefix" else "embed"
    assert f"\n{target}: {method} tokens=4" in spec_from_peft(tmp_path, model)


@pytest.mark.parametrize("name", ["bart", "t5"])
def test_seq2seq_prompt_and_prefix_import_to_peft_outputs(tmp_path, name):
    """A prompt before the encoder's input (num_transformer_submodules 1 or PEFT's default
    2, whose second n rows its forward never reads) and PEFT's seq2seq prefix, whose decoder
    layer l reads block 2l mod L of its rows (T5: with its relative position bias)."""
    model = model_of(name)
    x = seq2seq_inputs()
    labels = x.pop("decoder_input_ids")
    configs = {
        "prompt": PromptTuningConfig(task_type=TaskType.SEQ_2_SEQ_LM, num_virtual_tokens=3,
                                     num_transformer_submodules=1),
        # PEFT's default: 2n rows, its forward reads the first n (the encoder's)
        "prompt-default": PromptTuningConfig(task_type=TaskType.SEQ_2_SEQ_LM,
                                             num_virtual_tokens=3),
        "prefix": PrefixTuningConfig(task_type=TaskType.SEQ_2_SEQ_LM, num_virtual_tokens=3)}
    for name, config in configs.items():
        randomized(get_peft_model(copy.deepcopy(model.module), config)).save_pretrained(
            tmp_path / name)
        theirs = PeftModel.from_pretrained(copy.deepcopy(model.module), tmp_path / name).eval()
        ours = import_peft(model, tmp_path / name)
        want = theirs(**x, labels=labels).logits
        got = ours(**x, decoder_input_ids=shift_right(model.module, labels)).logits
        assert (got - want).abs().max().item() <= TOL, name
        assert (got - model.module(**x, labels=labels).logits).abs().max().item() > 1e-3


def test_seq2seq_prompt_exports_to_peft(tmp_path):
    """T5's encoder prompt goes out with num_transformer_submodules=1, which PEFT reads as
    a prompt before the encoder's input only."""
    model = model_of("t5")
    gm = adaptc.compile(model, "embed: prompt tokens=3").eval()
    randomize_adapters(gm, 0.5)
    export_peft(gm, tmp_path, task_type="SEQ_2_SEQ_LM")
    theirs = PeftModel.from_pretrained(copy.deepcopy(model.module), tmp_path).eval()
    assert theirs.peft_config["default"].num_transformer_submodules == 1
    x = seq2seq_inputs()
    labels = x.pop("decoder_input_ids")
    ours = gm(**x, decoder_input_ids=shift_right(model.module, labels)).logits
    assert (ours - theirs(**x, labels=labels).logits).abs().max().item() <= TOL * 100  # ~10² logits
    assert (ours - model.module(**x, labels=labels).logits).abs().max().item() > 1e-3


def test_what_peft_lays_out_otherwise_is_refused(tiny, tmp_path):
    model = wrap(small_bart())
    gm = adaptc.compile(model, "decoder.layers.*.self_attn: prefix tokens=3")
    with pytest.raises(InteropError, match="decoder layers l and l \\+ L/2 share one"):
        export_peft(gm, tmp_path / "seq2seq", task_type="SEQ_2_SEQ_LM")
    gm = adaptc.compile(tiny("llama"), "attn[1]: prefix tokens=3")
    with pytest.raises(InteropError, match="PEFT prefixes every layer; this module has "
                                           "prefixes on 1 of 2 layers"):
        export_peft(gm, tmp_path / "partial", task_type="CAUSAL_LM")
    gm = adaptc.compile(tiny("llama"), "embed: prompt tokens=3")
    with pytest.raises(InteropError, match=r"give the task type \(task_type=, or --task-type "
                                           r"for adaptc export-peft: CAUSAL_LM"):
        export_peft(gm, tmp_path / "untyped")
    gm = adaptc.compile(tiny("llama"), "embed: prompt tokens=3\nq_proj: lora r=2")
    with pytest.raises(InteropError, match="holds one method; besides its prompt or prefix "
                                           "this module has 'model.layers.0.self_attn.q_proj"):
        export_peft(gm, tmp_path / "mixed", task_type="CAUSAL_LM")
    assert not any((tmp_path / name).exists() for name in ("seq2seq", "partial", "mixed"))
    get_peft_model(copy.deepcopy(tiny("llama").module),
                   PrefixTuningConfig(task_type=TaskType.CAUSAL_LM,
                                      num_virtual_tokens=3)).save_pretrained(tmp_path / "wide")
    config = json.loads((tmp_path / "wide" / "adapter_config.json").read_text())
    config["num_layers"] = 3
    (tmp_path / "wide" / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(WeightsError, match="laid out for 3 layers of 2 key/value heads"):
        import_peft(tiny("llama"), tmp_path / "wide")


@pytest.mark.parametrize("config", [PromptTuningConfig(task_type=TaskType.CAUSAL_LM,
                                                       num_virtual_tokens=3),
                                    PrefixTuningConfig(task_type=TaskType.CAUSAL_LM,
                                                       num_virtual_tokens=3)],
                         ids=["prompt", "prefix"])
def test_an_untyped_prompt_directory_is_refused(tiny, tmp_path, config):
    """With task_type null PeftModel.from_pretrained gives the base model's outputs (only
    its task models apply virtual tokens); the import added the prompt or prefix."""
    model = tiny("llama")
    randomized(get_peft_model(copy.deepcopy(model.module), config)).save_pretrained(tmp_path)
    path = tmp_path / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "task_type": None}))
    theirs = PeftModel.from_pretrained(copy.deepcopy(model.module), tmp_path).eval()
    x = inputs()
    assert (main_output(theirs(**x)) - main_output(model.module(**x))).abs().max().item() == 0
    with pytest.raises(InteropError, match=f"task_type is null, so PEFT's model ignores this "
                                           f"{config.peft_type.value} adapter"):
        import_peft(model, tmp_path)


@pytest.mark.parametrize("kind", ["prompt", "prefix"])
def test_prompt_rows_must_fit_num_virtual_tokens(tiny, tmp_path, kind):
    """PEFT refuses a prompt_embeddings with more rows than num_virtual_tokens gives; the
    import read the first rows."""
    model = tiny("llama")
    get_peft_model(copy.deepcopy(model.module), CONFIGS[kind]("CAUSAL_LM")).save_pretrained(tmp_path)
    path = tmp_path / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "num_virtual_tokens": 3}))
    with pytest.raises(RuntimeError, match="size mismatch"):
        PeftModel.from_pretrained(copy.deepcopy(model.module), tmp_path)
    with pytest.raises(WeightsError, match=r"'prompt_embeddings' has shape \(4, \d+\); "
                                           "num_virtual_tokens=3 gives 3 rows"):
        import_peft(model, tmp_path)
