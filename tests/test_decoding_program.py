"""Saved cached-decoding programs (adaptc.decoding_program, `adaptc compile --decoder`):
loaded back without the spec or the model, they give the compiled decoder's tokens and
logits, for sources, prompts and steps of lengths other than those they were traced with."""
from __future__ import annotations

import json

import pytest
import torch
from helpers import randomize_adapters, save_word_tokenizer
from test_decode_seq2seq import MODELS, SPECS

import adaptc
from adaptc.cli import main
from adaptc.decode import compile_decoder
from adaptc.decode_seq2seq import compile_seq2seq_decoder
from adaptc.decoding_program import load_decoding, save_decoding
from adaptc.errors import ArtifactError

PROMPT = [5, 17, 42, 7, 99]


def random_weights(model, spec: str, path) -> str:
    gm = adaptc.compile(model, spec)
    randomize_adapters(gm, 0.3)
    return adaptc.save_adapters(gm, path)


def stepwise(decoder, tokens: list[int], prompt: int) -> torch.Tensor:
    """Logits of a causal decoder's prefill of `prompt` tokens, then one call per token."""
    return torch.cat([decoder.logits(tokens[:prompt], 0)] +
                     [decoder.logits([t], i) for i, t in enumerate(tokens) if i >= prompt])


@pytest.mark.parametrize(("family", "spec"), [
    ("llama", "q_proj: lora r=2; ffn: adapter bottleneck=8 scale=2; mixture moe k=2 experts=3"),
    ("gpt2", "attn: ptuning2 tokens=2; embed: prompt tokens=2"),
])
def test_saved_causal_decoder_equals_the_compiled_one(tiny, tmp_path, family, spec):
    """The program holds the fused ops (bottleneck, mixture) and the virtual tokens; it is
    exported with a dynamic length, so a 3-token prompt prefills as well as the 2-token
    trace. Both run the same ops: logits equal within 1e-6."""
    model = tiny(family)
    weights = random_weights(model, spec, tmp_path / "a.safetensors")
    compiled = compile_decoder(model, spec, adapters=weights, max_cache_len=24)
    about = save_decoding(compiled, tmp_path / "decoding")
    assert about["check"]["same_tokens"] and about["check"]["max_abs_logit_error"] <= 1e-6
    assert about["virtual_tokens"] == (2 if family == "gpt2" else 0)  # the prompt's
    saved = load_decoding(tmp_path / "decoding")
    fused = {n.target.__name__ for n in saved.graph.graph.nodes
             if getattr(n.target, "namespace", None) == "adaptc"}
    assert fused == (set() if family == "gpt2" else {"bottleneck_adapter.default",
                                                     "mixture_lora.default"})
    for prompt in (PROMPT, PROMPT[:3]):
        tokens = compiled.generate(prompt, 7)
        assert saved.generate(prompt, 7) == tokens
        assert (stepwise(saved, tokens, len(prompt))
                - stepwise(compiled, tokens, len(prompt))).abs().max().item() <= 1e-6


@pytest.mark.parametrize("kind", ["bottleneck+mixture", "prompt", "prefix everywhere"])
@pytest.mark.parametrize("name", ["t5", "bart"])
def test_saved_seq2seq_decoder_equals_the_compiled_one(tmp_path, name, kind):
    """Encoder, hoisted cross-attention and decoder step as three programs, the source
    length dynamic in all three (the hoisted keys and values included)."""
    model = MODELS[name]()
    spec = SPECS[kind][name == "bart"]
    weights = random_weights(model, spec, tmp_path / "a.safetensors")
    compiled = compile_seq2seq_decoder(model, spec, adapters=weights, max_cache_len=12)
    about = save_decoding(compiled, tmp_path / "decoding")
    assert about["check"]["same_tokens"] and about["kind"] == "encoder-decoder"
    assert about["hoisted"] == compiled.hoisted > 0
    assert sorted(p.name for p in (tmp_path / "decoding").glob("*.pt2")) == [
        "cross.pt2", "decoder.pt2", "encoder.pt2"]
    saved = load_decoding(tmp_path / "decoding")
    for source in ([5, 9, 11, 3, 7, 20, 4], [8, 2]):
        reply = compiled.generate(source, 10)
        assert saved.generate(source, 10) == reply
        steps = [compiled.start, *reply[:-1]]
        ours = saved.logits(saved.encode(source), steps, 0)
        theirs = compiled.logits(compiled.encode(source), steps, 0)
        assert (ours - theirs).abs().max().item() <= 1e-6 * theirs.abs().max().item()


def test_cli_compile_decoder_then_generate_from_the_artifact(tiny, tmp_path, capsys):
    """`adaptc generate DIR` runs the saved programs: the tokens of `adaptc generate` with the
    spec, the checkpoint and the adapter file, and --text through the tokenizer copied into
    decoding/."""
    checkpoint, out = tmp_path / "ckpt", tmp_path / "out"
    model = tiny("llama")
    model.module.save_pretrained(checkpoint)
    save_word_tokenizer(checkpoint, words=511)
    spec = "q_proj,v_proj: lora r=4; ffn: adapter bottleneck=8"
    weights = random_weights(model, spec, tmp_path / "a.safetensors")
    (tmp_path / "s.adapt").write_text(spec + "\n")
    built = ["--model", str(checkpoint), "--adapters", str(weights)]
    assert main(["compile", str(tmp_path / "s.adapt"), *built, "--mode", "infer", "-o", str(out),
                 "--decoder", "--max-cache-len", "20"]) == 0
    printed = capsys.readouterr().out
    assert "decoding/: the same greedy tokens as the compiled decoder" in printed
    report = json.loads((out / "report.json").read_text())
    assert report["decoding"]["max_cache_len"] == 20 and report["decoding"]["check"]["same_tokens"]
    assert (out / "decoding" / "tokenizer.json").is_file()

    assert main(["generate", str(tmp_path / "s.adapt"), *built, "--prompt", "4 8 2",
                 "--max-new-tokens", "6"]) == 0
    want = capsys.readouterr().out.split()
    assert main(["generate", str(out), "--prompt", "4 8 2", "--max-new-tokens", "6"]) == 0
    assert capsys.readouterr().out.split() == want
    assert main(["generate", str(out), "--text", "w3 w7 w1", "--max-new-tokens", "6"]) == 0
    assert capsys.readouterr().out.split() == [f"w{int(i) - 1}" for i in want]

    # --text stops at generation_config.json's end ids (copied into decoding/), which a chat
    # checkpoint lists several of; --prompt ids stop only at --eos-token-id
    generated = [int(t) for t in want[3:]]
    ends = [generated[4], generated[2]]
    stop = want[:3 + min(i for i, t in enumerate(generated) if t in ends) + 1]
    for folder in (checkpoint, out / "decoding"):
        config = json.loads((folder / "generation_config.json").read_text())
        (folder / "generation_config.json").write_text(json.dumps({**config,
                                                                   "eos_token_id": ends}))
    for source in ([str(out)], [str(tmp_path / "s.adapt"), *built]):
        assert main(["generate", *source, "--text", "w3 w7 w1", "--max-new-tokens", "6"]) == 0
        assert capsys.readouterr().out.split() == [f"w{int(i) - 1}" for i in stop]
    assert main(["generate", str(out), "--prompt", "4 8 2", "--max-new-tokens", "6",
                 "--eos-token-id", *map(str, ends)]) == 0
    assert capsys.readouterr().out.split() == stop
    assert main(["generate", str(out), "--prompt", "4 8 2", "--max-new-tokens", "30"]) == 1
    assert "exceed the cache (20)" in capsys.readouterr().err


def test_decoding_errors(tiny, tmp_path, capsys):
    spec = tmp_path / "s.adapt"
    spec.write_text("q_proj: lora r=2\n")
    assert main(["compile", str(spec), "--mode", "infer", "--decoder"]) == 1
    assert "--decoder writes decoding programs into an infer artifact" in capsys.readouterr().err
    assert main(["compile", str(spec), "-o", str(tmp_path / "t"), "--decoder"]) == 1
    assert "needs --mode infer and -o DIR" in capsys.readouterr().err
    assert not (tmp_path / "t").exists()
    assert main(["compile", str(spec), "--mode", "infer", "-o", str(tmp_path / "t"),
                 "--max-cache-len", "64"]) == 1
    assert "--max-cache-len sizes the cache of --decoder's programs" in capsys.readouterr().err

    out = tmp_path / "out"
    assert main(["compile", str(spec), "--mode", "infer", "-o", str(out)]) == 0
    capsys.readouterr()
    assert main(["generate", str(out), "--prompt", "4 8"]) == 1
    assert "no cached-decoding programs (decoding/decoding.json)" in capsys.readouterr().err
    with pytest.raises(ArtifactError, match="no cached-decoding programs"):
        load_decoding(out)

    save_decoding(compile_decoder(tiny("llama"), "q_proj: lora r=2", max_cache_len=8),
                  out / "decoding")
    for flags in (["--adapters", "a.safetensors"], ["--model", "gpt2", "--no-merge"],
                  ["--max-cache-len", "64"], ["--dtype", "bfloat16"]):
        assert main(["generate", str(out), "--prompt", "4 8", *flags]) == 1
        err = capsys.readouterr().err
        assert f"{out} is a compiled artifact: {flags[0]}" in err and "recompile" in err
    assert main(["generate", str(out), "--text", "w3"]) == 1
    assert "no tokenizer files" in capsys.readouterr().err
    description = out / "decoding" / "decoding.json"
    about = json.loads(description.read_text())
    description.write_text(json.dumps({**about, "format": 9}))
    with pytest.raises(ArtifactError, match=r"decoding.json: not a decoding description "
                       r"\(format 9, this adaptc reads 1\)"):
        load_decoding(out)
    description.write_text(json.dumps({k: v for k, v in about.items() if k != "vocab_size"}))
    with pytest.raises(ArtifactError, match="not a decoding description .*vocab_size"):
        load_decoding(out)
    (out / "decoding" / "decoder.pt2").write_bytes(b"not a zip")
    description.write_text(json.dumps(about))
    with pytest.raises(ArtifactError, match="decoder.pt2: cannot load the exported program"):
        load_decoding(out)


def test_torch_compiled_saved_decoder(tiny, tmp_path):
    compiled = compile_decoder(tiny("llama"), "q_proj: lora r=2", max_cache_len=16)
    save_decoding(compiled, tmp_path / "decoding")
    saved = load_decoding(tmp_path / "decoding", torch_compile=True)
    assert isinstance(saved.graph, torch._dynamo.eval_frame.OptimizedModule)
    assert saved.generate(PROMPT, 4) == compiled.generate(PROMPT, 4)
