"""Cached decoding of encoder-decoders (adaptc.decode_seq2seq): the encoder graph once, the
decoder graph once per token over a static cache, against the train-mode graph run on the
whole sequence (teacher-forced logits, and greedy_generate's tokens)."""
from __future__ import annotations

import pytest
import torch
from helpers import randomize_adapters, small_bart
from test_seq2seq import varied_t5

import adaptc
from adaptc.cli import main
from adaptc.decode_seq2seq import compile_seq2seq_decoder
from adaptc.errors import AdaptcError, ModelError, SpecError, WeightsError
from adaptc.frontend.models import wrap
from adaptc.passes.accumulate_updates import add_product_
from adaptc.passes.bind_ops import aten_op
from adaptc.passes.graph import module_path

SOURCE = [5, 9, 11, 3, 7, 20, 4]
NEW = 10


def varied_bart():
    """small_bart with N(0, 1) noise on the attention values and FFN outputs (see varied_t5)."""
    model = small_bart()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, weight in model.named_parameters():
            if name.endswith((".v_proj.weight", "fc2.weight")):
                weight.add_(torch.randn(weight.shape, generator=gen))
    return wrap(model)


MODELS = {"t5": varied_t5, "bart": varied_bart}
SPECS = {  # T5 names its projections q, k, v, o, wi, wo; BART q_proj, …, fc1, fc2
    "lora": ("attn.q,attn.v: lora r=4", "q_proj,v_proj: lora r=4"),
    "bottleneck+mixture": ("attn,ffn: adapter bottleneck=8\nattn.q,attn.v: lora r=2\n"
                           "mixture moe k=2 experts=3",
                           "attn,ffn: adapter bottleneck=8\nq_proj,v_proj: lora r=2\n"
                           "mixture moe k=2 experts=3"),
    "mov": ("attn.k,attn.v: ia3; ffn.down: ia3 feedforward\nmixture moe router=soft experts=3",
            "k_proj,v_proj: ia3; fc2: ia3 feedforward\nmixture moe router=soft experts=3"),
    "prompt": ("embed: prompt tokens=3; attn.q: lora r=2", "embed: prompt tokens=3"),
    "ptuning": ("embed: ptuning tokens=2", "embed: ptuning tokens=2 encoder=lstm"),
    # PEFT's seq2seq prefix tuning (decoder self-attention), and Li & Liang's (all three)
    "prefix decoder": ("decoder.block.*.layer.0.SelfAttention: prefix tokens=2",
                       "decoder.layers.*.self_attn: prefix tokens=3"),
    "prefix everywhere": ("attn, EncDecAttention: prefix tokens=2 projection=16",
                          "self_attn, encoder_attn: ptuning2 tokens=3"),
}


def trained(model, spec: str, path) -> torch.nn.Module:
    """The train-mode graph with random adapters (eval), saved to `path`."""
    gm = adaptc.compile(model, spec)
    randomize_adapters(gm, 0.3)
    adaptc.save_adapters(gm, path)
    return gm.eval()


def full_sequence(gm, source: list[int], decoder_ids: list[int]) -> torch.Tensor:
    ids = torch.tensor([source])
    with torch.no_grad():
        return gm(input_ids=ids, attention_mask=torch.ones_like(ids),
                  decoder_input_ids=torch.tensor([decoder_ids])).logits[0]


@pytest.mark.parametrize("kind", SPECS)
@pytest.mark.parametrize("name", MODELS)
def test_cached_decoding_equals_the_train_graph(tmp_path, name, kind):
    """Greedy tokens equal greedy_generate on the train graph, also after a longer
    generation on the same decoder; the logits of each decoder position, computed one
    token per call through the cache, equal the train graph's
    teacher-forced logits, relative to their scale (unscaled T5 outputs reach ~10²) within
    1e-4: merged weights round differently from the train graph's W·x + s·B·A·x."""
    model = MODELS[name]()
    spec = SPECS[kind][name == "bart"]
    gm = trained(model, spec, tmp_path / "a.safetensors")
    decoder = compile_seq2seq_decoder(model, spec, adapters=tmp_path / "a.safetensors",
                                      max_cache_len=16)
    start = model.module.config.decoder_start_token_id
    ids = torch.tensor([SOURCE])
    want = adaptc.greedy_generate(gm, ids, torch.ones_like(ids), NEW,
                                  decoder_start_token_id=start)[0, 1:].tolist()
    decoder.generate(list(range(30, 41)), NEW)  # a longer source and reply before: the
    reply = decoder.generate(SOURCE, NEW)      # cache's stale entries must not be read
    assert reply == want
    memory = decoder.encode(SOURCE)
    steps = torch.cat([decoder.logits(memory, [token], i)
                       for i, token in enumerate([start, *reply[:-1]])])
    expected = full_sequence(gm, SOURCE, [start, *reply[:-1]])
    scale = expected.abs().max().item()
    assert (steps - expected).abs().max().item() <= 1e-4 * max(1.0, scale)
    assert (expected - full_sequence(model.module, SOURCE, [start, *reply[:-1]])).abs().max() > 1e-3


def test_graphs_split_the_adapters(tmp_path):
    """Encoder sites compile into the encoder graph, decoder and LM-head sites into the
    decoder graph; virtual tokens only before the encoder's input; one file serves both."""
    model = varied_t5()
    spec = "embed: prompt tokens=3; attn.q: lora r=2; ffn: adapter bottleneck=8"
    gm = trained(model, spec, tmp_path / "a.safetensors")
    decoder = compile_seq2seq_decoder(model, spec, adapters=tmp_path / "a.safetensors",
                                      merge=False)
    encoder_sites = [row["path"] for row in adaptc.report_of(decoder.encoder).sites]
    decoder_sites = [row["path"] for row in adaptc.report_of(decoder.decoder).sites]
    assert encoder_sites and decoder_sites
    assert all(".decoder." not in site for site in encoder_sites)
    assert all(".encoder." not in site for site in decoder_sites)
    train_sites = [f"model.{row['path']}" for row in adaptc.report_of(gm).sites]
    assert sorted(encoder_sites + decoder_sites) == sorted(train_sites)
    assert decoder.encode(SOURCE)[0].shape[1] == 3 + len(SOURCE)


def test_spec_errors_name_the_modules_as_compile_does():
    """Both halves resolve the spec inside a wrapper (the model at `model`): E301's nearest
    names were 'model.encoder.block.0...', not the names compile and `adaptc inspect` show."""
    t5 = varied_t5()
    with pytest.raises(SpecError) as decoding:
        compile_seq2seq_decoder(t5, "qq: lora r=2")
    with pytest.raises(SpecError) as compiling:
        adaptc.compile(t5, "qq: lora r=2")
    assert str(decoding.value) == str(compiling.value)


def test_cache_longer_than_bart_positions_is_refused():
    """BART's decoder reads learned positions (16 rows past its offset of 2): a 16-slot
    cache decodes to its end; a longer cache, or a prefix's rows on top, failed mid-way
    with an IndexError inside the position embedding (as GPT-2's did, test_decode)."""
    model = wrap(small_bart(d_model=32, encoder_ffn_dim=64, decoder_ffn_dim=64,
                            encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                            decoder_attention_heads=2, vocab_size=64,
                            max_position_embeddings=16))
    decoder = compile_seq2seq_decoder(model, "q_proj: lora r=2", max_cache_len=16)
    assert len(decoder.generate([5, 7, 9], 16)) == 16
    with pytest.raises(AdaptcError, match="max_cache_len=17 exceeds the model's 16 positions: "
                                          ".* use max_cache_len <= 16"):
        compile_seq2seq_decoder(model, "q_proj: lora r=2", max_cache_len=17)
    with pytest.raises(AdaptcError, match=r"max_cache_len=16 exceeds the model's 16 positions "
                                          r"\(3 of them taken by the prefix\).* <= 13"):
        compile_seq2seq_decoder(model, "attn: prefix tokens=3", max_cache_len=16)
    prefixed = compile_seq2seq_decoder(model, "attn: prefix tokens=3", max_cache_len=13)
    assert len(prefixed.generate([5, 7, 9], 13)) == 13


def test_refuses_what_it_cannot_decode(tmp_path):
    t5 = varied_t5()
    with pytest.raises(AdaptcError, match="cannot run gated lora .*decoder.*greedy_generate"):
        compile_seq2seq_decoder(t5, "attn.q: lora r=2 gate")
    compile_seq2seq_decoder(t5, "encoder.block.*.layer.0.SelfAttention.q: lora r=2 gate")
    with pytest.raises(ModelError, match="not an encoder-decoder.*compile_decoder"):
        compile_seq2seq_decoder("llama", "q_proj: lora r=2")
    with pytest.raises(ModelError, match="meta device"):
        compile_seq2seq_decoder(wrap(varied_bart().module.to("meta")), "q_proj: lora r=2")
    with pytest.raises(AdaptcError, match="max_cache_len must be at least 2, got 1"):
        compile_seq2seq_decoder(t5, "attn.q: lora r=2", max_cache_len=1)  # was torch's
        # "AssertionError: Cannot create Dim with inconsistent min=1, max=1"
    decoder = compile_seq2seq_decoder(t5, "attn.q: lora r=2", max_cache_len=4)
    with pytest.raises(AdaptcError, match="5 new tokens exceed the decoder's cache \\(4\\)"):
        decoder.generate(SOURCE, 5)
    with pytest.raises(AdaptcError, match="token id 99999 is outside"):
        decoder.generate([5, 99999], 2)
    bart = compile_seq2seq_decoder(varied_bart(), "embed: prompt tokens=4",
                                   max_cache_len=16)  # within its 64 decoder positions
    with pytest.raises(AdaptcError, match="61-token source exceeds the encoder's 60 positions "
                                          "left by 4 virtual tokens"):
        bart.generate(list(range(3, 64)), 1)


def test_adapter_files_must_match_the_spec(tmp_path):
    """A file with tensors neither graph has, or without some a graph needs, is a
    WeightsError naming one, as for a single compiled module."""
    t5 = varied_t5()
    trained(t5, "attn.q,attn.v: lora r=2", tmp_path / "qv.safetensors")
    with pytest.raises(WeightsError, match="1 unexpected|unexpected .*v.lora"):
        compile_seq2seq_decoder(t5, "attn.q: lora r=2", adapters=tmp_path / "qv.safetensors")
    with pytest.raises(WeightsError, match="missing .*k.lora"):
        compile_seq2seq_decoder(t5, "attn.q,attn.k: lora r=2",
                                adapters=tmp_path / "qv.safetensors")


def test_cli_falls_back_to_full_sequence_decoding_for_gates(tmp_path, capsys):
    """Gated methods have no cached encoder-decoder path: `adaptc generate` reruns the
    decoder on the whole sequence and prints greedy_generate's tokens."""
    model = varied_t5()
    model.module.save_pretrained(tmp_path / "ckpt")
    spec = "attn.q,attn.v: lora r=4 gate"
    (tmp_path / "s.adapt").write_text(spec + "\n")
    gm = trained(model, spec, tmp_path / "a.safetensors")
    ids = torch.tensor([[5, 17, 42]])
    want = adaptc.greedy_generate(gm, ids, torch.ones_like(ids), 5,
                                  decoder_start_token_id=0)[0, 1:].tolist()
    assert main(["generate", str(tmp_path / "s.adapt"), "--model", str(tmp_path / "ckpt"),
                 "--adapters", str(tmp_path / "a.safetensors"), "--prompt", "5 17 42",
                 "--max-new-tokens", "5"]) == 0
    assert capsys.readouterr().out.split() == [str(t) for t in want]
    assert main(["generate", str(tmp_path / "s.adapt"), "--model", str(tmp_path / "ckpt"),
                 "--prompt", "5 17 42", "--max-cache-len", "4"]) == 1
    assert capsys.readouterr().err.strip() == (
        "--max-cache-len sizes a KV cache; a gated spec decodes without one (the whole "
        "sequence at each step)")


def linear_paths(graph) -> list[str]:
    """Module paths of the graph's GEMMs: linear ops and in-place LoRA B GEMMs."""
    return [module_path(n) or "" for n in graph.graph.nodes if n.op == "call_function" and (
        aten_op(n) == torch.ops.aten.linear.default or n.target is add_product_)]


@pytest.mark.parametrize("merge", [True, False])
def test_cross_attention_keys_and_values_are_hoisted_out_of_the_step(tmp_path, merge):
    """What reads only the encoder states runs once per source (`cross`): every decoder
    layer's cross-attention k and v projections, with their LoRA when unmerged, and none of
    it in the step graph; the tokens stay those of the train graph
    (test above)."""
    model = varied_t5()
    spec = "attn.k,attn.v: lora r=2"
    trained(model, spec, tmp_path / "a.safetensors")
    decoder = compile_seq2seq_decoder(model, spec, adapters=tmp_path / "a.safetensors",
                                      merge=merge)
    layers = model.module.config.num_decoder_layers
    cross, step = linear_paths(decoder.cross), linear_paths(decoder.decoder)
    # k and v of each layer; unmerged, also B of each and one A GEMM for them all, since
    # they all read the encoder states (fuse_siblings)
    assert len(cross) == 2 * layers + (0 if merge else 2 * layers + 1)
    assert all(".EncDecAttention." in path for path in cross)
    assert not any(".EncDecAttention.k" in p or ".EncDecAttention.v" in p for p in step)
    assert decoder.hoisted >= len(cross)
    assert len(decoder.encode(SOURCE)) == 1 + 2 * layers  # states, then each layer's k and v


def test_torch_compile_gives_the_same_tokens():
    """torch.compile over the three graphs (dynamic shapes): the eager decoder's tokens, for
    two source lengths."""
    model = varied_t5()
    eager = compile_seq2seq_decoder(model, "attn.q,attn.v: lora r=2")
    compiled = compile_seq2seq_decoder(model, "attn.q,attn.v: lora r=2", torch_compile=True)
    for source in (SOURCE, SOURCE[:3]):
        assert compiled.generate(source, 6) == eager.generate(source, 6)
