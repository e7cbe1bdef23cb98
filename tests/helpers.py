"""Test helpers: inputs, output selection and a tiny next-token task."""
from __future__ import annotations

import copy

import torch

import adaptc

FAMILIES = ["llama", "mistral", "gpt2", "bert"]


def inputs(vocab: int = 512, batch: int = 3, seq: int = 7, seed: int = 1,
           segments: bool = False) -> dict:
    """Token ids and a mask with one left-padded row; with `segments`, BERT's token_type_ids
    for a sentence pair (the second half is sentence B)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, seq), generator=gen)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # left padding on one row
    x = {"input_ids": ids, "attention_mask": mask}
    if segments:
        x["token_type_ids"] = (torch.arange(seq) >= seq // 2).long().expand(batch, seq)
    return x


def main_output(out) -> torch.Tensor:
    return out["logits"] if "logits" in out else out["last_hidden_state"]


def next_token_batch(vocab: int = 64, batch: int = 16, seq: int = 12, seed: int = 0) -> torch.Tensor:
    """Sequences following x[t+1] = (5·x[t] + 3) mod vocab: learnable from the previous token."""
    gen = torch.Generator().manual_seed(seed)
    start = torch.randint(0, vocab, (batch, 1), generator=gen)
    steps = [start]
    for _ in range(seq - 1):
        steps.append((steps[-1] * 5 + 3) % vocab)
    return torch.cat(steps, dim=1)


def lm_loss(gm, ids: torch.Tensor) -> torch.Tensor:
    logits = gm(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())


def save_word_tokenizer(folder, words: int = 20) -> None:
    """A word-level tokenizer ("[UNK]" = 0, "w<i>" = i + 1) saved into a checkpoint folder,
    built offline (no hub): the presets ship none."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, **{f"w{i}": i + 1 for i in range(words)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]").save_pretrained(folder)


SMALL = {  # per family: config keys beyond hidden 64, 2 layers, 4 heads, vocab 128
    "qwen3": {"intermediate_size": 128, "num_key_value_heads": 2, "head_dim": 16},
    "gemma": {"intermediate_size": 128, "num_key_value_heads": 2, "head_dim": 16},
    "phi3": {"intermediate_size": 128, "num_key_value_heads": 2},
    "gpt_neox": {"intermediate_size": 128},
    "opt": {"ffn_dim": 128, "word_embed_proj_dim": 64},
    "bloom": {},
    "falcon": {"bias": True},  # FalconLinear adds its bias after the matmul
    "phi": {"intermediate_size": 128},
    "gptj": {"rotary_dim": 8},
    "mpt": {"expansion_ratio": 2},
    "mixtral": {"intermediate_size": 96, "num_key_value_heads": 2, "num_local_experts": 4},
    "qwen2_moe": {"intermediate_size": 96, "moe_intermediate_size": 32, "num_experts": 4,
                  "shared_expert_intermediate_size": 48, "num_key_value_heads": 2},
}


def small_decoder(model_type: str):
    """A random-init causal LM of a family beyond the presets."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(model_type, hidden_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, vocab_size=128, pad_token_id=0,
                                  **SMALL[model_type])
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


ENCODERS = {  # per family: a config of hidden 64, 2 layers, 4 heads, vocab 128
    "distilbert": {"dim": 64, "hidden_dim": 128, "n_layers": 2, "n_heads": 4},
    "deberta-v2": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                   "num_attention_heads": 4},
    "modernbert": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                   "num_attention_heads": 4},
}


def small_encoder(model_type: str):
    """A random-init bare encoder of a family beyond the presets."""
    from transformers import AutoConfig, AutoModel

    config = AutoConfig.for_model(model_type, vocab_size=128, pad_token_id=0,
                                  **ENCODERS[model_type])
    torch.manual_seed(0)
    return AutoModel.from_config(config).eval()


def small_bart(**overrides):
    """A random-init BART (learned positions, fc1/fc2 FFN, cross-attention); `overrides` change
    its config (unequal stack depths, fewer positions, scale_embedding)."""
    from transformers import AutoConfig, AutoModelForSeq2SeqLM

    settings = dict(d_model=64, encoder_ffn_dim=128, decoder_ffn_dim=128, encoder_layers=2,
                    decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
                    vocab_size=128, max_position_embeddings=64)
    config = AutoConfig.for_model("bart", **settings | overrides)
    torch.manual_seed(0)
    return AutoModelForSeq2SeqLM.from_config(config).eval()


def bert_classifier(num_labels: int = 3):
    """A random-init BERT sequence classifier (sentence-pair tasks read token_type_ids)."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    config = AutoConfig.for_model("bert", hidden_size=64, intermediate_size=128,
                                  num_hidden_layers=2, num_attention_heads=4, vocab_size=128,
                                  num_labels=num_labels)
    torch.manual_seed(0)
    return AutoModelForSequenceClassification.from_config(config).eval()


def peft_twin(model, targets, r, alpha, rslora=False):
    """PEFT's LoraModel on a copy of `model` (no dropout), for parity checks."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, use_rslora=rslora,
                        fan_in_fan_out=model.config.model_type == "gpt2", lora_dropout=0.0)
    return get_peft_model(copy.deepcopy(model), config).eval()


def randomize_and_copy(gm, peft_model, seed=0):
    """Give our adapters random non-zero weights and copy them into PEFT's layers."""
    gen = torch.Generator().manual_seed(seed)
    inner = peft_model.base_model.model
    with torch.no_grad():
        for path, module in adaptc.adapters.adapter_modules(gm).items():
            site = path.rsplit(".", 1)[0]
            module.A.copy_(torch.randn(module.A.shape, generator=gen) * 0.1)
            module.B.copy_(torch.randn(module.B.shape, generator=gen) * 0.1)
            layer = inner.get_submodule(site)
            layer.lora_A["default"].weight.copy_(module.A)
            layer.lora_B["default"].weight.copy_(module.B)


def randomize_adapters(gm, std: float, seed: int = 0) -> None:
    """Random adapter weights (LoRA's B starts at zero, so initial adapters do not act)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in adaptc.adapter_state_dict(gm).values():
            param.copy_(torch.randn(param.shape, generator=gen) * std)


def perturb_adapters(gm, std: float, seed: int = 0) -> None:
    """Add random noise to every adapter tensor, keeping what its init put there."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in adaptc.adapter_state_dict(gm).values():
            param.add_(torch.randn(param.shape, generator=gen) * std)


def adapter_leaves(gm) -> dict[str, torch.Tensor]:
    """The adapter tensors as float64 leaves that record gradients (for float64 references)."""
    return {k: v.detach().double().requires_grad_()
            for k, v in adaptc.adapter_state_dict(gm).items()}


def by_site(tensors: dict, marker: str) -> dict[str, dict[str, torch.Tensor]]:
    """{site path: {tensor name under marker: tensor}} for names `<site>.<marker>.<name>`."""
    sites: dict[str, dict] = {}
    for name, t in tensors.items():
        site, _, rest = name.partition(f".{marker}.")
        sites.setdefault(site, {})[rest] = t
    return sites


def assert_grads_close(gm, params: dict[str, torch.Tensor], tol: float) -> None:
    """After one backward through both: each adapter tensor's gradient against the gradient
    of its float64 leaf in `params`, within `tol` of the largest reference gradient."""
    grads = dict(adaptc.adapter_state_dict(gm))
    worst = max(p.grad.abs().max().item() for p in params.values())
    assert worst > 0
    for name, p in params.items():
        ours = grads[name].grad
        assert ours is not None, name
        err = (ours.double() - p.grad).abs().max().item()
        assert err <= tol * worst, (name, err, worst)


def rel_diff(got, want) -> float:
    """Largest |got - want| over the float64 `want`'s largest magnitude (at least 1)."""
    return ((got.double() - want).abs().max() / want.abs().max().clamp_min(1)).item()


def probe(out: torch.Tensor) -> torch.Tensor:
    """A fixed random linear functional of the output, for one backward."""
    gen = torch.Generator().manual_seed(7)
    weights = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    return (out * weights.to(out.dtype)).sum()


def serve_checkpoint(folder, spec: str, std: float):
    """The train graph of `spec` on the checkpoint in `folder`/ckpt with random adapters
    (`randomize_adapters(…, std)`), and its infer artifact from the CLI in `folder`/out
    (`adaptc compile --mode infer --adapters`); returns (train graph, adapter file)."""
    from adaptc.cli import main

    (folder / "s.adapt").write_text(spec + "\n")
    train = adaptc.compile(str(folder / "ckpt"), spec)
    randomize_adapters(train, std)
    weights = adaptc.save_adapters(train, folder / "a.safetensors")
    assert main(["compile", str(folder / "s.adapt"), "--model", str(folder / "ckpt"),
                 "--mode", "infer", "--adapters", str(weights), "-o", str(folder / "out")]) == 0
    return train, weights


def copy_ia3_scales(gm, twin, seed: int = 0) -> None:
    """Random IA3 scales (1 + N(0, 0.3²)) in `gm`, copied into PEFT's `twin` (its `ia3_l`)."""
    gen = torch.Generator().manual_seed(seed)
    inner = twin.base_model.model
    with torch.no_grad():
        for path, ours in adaptc.adapters.adapter_modules(gm).items():
            ours.scale.copy_(1 + 0.3 * torch.randn(ours.scale.shape, generator=gen))
            theirs = inner.get_submodule(path.rsplit(".", 1)[0]).ia3_l["default"]
            assert theirs.numel() == ours.scale.numel()
            theirs.copy_(ours.scale.reshape(theirs.shape))


def assert_cached_decoding_follows(train, checkpoint, spec: str, weights) -> None:
    """Cached greedy decoding of the checkpoint with `weights` picks, after the prompt, the
    argmax of the train graph's full-sequence logits."""
    from adaptc.decode import compile_decoder

    tokens = compile_decoder(str(checkpoint), spec, adapters=weights,
                             max_cache_len=16).generate([5, 17, 42], 5)
    ids = torch.tensor([tokens])
    with torch.no_grad():
        logits = train(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0]
    assert tokens[3:] == logits[2:-1].argmax(-1).tolist()


TRITON_CASES = {  # a case of the Triton backend: the autotuned kernels it launches
    "bottleneck fused": ["_bottleneck_fused_kernel"],
    "bottleneck two launches": ["_linear_kernel"],
    "mixture per-token": ["_per_token_kernel"],
    "mixture stacked": ["_stacked_shrink_kernel", "_stacked_expand_kernel"],
    "mixture grouped k=1": ["_router_kernel", "_shrink_kernel", "_expand_kernel"],
    "mixture grouped k=2": ["_router_kernel", "_shrink_kernel", "_expand_kernel"],
    "vectors": ["_mixture_vectors_kernel"],
}


def autotuned_kernels() -> dict:
    """Every autotuned kernel of the Triton backend, by name. Imported here, not at the top:
    triton decides whether to interpret a kernel when its module is imported."""
    from triton.runtime.autotuner import Autotuner

    from adaptc.backends.triton import bottleneck, moe_lora, moe_vectors
    return {name: kernel for module in (bottleneck, moe_lora, moe_vectors)
            for name, kernel in vars(module).items() if isinstance(kernel, Autotuner)}


def triton_case_calls(case: str, dtype: torch.dtype, *, tokens: int, d: int, n: int,
                      fused_width: int, device: str) -> tuple:
    """(a call of `case`'s Triton path, a call of its reference) on seeded random inputs on
    `device`: the bottleneck maps d → n through `fused_width` (the fused kernel) or 136 (two
    launches); the mixtures read d and add into n (the per-token path: 5 tokens)."""
    from adaptc.backends.triton.bottleneck import (bottleneck_adapter_reference,
                                                   bottleneck_adapter_triton)
    from adaptc.backends.triton.moe_lora import mixture_lora_reference, mixture_lora_triton
    from adaptc.backends.triton.moe_vectors import mixture_vectors_reference, mixture_vectors_triton

    def randn(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, device=device) * scale).to(dtype)

    torch.manual_seed(0)
    experts, rank = 8, 8
    if case.startswith("bottleneck"):
        width = fused_width if case == "bottleneck fused" else 136
        args = (randn(tokens, d), randn(tokens, n), randn(width, d, scale=d**-0.5), randn(width),
                randn(n, width, scale=width**-0.5), randn(n), "gelu", randn(tokens, n))
        return lambda: bottleneck_adapter_triton(*args), lambda: bottleneck_adapter_reference(*args)
    if case == "vectors":
        args = (randn(tokens, n), randn(tokens, d), randn(experts, d, scale=d**-0.5),
                1 + randn(experts, n, scale=0.1), 2)
        return lambda: mixture_vectors_triton(*args), lambda: mixture_vectors_reference(*args)
    path, top_k = case.split()[1], 1 if case.endswith("k=1") else 2
    if path == "per-token":
        tokens = 5
    args = (randn(tokens, d), randn(tokens, n), randn(experts, d, scale=d**-0.5),
            randn(experts, rank, d, scale=d**-0.5), randn(experts, n, rank, scale=rank**-0.5),
            2.0, top_k)
    return lambda: mixture_lora_triton(*args, path=path), lambda: mixture_lora_reference(*args)
