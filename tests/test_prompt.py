"""Prompt tuning and P-tuning in the compiled graph equal PEFT's PromptTuning and P-tuning
(PromptEncoder) with the same weights, on the real tokens of left-padded inputs (float32).
PEFT returns causal-LM logits and BERT hidden states for prompt + input; we return the
real tokens only, so the comparison drops PEFT's first n positions."""
from __future__ import annotations

import copy

import pytest
import torch
from peft import PromptEncoderConfig, PromptTuningConfig, TaskType, get_peft_model

import adaptc
from adaptc.errors import SpecError
from helpers import bert_classifier, inputs, main_output

TOL = 1e-5
EMBED = {"llama": "model.embed_tokens", "bert": "embeddings.word_embeddings"}


def peft_twin(model, method: str, tokens: int, encoder: str = "mlp", hidden: int = 20,
              task: TaskType | None = None):
    bert = model.config.model_type == "bert"
    task = task or (TaskType.FEATURE_EXTRACTION if bert else TaskType.CAUSAL_LM)
    if method == "prompt":
        config = PromptTuningConfig(task_type=task, num_virtual_tokens=tokens)
    else:
        config = PromptEncoderConfig(task_type=task, num_virtual_tokens=tokens,
                                     encoder_reparameterization_type=encoder.upper(),
                                     encoder_hidden_size=hidden)
    return get_peft_model(copy.deepcopy(model), config).eval()


def copy_from_peft(ours, peft_model) -> None:
    renames = {"embedding.weight": "embedding", "lstm_head": "lstm", "mlp_head": "head"}
    state = {}
    for key, value in peft_model.prompt_encoder["default"].state_dict().items():
        for old, new in renames.items():
            key = key.replace(old, new)
        state[key] = value
    ours.load_state_dict(state)


def compare(gm, twin, tokens: int, family: str) -> None:
    for x in (inputs(), inputs(batch=1, seq=5, seed=3)):
        ours, theirs = gm(**x), twin(**x)
        real = x["attention_mask"].bool()
        assert main_output(ours).shape[1] == x["input_ids"].shape[1]
        diff = main_output(ours) - main_output(theirs)[:, tokens:]
        assert diff[real].abs().max().item() <= TOL
        if family == "bert":  # the pooler reads position 0: a virtual token, as in PEFT
            assert (ours.pooler_output - theirs.pooler_output).abs().max().item() <= TOL


@pytest.mark.parametrize("family", ["llama", "bert"])
@pytest.mark.parametrize("method,encoder", [("prompt", None), ("ptuning", "mlp"),
                                            ("ptuning", "lstm")])
def test_prompt_methods_equal_peft(tiny, family, method, encoder):
    model = tiny(family)
    spec = "embed: prompt tokens=3" if method == "prompt" else \
        f"embed: ptuning tokens=3 encoder={encoder} hidden=20"
    gm = adaptc.compile(model, spec).eval()
    twin = peft_twin(model.module, method, 3, encoder or "mlp")
    copy_from_peft(gm.get_submodule(f"{EMBED[family]}.prompt"), twin)
    report = adaptc.report_of(gm)
    assert report.counts["prompt_inserted"] == 1
    assert (report.trainable, report.total) == twin.get_nb_trainable_parameters()
    compare(gm, twin, 3, family)


@pytest.mark.parametrize("method", ["prompt", "ptuning"])
def test_prompts_on_sentence_pairs_equal_peft(method):
    """Segment ids reach the graph and the virtual tokens count as sentence A: a BERT
    classifier equals PEFT's SEQ_CLS model, which pads token_type_ids with zeros (its
    feature-extraction model drops them)."""
    model = bert_classifier()
    rule = "prompt tokens=3" if method == "prompt" else "ptuning tokens=3 hidden=20"
    gm = adaptc.compile(model, f"embed: {rule}; classifier: train").eval()
    twin = peft_twin(model, method, 3, task=TaskType.SEQ_CLS)
    copy_from_peft(gm.get_submodule("bert.embeddings.word_embeddings.prompt"), twin)
    x = inputs(vocab=128, segments=True)
    assert (gm(**x).logits - twin(**x).logits).abs().max().item() <= TOL
    single = {k: v for k, v in x.items() if k != "token_type_ids"}
    assert (gm(**x).logits - gm(**single).logits).abs().max().item() > 1e-4


def test_prompt_init_from_token_ids_repeats_them(tiny):
    model = tiny("llama")
    gm = adaptc.compile(model, "embed: prompt tokens=5 init=[7, 8]")
    prompts = gm.get_submodule("model.embed_tokens.prompt").embedding
    table = model.module.model.embed_tokens.weight
    assert torch.equal(prompts, table[[7, 8, 7, 8, 7]])
    assert prompts.requires_grad and not gm.get_parameter("model.embed_tokens.weight").requires_grad
    assert table.requires_grad  # the user's model keeps its own flags


def test_prompt_init_vocab_samples_rows(tiny):
    model = tiny("llama")
    gm = adaptc.compile(model, "embed: prompt tokens=4 init=vocab")
    prompts = gm.get_submodule("model.embed_tokens.prompt").embedding
    table = model.module.model.embed_tokens.weight
    assert all((table == row).all(-1).any() for row in prompts)


@pytest.mark.parametrize("spec,code", [
    ("embed: prompt init=[1, 600]", "E306"),
    ("embed: prompt init=[]", "E203"),
    ("embed: prompt init=words", "E204"),
    ("q_proj: prompt", "E302"),
    ("embed: prompt; embed: ptuning", "E209"),
])
def test_prompt_spec_errors(tiny, spec, code):
    with pytest.raises(SpecError) as err:
        adaptc.compile(tiny("llama"), spec)
    assert err.value.first.code == code


def test_prompt_on_a_table_that_is_not_the_input(tiny):
    with pytest.raises(SpecError, match="word embedding that reads the token ids") as err:
        adaptc.compile(tiny("bert"), "position_embeddings: prompt")
    first = err.value.first
    assert (first.code, first.line, first.column, first.end_column) == ("E302", 1, 1, 20)
