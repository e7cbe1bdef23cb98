"""Encoder-decoders (T5 as Flan-T5 lays it out: the `t5` preset; BART): LoRA and IA3 equal
PEFT's, the merged program and HF checkpoint reload with the same logits, LoRA trains, and
greedy decoding gives the tokens of transformers' `generate` on PEFT's model (float32)."""
from __future__ import annotations

import copy

import pytest
import torch
from peft import AdaLoraConfig, IA3Config, LoraConfig, TaskType, VeraConfig, get_peft_model

import adaptc
from adaptc.decode import compile_decoder
from adaptc.errors import AdaptcError, ModelError, SpecError
from adaptc.frontend.models import wrap
from helpers import (copy_ia3_scales, peft_twin, randomize_adapters, randomize_and_copy,
                     save_word_tokenizer, serve_checkpoint, small_bart)
from test_prompt import copy_from_peft as copy_prompt

# per model: PEFT's default LoRA targets (every attention's q and v, cross-attention included)
LORA_TARGETS = {"t5": ["q", "v"], "bart": ["q_proj", "v_proj"]}


def varied_t5():
    """The t5 preset with N(0, 1) noise on the attention values and FFN outputs, so greedy
    tokens vary (the random init's argmax is one token everywhere)."""
    model = adaptc.load_model("t5")
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, weight in model.module.named_parameters():
            if name.endswith((".v.weight", "wo.weight")):
                weight.add_(torch.randn(weight.shape, generator=gen))
    return model


def model_of(name: str):
    return adaptc.load_model("t5") if name == "t5" else wrap(small_bart())


@pytest.fixture(scope="module")
def compiled():
    """compiled(name, spec) → (model_of(name), its eval graph of `spec`), compiled once for the
    module: for tests that set every adapter tensor they read, or read the initial ones."""
    cache = {}

    def make(name: str, spec: str):
        if (name, spec) not in cache:
            model = model_of(name)
            cache[name, spec] = model, adaptc.compile(model, spec).eval()
        return cache[name, spec]
    return make


def seq2seq_inputs(batch: int = 3, source: int = 9, target: int = 5, seed: int = 0) -> dict:
    """A left-padded source row, and decoder inputs of another length than the source."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, 100, (batch, source), generator=gen)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    return {"input_ids": ids, "attention_mask": mask,
            "decoder_input_ids": torch.randint(2, 100, (batch, target), generator=gen)}


def close(got: torch.Tensor, want: torch.Tensor, tol: float = 1e-6) -> bool:
    """Max error relative to the output's scale (Flan-T5's unscaled decoder output gives
    logits of ~10²)."""
    return (got - want).abs().max().item() <= tol * max(1.0, want.abs().max().item())


@pytest.mark.parametrize("name", ["t5", "bart"])
def test_lora_equals_peft(name, compiled):
    model, gm = compiled(name, "attn.q,attn.v: lora r=4 alpha=8")
    twin = peft_twin(model.module, LORA_TARGETS[name], 4, 8)
    report = adaptc.report_of(gm)
    assert len(report.sites) == 6 * 2  # encoder self, decoder self and cross q, v; 2 layers
    assert (report.trainable, report.total) == twin.get_nb_trainable_parameters()
    randomize_and_copy(gm, twin)
    x = seq2seq_inputs()
    ours = gm(**x).logits
    assert ours.shape == (3, 5, model.module.config.vocab_size)
    assert close(ours, twin(**x).logits)
    assert (ours - model.module(**x).logits).abs().max().item() > 1e-2  # the adapters act


# per method: the spec on every attention's q, v (cross-attention included), PEFT's config,
# and PEFT's tensor for each of ours on a layer
WEIGHT_SPACE = {
    "dora": ("lora r=4 alpha=8 dora", lambda t: LoraConfig(r=4, lora_alpha=8, target_modules=t,
                                                            use_dora=True),
             {"A": "lora_A.default.weight", "B": "lora_B.default.weight",
              "magnitude": "lora_magnitude_vector.default.weight"}),
    "vera": ("vera r=16 seed=7", lambda t: VeraConfig(r=16, target_modules=t,
                                                      projection_prng_key=7),
             {"lambda_d": "vera_lambda_d.default", "lambda_b": "vera_lambda_b.default"}),
    "adalora": ("adalora init_r=4 target_r=2 alpha=8 total_step=10",
                lambda t: AdaLoraConfig(init_r=4, target_r=2, lora_alpha=8, target_modules=t,
                                        total_step=10, lora_dropout=0.0),
                {"A": "lora_A.default", "E": "lora_E.default", "B": "lora_B.default"})}


@pytest.mark.parametrize("method", list(WEIGHT_SPACE))
def test_weight_space_methods_and_gradients_equal_peft(method):
    """DoRA, VeRA and AdaLoRA on BART's two stacks and its cross-attention: with the same
    random adapter weights, logits and one backward's adapter gradients equal PEFT's (T5 too,
    and every method on Llama, Mistral, Qwen2, GPT-2 and BERT, in a sweep not kept here)."""
    name = "bart"
    spec, config, names = WEIGHT_SPACE[method]
    model = model_of(name)
    gm = adaptc.compile(model, f"attn.q,attn.v: {spec}").eval()
    twin = get_peft_model(copy.deepcopy(model.module), config(LORA_TARGETS[name])).eval()
    report = adaptc.report_of(gm)
    assert (report.trainable, report.total) == twin.get_nb_trainable_parameters()
    gen, pairs = torch.Generator().manual_seed(0), []
    with torch.no_grad():
        for path, ours in adaptc.adapters.adapter_modules(gm).items():
            layer = twin.base_model.model.get_submodule(path.rsplit(".", 1)[0])
            for mine, theirs in names.items():
                mine, theirs = getattr(ours, mine), layer.get_parameter(theirs)
                mine.copy_(mine + 0.1 * torch.randn(mine.shape, generator=gen))
                theirs.copy_(mine)
                pairs.append((mine, theirs))
    x = seq2seq_inputs()
    ours, theirs = gm(**x).logits, twin(**x).logits
    assert close(ours, theirs)
    assert (ours - model.module(**x).logits).abs().max().item() > 1e-3  # tiny BART: logits ~1
    weights = torch.randn(ours.shape, generator=gen)
    (ours * weights).sum().backward()
    (theirs * weights).sum().backward()
    for mine, peft_tensor in pairs:
        assert close(mine.grad, peft_tensor.grad, 1e-5)


def test_ia3_equals_peft_on_t5():
    """The IA3 paper's setting (T0 is a T5): keys, values and the FFN's input to wo."""
    model = model_of("t5")
    gm = adaptc.compile(model, "attn.k,attn.v: ia3; ffn.down: ia3 feedforward").eval()
    config = IA3Config(task_type=TaskType.SEQ_2_SEQ_LM, target_modules=["k", "v", "wo"],
                       feedforward_modules=["wo"])
    twin = get_peft_model(copy.deepcopy(model.module), config).eval()
    assert (adaptc.report_of(gm).trainable, adaptc.report_of(gm).total) == \
        twin.get_nb_trainable_parameters()
    copy_ia3_scales(gm, twin)
    x = seq2seq_inputs()
    assert close(gm(**x).logits, twin(**x).logits)


def test_merged_program_and_checkpoint_reload(tmp_path):
    """LoRA on every projection merges: program.pt2 and the HF checkpoint transformers loads
    compute the train graph's logits."""
    from transformers import AutoModelForSeq2SeqLM
    model_of("t5").module.save_pretrained(tmp_path / "ckpt")
    train, _ = serve_checkpoint(tmp_path, "attn.*,ffn.*: lora r=2", 0.05)
    x = seq2seq_inputs(batch=2, source=7, target=4, seed=1)
    want = train.eval()(**x).logits
    assert close(adaptc.load_program(tmp_path / "out").module()(**x).logits, want, 1e-5)
    merged = AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "out" / "hf")
    assert close(merged(**x).logits, want, 1e-5)
    assert (want - model_of("t5").module(**x).logits).abs().max().item() > 1e-2


def teacher_forced_losses(gm, lr: float, target_of, start: int, steps: int = 12) -> list[float]:
    """AdamW steps on fresh random sources [8, 6], the decoder fed `target_of(source)`
    shifted right behind `start`, cross-entropy on the logits; the loss of each step."""
    optimizer = torch.optim.AdamW([p for p in gm.parameters() if p.requires_grad], lr=lr)
    gen = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(steps):
        source = torch.randint(4, 40, (8, 6), generator=gen)
        target = target_of(source)
        shifted = torch.cat([torch.full((8, 1), start), target[:, :-1]], 1)
        logits = gm(input_ids=source, attention_mask=torch.ones_like(source),
                    decoder_input_ids=shifted).logits
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), target.flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def assert_serves(folder, spec: str, train) -> None:
    """The infer artifact of `spec` on folder/ckpt with `train`'s adapters (`adaptc compile
    --mode infer --adapters`, into folder/out) computes the logits of `train` (eval)."""
    from adaptc.cli import main
    (folder / "s.adapt").write_text(spec + "\n")
    weights = adaptc.save_adapters(train, folder / "a.safetensors")
    assert main(["compile", str(folder / "s.adapt"), "--model", str(folder / "ckpt"),
                 "--mode", "infer", "--adapters", str(weights), "-o", str(folder / "out")]) == 0
    x = seq2seq_inputs(batch=2, source=7, target=4, seed=1)
    want = train.eval()(**x).logits
    assert close(adaptc.load_program(folder / "out").module()(**x).logits, want, 1e-5)


def test_lora_trains_a_copy_task():
    """The decoder learns to repeat the source (teacher forcing, cross-entropy)."""
    model = model_of("t5")
    gm = adaptc.compile(model, "attn.*: lora r=4 alpha=8")
    losses = teacher_forced_losses(gm, 5e-3, lambda source: source, start=0)
    assert sum(losses[-3:]) / 3 < 0.7 * sum(losses[:3]) / 3


@pytest.mark.parametrize("name", ["t5", "bart"])
def test_greedy_generate_equals_transformers_generate(name):
    model = model_of(name)
    # a large alpha: the random updates outweigh the random base, whose argmax is one token
    gm = adaptc.compile(model, "attn.q,attn.v: lora r=4 alpha=400").eval()
    twin = peft_twin(model.module, LORA_TARGETS[name], 4, 400)
    randomize_and_copy(gm, twin)
    x = seq2seq_inputs()
    del x["decoder_input_ids"]
    start = model.module.config.decoder_start_token_id
    ours = adaptc.greedy_generate(gm, x["input_ids"], x["attention_mask"], 6,
                                  decoder_start_token_id=start)
    theirs = twin.generate(**x, max_new_tokens=6, min_new_tokens=6, do_sample=False,
                           num_beams=1, eos_token_id=None, forced_eos_token_id=None)  # BART's
    assert ours.shape == (3, 7) and torch.equal(ours, theirs)
    assert ours[:, 0].tolist() == [start] * 3 and ours[:, 1:].unique().numel() > 3
    with pytest.raises(ValueError, match=r"the compiled module is an encoder-decoder \(it takes "
                                         r"decoder_input_ids\): pass decoder_start_token_id"):
        adaptc.greedy_generate(gm, x["input_ids"], x["attention_mask"], 6)  # it said: missing
        # input 'decoder_input_ids'


def test_cli_generate_replies(tmp_path, capsys):
    """`adaptc generate` on an encoder-decoder prints the decoder's greedy reply to the
    source ids (cached: adaptc.decode_seq2seq): the tokens of greedy_generate on the train
    graph with the same adapters, up to and including --eos-token-id."""
    from adaptc.cli import main
    model = varied_t5()
    model.module.save_pretrained(tmp_path / "ckpt")
    spec = "attn.q,attn.v: lora r=4 alpha=400"
    (tmp_path / "s.adapt").write_text(spec + "\n")
    gm = adaptc.compile(model, spec)
    randomize_adapters(gm, 0.05)
    adaptc.save_adapters(gm, tmp_path / "a.safetensors")
    want = adaptc.greedy_generate(gm.eval(), torch.tensor([[5, 17, 42]]),
                                  torch.ones(1, 3, dtype=torch.long), 6,
                                  decoder_start_token_id=0)[0, 1:].tolist()
    assert len(set(want)) > 1
    args = ["generate", str(tmp_path / "s.adapt"), "--model", str(tmp_path / "ckpt"),
            "--adapters", str(tmp_path / "a.safetensors"), "--prompt", "5 17 42"]
    assert main([*args, "--max-new-tokens", "6"]) == 0
    assert capsys.readouterr().out.split() == [str(t) for t in want]
    assert main([*args, "--max-new-tokens", "6", "--eos-token-id", str(want[1])]) == 0
    assert capsys.readouterr().out.split() == [str(t) for t in want[:want.index(want[1]) + 1]]
    assert main([*args, "--eos-token-id", "-1"]) == 1
    assert "eos_token_id -1 is outside the model's vocabulary" in capsys.readouterr().err
    save_word_tokenizer(tmp_path / "ckpt", words=511)  # "w<id - 1>"; no eos token: 6 tokens
    text = [*args[:-2], "--text", "w4 w16 w41", "--max-new-tokens", "6"]
    assert main(text) == 0
    assert capsys.readouterr().out.split() == [f"w{t - 1}" for t in want]


def test_prompt_on_the_decoders_embedding_is_refused():
    """T5's `decoder.embed_tokens` is `shared`, which the encoder reads too: naming the
    decoder's put the virtual tokens before the encoder's input without a word."""
    with pytest.raises(SpecError, match="'decoder.embed_tokens' reads 'decoder_input_ids'") as err:
        adaptc.compile(model_of("t5"), "decoder.embed_tokens: prompt tokens=3")
    assert err.value.first.code == "E302"


def test_causal_decoder_is_refused():
    with pytest.raises(ModelError, match="is an encoder-decoder; compile_decoder is for causal.*"
                                         "compile_seq2seq_decoder"):
        compile_decoder(model_of("t5"), "q: lora r=2")


@pytest.mark.parametrize("name", ["t5", "bart"])
def test_decoder_inputs_of_another_batch_are_refused(name, compiled):
    """Decoder inputs for 3 rows behind a source of 2 failed as the graph's "Guard failed:
    decoder_input_ids.size()[0] == input_ids.size()[0]" AssertionError."""
    model, gm = compiled(name, "attn.q: lora r=2")
    x = seq2seq_inputs(batch=3)
    with pytest.raises(ValueError, match=r"input 'decoder_input_ids' has batch size 2 and input "
                                         r"'input_ids' 3: each source row needs its row"):
        gm(**{**x, "decoder_input_ids": x["decoder_input_ids"][:2]})
    assert close(gm(**x).logits, model.module(**x).logits)


def test_labels_without_decoder_inputs_say_how_to_build_them(compiled):
    """transformers' T5 and BART build decoder_input_ids from `labels`; the compiled module
    takes the decoder inputs, and its error said only to compute the loss from the logits."""
    model, gm = compiled("t5", "attn.q: lora r=2")
    x = seq2seq_inputs()
    labels = x.pop("decoder_input_ids")
    with pytest.raises(TypeError, match="missing input 'decoder_input_ids'.*labels shifted right "
                                        "behind the config's decoder_start_token_id"):
        gm(**x, labels=labels)
    ours = gm(**x, decoder_input_ids=shift_right(model.module, labels)).logits
    assert close(ours, model.module(**x, labels=labels).logits)


def test_layer_selections_count_each_stack():
    """A BART with 3 encoder and 1 decoder layers (DistilBART's 12 and 6, smaller): `[-1]`
    counted from the deepest stack, picking encoder layer 2 alone, and a selection of the
    decoder's last layer picked nothing (E304 "the model has layers 0..2")."""
    model = wrap(small_bart(encoder_layers=3, decoder_layers=1))
    gm = adaptc.compile(model, "attn.q[-1]: lora r=2")
    assert [s["path"] for s in adaptc.report_of(gm).sites] == [
        "model.encoder.layers.2.self_attn.q_proj", "model.decoder.layers.0.self_attn.q_proj",
        "model.decoder.layers.0.encoder_attn.q_proj"]
    gm = adaptc.compile(model, "decoder.layers.*.self_attn.q_proj[-1]: lora r=2")
    assert [s["path"] for s in adaptc.report_of(gm).sites] == [
        "model.decoder.layers.0.self_attn.q_proj"]
    with pytest.raises(SpecError, match=r"E304.*model.encoder.layers 0..2 and "
                                        r"model.decoder.layers 0..0"):
        adaptc.compile(model, "attn.q[5]: lora r=2")


def test_mixture_expert_counts_spread_over_each_stack():
    """MoLA's experts=[2, 6] on a BART with 2 encoder and 4 decoder layers: the groups were
    cut from the deepest stack's 4 layers, so the encoder's last layer got 2 experts."""
    model = wrap(small_bart(d_model=32, encoder_ffn_dim=64, decoder_ffn_dim=64,
                            decoder_layers=4))
    gm = adaptc.compile(model, "self_attn.q_proj: lora r=2; mixture moe k=1 experts=[2, 6]")
    experts = {path.split(".self_attn")[0].removeprefix("model."):
               module.A.shape[0] for path, module in adaptc.adapters.adapter_modules(gm).items()}
    assert experts == {"encoder.layers.0": 2, "encoder.layers.1": 6, "decoder.layers.0": 2,
                       "decoder.layers.1": 2, "decoder.layers.2": 6, "decoder.layers.3": 6}


def peft_prompt(model, tokens: int, method: str = "prompt"):
    """PEFT's PromptTuning (or P-tuning's PromptEncoder, an MLP of width 20) with the prompt
    on the encoder's input only (Lester et al.'s setting; PEFT's default for SEQ_2_SEQ_LM
    trains n more rows that its forward does not read)."""
    from peft import PromptEncoderConfig, PromptTuningConfig
    kind, extra = ((PromptTuningConfig, {}) if method == "prompt" else
                   (PromptEncoderConfig, {"encoder_hidden_size": 20}))
    config = kind(task_type=TaskType.SEQ_2_SEQ_LM, num_virtual_tokens=tokens,
                  num_transformer_submodules=1, **extra)
    return get_peft_model(copy.deepcopy(model), config).eval()


def shift_right(model, labels: torch.Tensor) -> torch.Tensor:
    """The decoder input transformers builds from `labels` (start token, labels[:, :-1])."""
    start = torch.full_like(labels[:, :1], model.config.decoder_start_token_id)
    return torch.cat([start, labels[:, :-1]], 1)


@pytest.mark.parametrize("name,embed", [("t5", "shared"), ("bart", "model.shared")])
@pytest.mark.parametrize("method", ["prompt", "ptuning"])
def test_virtual_tokens_on_the_encoder_input_equal_peft(name, embed, method):
    """`embed: prompt` puts the virtual tokens before the encoder's input (the shared
    embedding is traced twice; the one reading `input_ids` is the encoder's). PEFT's
    encoder-decoder forward takes `labels`, from which the model builds the decoder input."""
    model = model_of(name)
    gm = adaptc.compile(model, f"embed: {method} tokens=3 "
                        + "hidden=20" * (method != "prompt")).eval()
    twin = peft_prompt(model.module, 3, method)
    report = adaptc.report_of(gm)
    assert (report.trainable, report.total) == twin.get_nb_trainable_parameters()
    copy_prompt(gm.get_submodule(f"{embed}.prompt"), twin)
    x = seq2seq_inputs()
    labels = x.pop("decoder_input_ids")
    ours = gm(**x, decoder_input_ids=shift_right(model.module, labels))
    theirs = twin(**x, labels=labels)
    assert ours.logits.shape == theirs.logits.shape == (3, 5, model.module.config.vocab_size)
    assert close(ours.logits, theirs.logits)
    assert ours.encoder_last_hidden_state.shape[1] == 9  # the real tokens' states
    assert (ours.logits - model.module(**x, labels=labels).logits).abs().max().item() > 1e-3


@pytest.mark.parametrize("method", ["prompt", "ptuning"])
def test_virtual_tokens_on_a_scaled_embedding_equal_peft(method):
    """BART with scale_embedding multiplies the looked-up rows by √D inside its embedding
    module; PEFT's virtual tokens replace that module's output, so they are not scaled. They
    were written before the scale (8× here: logits off by 1% of the prompt's effect), and
    `init=[ids]` took the unscaled rows where PEFT's text init takes the module's output."""
    model = wrap(small_bart(scale_embedding=True))
    gm = adaptc.compile(model, f"embed: {method} tokens=3 "
                        + "hidden=20" * (method != "prompt")).eval()
    twin = peft_prompt(model.module, 3, method)
    copy_prompt(gm.get_submodule("model.shared.prompt"), twin)
    x = seq2seq_inputs()
    ours, theirs = gm(**x).logits, twin(**x).logits
    assert close(ours, theirs)
    assert (ours - model.module(**x).logits).abs().max().item() > 1e-3
    shared = model.module.model.shared
    init = adaptc.compile(model, "embed: prompt tokens=2 init=[5, 9]").eval()
    assert torch.equal(init.get_submodule("model.shared.prompt").embedding,
                       shared(torch.tensor([5, 9])))
    assert shared.embed_scale == 8.0


def test_prompt_on_t5_trains_and_serves(tmp_path):
    """Lester et al.'s T5 setting: a prompt initialised from vocabulary embeddings lowers the
    loss of one reply to every source; the infer artifact with the trained prompt computes the
    train graph's logits (one compile serves both)."""
    spec = "embed: prompt tokens=4 init=vocab"
    model_of("t5").module.save_pretrained(tmp_path / "ckpt")
    # eval(): without the model's 0.1 dropout, whose noise on the random T5's logits (~60)
    # holds 12 steps at 145/187 of the first losses (test_follow_train_mode trains with it)
    gm = adaptc.compile(str(tmp_path / "ckpt"), spec).eval()
    reply = torch.randint(4, 40, (1, 6), generator=torch.Generator().manual_seed(1))
    losses = teacher_forced_losses(gm, 0.3, lambda source: reply.expand(len(source), -1),
                                   start=0)
    assert sum(losses[-3:]) / 3 < 0.7 * sum(losses[:3]) / 3  # 64.6 → 41.0
    assert_serves(tmp_path, spec, gm)


def test_prompt_greedy_generate_equals_peft_generate():
    """T5 with a random prompt: greedy decoding gives the tokens of transformers' `generate`
    on PEFT's model with the same prompt."""
    model = varied_t5()
    gm = adaptc.compile(model, "embed: prompt tokens=4").eval()
    twin = peft_prompt(model.module, 4)
    with torch.no_grad():
        twin.prompt_encoder["default"].embedding.weight.copy_(
            gm.get_submodule("shared.prompt").embedding)
    x = seq2seq_inputs()
    ours = adaptc.greedy_generate(gm, x["input_ids"], x["attention_mask"], 6,
                                  decoder_start_token_id=0)
    theirs = twin.generate(input_ids=x["input_ids"], attention_mask=x["attention_mask"],
                           max_new_tokens=6, min_new_tokens=6, do_sample=False, num_beams=1,
                           eos_token_id=None)
    assert ours.shape == (3, 7) and torch.equal(ours, theirs)
    assert ours[:, 1:].unique().numel() > 3
    plain = adaptc.greedy_generate(model.module, x["input_ids"], x["attention_mask"], 6,
                                   decoder_start_token_id=0)
    assert not torch.equal(ours, plain)  # the prompt changes what is generated


def prefix_rows(gm) -> dict[str, torch.Tensor]:
    """Each adapted attention's [2, P, H, d] prefix, by module path (statement 0's sites in
    the order its encoder stacks them)."""
    paths = [s["path"] for s in adaptc.report_of(gm).sites if s["method"] == "prefix"]
    with torch.no_grad():
        return dict(zip(paths, gm.get_submodule("adaptc.prefix_0")()))


def prefixed_sdpa(rows: dict[str, torch.Tensor], model):
    """transformers' own SDPA attention with each listed module's prefix prepended to its
    keys and values and open columns in its mask: the reference for prefixes on attentions
    transformers gives no cache (an encoder's self-attention, cross-attention). A T5
    self-attention's position bias comes from its stack's `compute_bias` as with a P-token
    cache (keys at 0 … P+S-1, queries from P); a cross-attention's has zero columns."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    def attend(module, query, key, value, attention_mask, position_bias=None, **kwargs):
        path = module.adaptc_path
        if path in rows:
            keys, values = (part.transpose(0, 1).expand(key.shape[0], -1, -1, -1)
                            for part in rows[path])
            tokens = keys.shape[2]
            key, value = torch.cat([keys, key], 2), torch.cat([values, value], 2)
            if attention_mask is None and module.is_causal and "EncDecAttention" not in path:
                queries = query.shape[2]  # causal without a mask: spelled out, prefix open
                attention_mask = torch.ones(queries, queries, dtype=torch.bool).tril()
                kwargs["is_causal"] = False
            if attention_mask is not None:
                shape = (*attention_mask.shape[:-1], tokens)
                opening = (attention_mask.new_ones(shape) if attention_mask.dtype == torch.bool
                           else attention_mask.new_zeros(shape))
                attention_mask = torch.cat([opening, attention_mask], -1)
            if position_bias is not None and "EncDecAttention" in path:
                position_bias = torch.cat([position_bias.new_zeros(
                    (*position_bias.shape[:-1], tokens)), position_bias], -1)
            elif position_bias is not None:
                first = model.get_submodule(f"{path.split('.')[0]}.block.0.layer.0.SelfAttention")
                queries = query.shape[2]
                position_bias = first.compute_bias(queries, tokens + queries,
                                                   past_seen_tokens=tokens)
        if position_bias is not None:
            kwargs["position_bias"] = position_bias
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    return attend


@pytest.mark.parametrize("name,target,limit", [
    ("bart", "decoder.layers.*.self_attn", 64 - 3),  # the decoder's positions 3 … 63
    ("t5", "decoder.block.*.layer.0.SelfAttention", 4096)])  # relative: no table
def test_prefix_on_the_decoder_equals_peft(name, target, limit):
    """PEFT's seq2seq PrefixTuning: a P-token cache on the decoder's self-attention (the
    cross-attention half it builds is dropped by transformers' EncoderDecoderCache): BART's
    decoder positions shift by P, T5's relative bias sees prefix keys at 0 … P-1. Its
    embedding rows pair self and cross prefixes, so decoder layer l reads block 2l mod L of
    them; the counts are the same."""
    from peft import PrefixTuningConfig
    model = model_of(name)
    gm = adaptc.compile(model, f"{target}: prefix tokens=3").eval()
    twin = get_peft_model(copy.deepcopy(model.module),
                          PrefixTuningConfig(task_type=TaskType.SEQ_2_SEQ_LM,
                                             num_virtual_tokens=3)).eval()
    report = adaptc.report_of(gm)
    assert (report.trainable, report.total) == twin.get_nb_trainable_parameters()
    assert report.max_tokens == limit
    encoder = gm.get_submodule("adaptc.prefix_0")
    layers, _, tokens, heads, dim = encoder.shape
    theirs = twin.prompt_encoder["default"].embedding.weight.view(tokens, layers, 2, heads, dim)
    with torch.no_grad():
        encoder.prefix.copy_(theirs.permute(1, 2, 0, 3, 4)[[2 * l % layers
                                                             for l in range(layers)]])
    x = seq2seq_inputs()
    ours = gm(**x).logits
    assert close(ours, twin(**x).logits, 1e-5)
    assert (ours - model.module(**x).logits).abs().max().item() > 1e-2


@pytest.mark.parametrize("name,spec,prefixed", [
    ("bart", "encoder.layers.*.self_attn, encoder_attn: prefix tokens=3", 4),
    ("t5", "attn, EncDecAttention: prefix tokens=3", 6)])
def test_prefix_on_encoder_and_cross_attention_equals_reference(name, spec, prefixed):
    """Li & Liang's setting beyond the decoder: prefixes on the encoder's self-attention and
    the decoder's cross-attention (T5: and its self-attention), against transformers'
    attention with the same keys prepended; no positions shift (neither attention has a cache
    in transformers; T5's relative bias gives prefix key j the bias of position j - P - i)."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask
    model = model_of(name)
    gm = adaptc.compile(model, spec).eval()
    report = adaptc.report_of(gm)
    assert report.counts["prefix_inserted"] == prefixed
    assert report.max_tokens == model.module.config.max_position_embeddings if name == "bart" \
        else report.max_tokens == 4096
    reference = copy.deepcopy(model.module)
    for path, module in reference.named_modules():
        module.adaptc_path = path
    AttentionInterface.register("adaptc_prefixed", prefixed_sdpa(prefix_rows(gm), reference))
    AttentionMaskInterface.register("adaptc_prefixed", sdpa_mask)
    reference.set_attn_implementation("adaptc_prefixed")
    x = seq2seq_inputs()
    with torch.no_grad():
        want = reference(**x).logits
    ours = gm(**x).logits
    assert close(ours, want, 1e-5)
    assert (ours - model.module(**x).logits).abs().max().item() > 1e-2


# per model: all three attentions, the decoder's start id, the share of the first losses the
# last ones must fall under (the random tiny BART's tied head, std 0.02, keeps its logits
# near uniform: 4.98 → 4.48; T5's unscaled logits: 70 → 0.03)
EVERY_ATTENTION = {"bart": ("self_attn, encoder_attn", 2, 0.93),
                   "t5": ("attn, EncDecAttention", 0, 0.1)}


@pytest.mark.parametrize("name", ["bart", "t5"])
def test_prefix_on_every_attention_trains_and_serves(tmp_path, name):
    """Prefixes on all three attentions: a short run teaches the model one reply to every
    source; the infer artifact (MLP folded into constants) with the trained prefixes computes
    the train graph's logits (one compile serves both)."""
    targets, start, share = EVERY_ATTENTION[name]
    spec = f"{targets}: prefix tokens=4 projection=16"
    model_of(name).module.save_pretrained(tmp_path / "ckpt")
    gm = adaptc.compile(str(tmp_path / "ckpt"), spec)
    assert adaptc.report_of(gm).counts["prefix_inserted"] == 6
    reply = torch.randint(4, 40, (1, 6), generator=torch.Generator().manual_seed(1))
    losses = teacher_forced_losses(gm, 5e-2, lambda source: reply.expand(len(source), -1),
                                   start=start)
    assert sum(losses[-3:]) / 3 < share * sum(losses[:3]) / 3
    assert_serves(tmp_path, spec, gm)
    assert not (tmp_path / "out" / "hf").exists()  # a prefix does not merge


def test_peft_adapter_round_trip(tmp_path, compiled):
    """export_peft writes a SEQ_2_SEQ_LM adapter PEFT loads; import_peft reads it back."""
    from peft import PeftModel

    from adaptc.peft_interop import export_peft, import_peft
    model, gm = compiled("t5", "attn.q,attn.v: lora r=4 alpha=8")
    randomize_adapters(gm, 0.05)
    export_peft(gm, tmp_path / "peft", task_type="SEQ_2_SEQ_LM")
    theirs = PeftModel.from_pretrained(copy.deepcopy(model.module), tmp_path / "peft").eval()
    x = seq2seq_inputs()
    want = gm.eval()(**x).logits
    assert close(theirs(**x).logits, want)
    assert close(import_peft(model, tmp_path / "peft")(**x).logits, want)


def test_inspect_shows_the_block_whose_layer_index_is_asked():
    """T5 paths hold two integers (`encoder.block.0.layer.1`): block 1 is `encoder.block.1`."""
    text = adaptc.inspect("t5", "ffn: adapter bottleneck=4", block=1)
    assert "block encoder.block.1: original | rewritten" in text
    assert "+ encoder_block_1_layer_1_dense_relu_dense_adapter" in text


def test_inspect_shows_a_decoder_block_named_by_its_path(tmp_path, capsys):
    """A layer index reaches only the encoder's blocks; a module path reaches the decoder's."""
    from adaptc.cli import main
    spec = "ffn: adapter bottleneck=4"
    text = adaptc.inspect("t5", spec, block="decoder.block.1")
    assert "block decoder.block.1: original | rewritten" in text
    assert "+ decoder_block_1_layer_2_dense_relu_dense_adapter" in text
    assert "encoder_block" not in text.split("original | rewritten")[1]
    with pytest.raises(AdaptcError, match=r"block 'decoder\.blok\.1': no adapted module inside "
                                          r"it \(blocks with one: encoder\.block\.0, "
                                          r"encoder\.block\.1, decoder\.block\.0, "):
        adaptc.inspect("t5", spec, block="decoder.blok.1")
    (tmp_path / "s.adapt").write_text(spec + "\n")
    assert main(["inspect", str(tmp_path / "s.adapt"), "--model", "t5",
                 "--block", "decoder.block.0"]) == 0
    assert "block decoder.block.0: original | rewritten" in capsys.readouterr().out


@pytest.mark.parametrize("depths,block,shown", [
    ((2, 3), -1, "model.encoder.layers.1"), ((2, 3), -2, "model.encoder.layers.0"),
    ((3, 2), -1, "model.encoder.layers.2"), ((3, 2), 2, "model.encoder.layers.2")])
def test_inspect_counts_an_integer_block_in_the_first_stack(depths, block, shown):
    """An integer block counts the encoder's layers, as a spec's `[-1]` counts each stack on
    its own: with a deeper decoder, -1 showed the decoder's last layer (the whole model's
    depth), and 2 showed a decoder layer instead of being out of range."""
    model = wrap(small_bart(encoder_layers=depths[0], decoder_layers=depths[1]),
                 source="tiny-bart")
    text = adaptc.inspect(model, "q_proj: lora r=2", block=block)
    assert f"block {shown}: original | rewritten" in text
    assert "encoder_attn" not in text.split("original | rewritten")[1]


@pytest.mark.parametrize("block", [2, -3])
def test_inspect_block_out_of_the_first_stack_names_its_range(block):
    model = wrap(small_bart(encoder_layers=2, decoder_layers=3), source="tiny-bart")
    with pytest.raises(AdaptcError, match=rf"block {block} is out of range: tiny-bart has 2 "
                                          r"layers in model\.encoder\.layers \(0\.\.1, or -1 "
                                          r"for the last\); a block's path reaches the others "
                                          r"\(--block model\.decoder\.layers\.2\)"):
        adaptc.inspect(model, "q_proj: lora r=2", block=block)


def test_flan_t5_base_count_line_matches_peft():
    """The full-size shape on the meta device: PEFT's default q, v targets at r=8."""
    from peft import LoraConfig

    from adaptc.frontend.models import build_preset
    gm = adaptc.compile("flan-t5-base", "attn.q,attn.v: lora r=8 alpha=16")
    twin = get_peft_model(build_preset("flan-t5-base").module,
                          LoraConfig(r=8, lora_alpha=16, target_modules=["q", "v"]))
    report = adaptc.report_of(gm)
    assert (report.trainable, report.total) == twin.get_nb_trainable_parameters()
    assert report.peft_line() == ("trainable params: 884,736 || all params: 223,788,288 || "
                                  "trainable%: 0.3953")
