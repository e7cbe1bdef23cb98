"""Cached decoding through the infer-mode graph gives the tokens (and logits) of
full-sequence forward passes, for merged LoRA, fused bottleneck adapters, mixtures, prefixes
and virtual tokens."""
from __future__ import annotations

import pytest
import torch

import adaptc
from adaptc.decode import compile_decoder
from adaptc.errors import AdaptcError, ModelError, SpecError
from helpers import randomize_adapters

PROMPT = [5, 17, 42, 7, 99]


@pytest.mark.parametrize(("family", "spec"), [
    ("llama", "q_proj,v_proj: lora r=4"),
    ("llama", "ffn: adapter bottleneck=8"),
    ("llama", "q_proj: lora r=2; mixture moe k=2 experts=3"),
    ("llama", "attn: prefix tokens=3 projection=8"),  # folded MLP; RoPE positions shift by 3
    ("gpt2", "attn: ptuning2 tokens=2"),  # GPT-2's position table shifts
    ("llama", "embed: prompt tokens=3"),
    ("gpt2", "embed: ptuning tokens=2 hidden=8"),  # GPT-2 reads input_ids through a view
    ("mistral", "embed: prompt tokens=2; attn: prefix tokens=2; q_proj: lora r=2"),
])
def test_cached_decoding_equals_full_forward(tiny, tmp_path, family, spec):
    """The full forward is the train graph's (test_infer: the infer graph equals it)."""
    model = tiny(family)
    full = adaptc.compile(model, spec)
    randomize_adapters(full, 0.3)
    weights = adaptc.save_adapters(full, tmp_path / "a.safetensors")
    decoder = compile_decoder(model, spec, adapters=weights, max_cache_len=32)
    tokens = decoder.generate(PROMPT, 8)

    full.eval()
    ids = torch.tensor([tokens])
    with torch.no_grad():
        reference = full(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0]
    assert tokens[len(PROMPT):] == reference[len(PROMPT) - 1:-1].argmax(-1).tolist()
    stepwise = torch.cat([decoder.logits(tokens[:len(PROMPT)], 0)] +
                         [decoder.logits([t], i) for i, t in enumerate(tokens) if i >= len(PROMPT)])
    assert (stepwise - reference).abs().max().item() <= 1e-4


def test_torch_compiled_decoder_gives_the_same_tokens(tiny):
    """Prefill and one-token steps through torch.compile (Inductor on the CPU here)."""
    model, spec = tiny("llama"), "q_proj: lora r=2; ffn: adapter bottleneck=8"
    eager = compile_decoder(model, spec, max_cache_len=16).generate(PROMPT, 4)
    compiled = compile_decoder(model, spec, max_cache_len=16, torch_compile=True)
    assert isinstance(compiled.graph, torch._dynamo.eval_frame.OptimizedModule)
    assert compiled.generate(PROMPT, 4) == eager


@pytest.mark.parametrize("name", ["llama", "t5"])
@pytest.mark.parametrize("cache", [10 ** 11, 10 ** 20])  # beyond memory; beyond int64
def test_a_cache_that_cannot_be_allocated_names_max_cache_len(tiny, name, cache):
    """It was the CPU allocator's (or torch's size overflow) traceback from inside
    transformers' StaticCache."""
    from adaptc.decode_seq2seq import compile_seq2seq_decoder
    build = compile_seq2seq_decoder if name == "t5" else compile_decoder
    with pytest.raises(AdaptcError, match=f"max_cache_len={cache}: cannot allocate the KV "
                                          "cache .*; use a smaller max_cache_len"):
        build(tiny(name), "attn.q: lora r=2", max_cache_len=cache)


def test_decoder_limits(tiny):
    decoder = compile_decoder(tiny("llama"), "q_proj: lora r=2", max_cache_len=8)
    with pytest.raises(AdaptcError, match="5-token prompt and 6 new tokens exceed the cache"):
        decoder.generate(PROMPT, 6)
    with pytest.raises(AdaptcError, match="sequence of 9 tokens exceeds the cache"):
        decoder.logits([1], 8)
    with pytest.raises(AdaptcError, match="max_cache_len must be at least 2, got 0"):
        compile_decoder(tiny("llama"), "q_proj: lora r=2", max_cache_len=0)
    with pytest.raises(AdaptcError, match="max_new_tokens must be >= 0, got -1"):
        decoder.generate(PROMPT, -1)
    with pytest.raises(AdaptcError, match=r"eos_token_id 100000 is outside .*would never stop"):
        decoder.generate(PROMPT, 2, 100000)
    assert decoder.generate(PROMPT, 0) == PROMPT
    full = decoder.generate(PROMPT, 3)
    eos = full[len(PROMPT) + 1]
    assert decoder.generate(PROMPT, 3, eos) == full[:full.index(eos, len(PROMPT)) + 1]
    assert decoder.generate(PROMPT, 3, [100, eos]) == full[:full.index(eos, len(PROMPT)) + 1]
    with pytest.raises(AdaptcError, match=r"eos_token_id -3 is outside .*would never stop"):
        decoder.generate(PROMPT, 2, [eos, -3])
    with pytest.raises(TypeError, match=r"eos_token_id takes a token id or a list of them, "
                                        r"got \[\]"):
        decoder.generate(PROMPT, 2, [])
    with pytest.raises(TypeError, match="prompt must be a list of token ids"):
        decoder.generate("5 17", 2)
    with pytest.raises(TypeError, match="max_cache_len must be an int, got 8.5"):
        compile_decoder(tiny("llama"), "q_proj: lora r=2", max_cache_len=8.5)
    vocab = tiny("llama").module.config.vocab_size
    for bad in (vocab, -1):
        with pytest.raises(AdaptcError, match=rf"token id {bad} is outside .*0\.\.{vocab - 1}"):
            decoder.generate([5, bad], 2)
    with pytest.raises(ModelError, match="not a causal language model"):
        compile_decoder(tiny("bert"), "query: lora r=2")


def test_spec_errors_name_the_modules_as_compile_does(tiny):
    """The decoder resolves the spec inside transformers' static-cache wrapper: its E301
    notes and E302 messages said 'model.model.layers.0.self_attn.q_proj', a name no spec
    or `adaptc inspect` uses."""
    spec = "qproj: lora r=2\nembed_tokens: lora r=2"
    with pytest.raises(SpecError) as decoding:
        compile_decoder(tiny("llama"), spec)
    with pytest.raises(SpecError) as compiling:
        adaptc.compile(tiny("llama"), spec)
    assert str(decoding.value) == str(compiling.value)
    assert "model.model." not in str(decoding.value)
    assert [d.code for d in decoding.value.diagnostics] == ["E301", "E302"]


@pytest.fixture(scope="module")
def qv_weights(tmp_path_factory):
    """An adapter file of `q_proj,v_proj: lora r=4` on the llama preset (2 layers), written
    once for the module: the tests below only read it."""
    from adaptc.frontend.models import build_preset
    return adaptc.save_adapters(adaptc.compile(build_preset("llama", layers=2),
                                               "q_proj,v_proj: lora r=4"),
                                tmp_path_factory.mktemp("qv") / "a.safetensors")


@pytest.mark.parametrize("spec", ["q_proj: lora r=4", "q_proj,v_proj: lora r=2",
                                  "q_proj,v_proj: lora r=4; k_proj: ia3"])
def test_adapter_file_errors_name_the_tensors_as_compile_does(tiny, qv_weights, spec):
    """The decoder loads the file inside transformers' wrapper (at `model`): a mismatch
    named 'model.model.layers.0…', a tensor the file does not hold."""
    from adaptc.errors import WeightsError
    with pytest.raises(WeightsError) as decoding:
        compile_decoder(tiny("llama"), spec, adapters=qv_weights, max_cache_len=8)
    with pytest.raises(WeightsError) as compiling:
        adaptc.compile(tiny("llama"), spec, mode="infer", adapters=qv_weights)
    assert str(decoding.value) == str(compiling.value)
    assert "model.model." not in str(decoding.value)


def test_cache_longer_than_a_learned_position_table_is_refused():
    """GPT-2 with 16 positions: a 16-slot cache decodes to its end; a 17-slot one failed at
    the 17th token with an IndexError inside the position embedding. A prefix takes rows."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from adaptc.frontend.models import wrap
    torch.manual_seed(0)
    model = wrap(GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=16, n_embd=32,
                                            n_layer=1, n_head=2)).eval())
    decoder = compile_decoder(model, "c_attn: lora r=2", max_cache_len=16)
    assert len(decoder.generate([5, 17], 14)) == 16
    with pytest.raises(AdaptcError, match="max_cache_len=17 exceeds the model's 16 positions: "
                                          ".* use max_cache_len <= 16"):
        compile_decoder(model, "c_attn: lora r=2", max_cache_len=17)
    with pytest.raises(AdaptcError, match=r"max_cache_len=14 exceeds the model's 16 positions "
                                          r"\(3 of them taken by the prefix\).* <= 13"):
        compile_decoder(model, "attn: prefix tokens=3", max_cache_len=14)


def test_cli_generate_text_with_the_checkpoint_tokenizer(tiny, tmp_path, capsys):
    from adaptc.cli import main
    from helpers import save_word_tokenizer
    checkpoint = tmp_path / "ckpt"
    tiny("llama").module.save_pretrained(checkpoint)
    save_word_tokenizer(checkpoint, words=511)  # the preset's 512 ids: "w<id - 1>"
    args = ["generate", "specs/lora_qv.adapt", "--model", str(checkpoint), "--max-new-tokens", "3"]
    assert main([*args, "--prompt", "4 8 2"]) == 0
    ids = capsys.readouterr().out.split()
    assert main([*args, "--text", "w3 w7 w1"]) == 0
    assert capsys.readouterr().out.split() == [f"w{int(i) - 1}" for i in ids]
    assert main(["generate", "specs/lora_qv.adapt", "--text", "w3"]) == 1
    assert "'llama' is a preset without one" in capsys.readouterr().err
    bare = tmp_path / "bare"
    tiny("llama").module.save_pretrained(bare)
    assert main(["generate", "specs/lora_qv.adapt", "--model", str(bare), "--text", "w3"]) == 1
    assert "no tokenizer files" in capsys.readouterr().err


def test_cli_generate(capsys):
    from adaptc.cli import main
    assert main(["generate", "specs/lora_qv.adapt", "--prompt", "5 17 42",
                 "--max-new-tokens", "4"]) == 0
    tokens = capsys.readouterr().out.split()
    assert tokens[:3] == ["5", "17", "42"] and len(tokens) == 7
    assert main(["generate", "specs/lora_qv.adapt", "--prompt", "5 17 42",
                 "--max-new-tokens", "4", "--eos-token-id", tokens[3]]) == 0
    assert capsys.readouterr().out.split() == tokens[:4]
    assert main(["generate", "specs/lora_qv.adapt", "--prompt", "5 x"]) == 1
    assert "token ids" in capsys.readouterr().err
    assert main(["generate", "specs/lora_qv.adapt", "--prompt", "5 99999"]) == 1
    assert "token id 99999 is outside the model's vocabulary" in capsys.readouterr().err
    assert main(["generate", "specs/lora_qv.adapt", "--prompt", "5", "--eos-token-id",
                 "-1"]) == 1  # was accepted: no argmax is -1, so it never stopped anything
    assert "eos_token_id -1 is outside the model's vocabulary" in capsys.readouterr().err
    assert main(["generate", "specs/lora_qv.adapt", "--prompt", "5", "--cuda-graph"]) == 1
    assert "a CUDA graph needs the decoder on a CUDA device" in capsys.readouterr().err
    assert main(["generate", "specs/lora_qv.adapt", "--model", "t5", "--prompt", "5",
                 "--cuda-graph"]) == 1
    assert "--cuda-graph is for causal LMs" in capsys.readouterr().err


def test_virtual_tokens_take_cache_slots(tiny):
    decoder = compile_decoder(tiny("llama"), "embed: prompt tokens=3", max_cache_len=10)
    assert len(decoder.generate(PROMPT, 2)) == 7
    with pytest.raises(AdaptcError, match="5-token prompt and 3 new tokens "
                                          r"\(with 3 virtual tokens\) exceed the cache \(10\)"):
        decoder.generate(PROMPT, 3)
    with pytest.raises(AdaptcError, match=r"sequence of 11 tokens \(with 3 virtual tokens\)"):
        decoder.logits([1], 7)


def test_a_cache_the_virtual_tokens_fill_is_refused(tiny, tmp_path, capsys):
    """With 3 virtual tokens a 4-slot cache held nothing to decode: `compile --decoder`
    exported it and then failed in its check on a '1-token prompt' the user never gave."""
    from adaptc.cli import main
    with pytest.raises(AdaptcError, match=r"max_cache_len=4 leaves no room for a prompt and a "
                                          r"new token after the 3 virtual tokens .*>= 5"):
        compile_decoder(tiny("llama"), "embed: prompt tokens=3", max_cache_len=4)
    assert compile_decoder(tiny("llama"), "embed: prompt tokens=3",
                           max_cache_len=5).generate([7], 1)[0] == 7
    (tmp_path / "p.adapt").write_text("embed: prompt tokens=3\n")
    assert main(["compile", str(tmp_path / "p.adapt"), "--mode", "infer", "--decoder",
                 "--max-cache-len", "3", "-o", str(tmp_path / "out")]) == 1
    assert "max_cache_len=3 leaves no room" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("spec", ["q_proj: lora r=2 gate", "attn: prefix tokens=2 gate"])
def test_gated_methods_are_refused_with_the_uncached_alternative(tiny, spec):
    """UniPELT's gates average over the sequence: a token's output depends on later tokens."""
    with pytest.raises(AdaptcError, match="cannot run gated .* depends on the tokens after "
                                          "it; use adaptc.greedy_generate"):
        compile_decoder(tiny("llama"), spec)


def test_cli_generates_gated_specs_without_a_cache(tiny, tmp_path, capsys):
    """`adaptc generate specs/unipelt.adapt` was refused with advice to call greedy_generate
    from Python; it runs the infer graph on the whole sequence each step, as for T5."""
    from adaptc.cli import main
    model = tiny("llama")
    model.module.save_pretrained(tmp_path / "ckpt")
    spec = tmp_path / "s.adapt"
    spec.write_text("q_proj,v_proj: lora r=4 gate\nffn: adapter bottleneck=8 gate\n")
    gm = adaptc.compile(model, spec.read_text())
    randomize_adapters(gm, 0.3)
    weights = adaptc.save_adapters(gm, tmp_path / "a.safetensors")
    ids = torch.tensor([PROMPT])
    want = adaptc.greedy_generate(gm.eval(), ids, torch.ones_like(ids), 5)[0].tolist()
    args = ["generate", str(spec), "--model", str(tmp_path / "ckpt"), "--adapters", str(weights),
            "--prompt", "5 17 42 7 99", "--max-new-tokens", "5"]
    assert main(args) == 0
    assert capsys.readouterr().out.split() == [str(t) for t in want]
    eos = want[6]
    assert main([*args, "--eos-token-id", str(eos)]) == 0
    assert capsys.readouterr().out.split() == [str(t) for t in want[:want.index(eos, 5) + 1]]
    assert main([*args, "--max-cache-len", "16"]) == 1
    assert "a gated spec decodes without one" in capsys.readouterr().err
    assert main(["generate", str(spec), "--model", "bert", "--prompt", "5"]) == 1
    assert capsys.readouterr().err.strip() == ("BertModel is not a causal language model; "
                                               "decoding needs one")
    assert main([*args[:-1], "5000"]) == 1  # was a ValueError traceback
    assert capsys.readouterr().err.strip() == ("generation would reach 5005 tokens; the compiled "
                                               "module takes at most 512 (fewer "
                                               "max_new_tokens, or a shorter prompt)")


def test_cuda_graph_needs_a_cuda_decoder(tiny):
    """CUDA-graph steps are for a decoder on a GPU (tests/test_gpu.py runs them there)."""
    with pytest.raises(AdaptcError, match="a CUDA graph needs the decoder on a CUDA device; "
                                          "its weights are on cpu"):
        compile_decoder(tiny("llama"), "q_proj: lora r=2", max_cache_len=8, cuda_graph=True)


def test_a_model_that_cannot_export_over_the_cache_names_the_uncached_alternative():
    """OPT's positions read the mask's values under export: the error named transformers'
    wrapper class and torch's make_fx advice; greedy_generate decodes it as `generate` does."""
    from helpers import small_decoder

    from adaptc.frontend.models import wrap
    model = wrap(small_decoder("opt"))
    with pytest.raises(ModelError, match=r"cached decoding cannot export OPTForCausalLM over a "
                                         r"static KV cache \(.*'model.model.decoder' "
                                         r"\(OPTDecoder\).*\); adaptc.greedy_generate decodes"):
        compile_decoder(model, "q_proj: lora r=2", max_cache_len=8)
    ids = torch.tensor([[5, 17, 42]])
    ours = adaptc.greedy_generate(adaptc.compile(model, "q_proj: lora r=2", mode="infer"), ids,
                                  torch.ones_like(ids), 4)
    assert torch.equal(ours, model.module.generate(ids, max_new_tokens=4, do_sample=False))


def test_cache_past_a_rotary_models_trained_positions_warns(tiny, capsys):
    """Llama's 512 positions: a 513-slot cache was sized as asked without a word. Rotary
    positions extend past the trained ones, so it is a warning naming both numbers, not an
    error; the CLI prints it as one line. (A learned table refuses it: the test above, and
    GPT-2 through the CLI here.)"""
    import warnings

    from adaptc.cli import main
    from adaptc.errors import AdaptcWarning
    with pytest.warns(AdaptcWarning, match=r"max_cache_len=513 exceeds the model's "
                                           r"max_position_embeddings=512"):
        decoder = compile_decoder(tiny("llama"), "q_proj: lora r=2", max_cache_len=513)
    assert decoder.max_cache_len == 513
    with warnings.catch_warnings():
        warnings.simplefilter("error", AdaptcWarning)
        compile_decoder(tiny("llama"), "q_proj: lora r=2", max_cache_len=512)
    args = ["generate", "specs/lora_qv.adapt", "--prompt", "1 2", "--max-new-tokens", "1"]
    assert main([*args, "--max-cache-len", "600"]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("warning: max_cache_len=600 exceeds the model's "
                                               "max_position_embeddings=512")
    assert main([*args, "--model", "gpt2", "--max-cache-len", "600"]) == 1
    assert "max_cache_len=600 exceeds the model's 512 positions" in capsys.readouterr().err
