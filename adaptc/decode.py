"""Token-by-token generation with a KV cache through an infer-mode graph.

The causal LM is wrapped in transformers' static-cache module made for torch.export (the
cache is a set of buffers updated in place at `cache_position`), exported with a dynamic
sequence length (so a prompt is prefilled in one call and each new token costs one call),
and run through the same infer pipeline as `compile(..., mode="infer")`: LoRA merged,
bottleneck adapters and mixtures as fused ops, prefixes at each layer's attention, virtual
tokens in the first cache slots (written by `cache_position`: insert_prompt). Inside the
wrapper the model sits at `model`, so adapter files saved from train mode are loaded with
that prefix.
"""
from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

import torch
from torch import nn
from torch.export import Dim

from adaptc.compiler import as_model, prepare, run_pipeline
from adaptc.errors import AdaptcError, AdaptcWarning, ModelError, first_line
from adaptc.frontend.models import LoadedModel
from adaptc.frontend.trace import export, is_encoder_decoder, sequence_limit
from adaptc.passes.base import out_of_memory
from adaptc.passes.graph import reads_position_table
from adaptc.passes.insert_prompt import PROMPT_METHODS

PREFIX = "model."
POSITIONS = "cache_position"  # the static-cache module's input of absolute positions
MAX_CACHE_LEN = 128  # the default cache length in tokens (also of encoder-decoders' decoders)
Built = TypeVar("Built")


class Decoder:
    """Greedy decoding (batch 1) over an exported graph with a static KV cache.

    Token ids are checked against the vocabulary here, since an id past it would otherwise
    surface as an IndexError from inside the embedding; inputs are made on the device the
    graph's weights live on. With `virtual` > 0 (prompt tuning, P-tuning) the cache starts
    with that many virtual tokens: a call at position 0 puts placeholder ids in front, which
    the graph replaces by the virtual tokens, and positions here count real tokens only.
    """

    def __init__(self, graph: nn.Module, max_cache_len: int, vocab_size: int,
                 virtual: int = 0):
        self.graph, self.max_cache_len, self.vocab_size = graph, max_cache_len, vocab_size
        self.virtual = virtual
        self.device = next(graph.parameters()).device
        self.step: StepGraph | None = None  # one-token steps replayed (capture_step)

    def capture_step(self) -> None:
        """Replay every later one-token step from a CUDA graph (`StepGraph`); prompts still
        run the graph itself. Its warm-up calls write cache slot 0, so it belongs before
        generation (a prompt's prefill rewrites the slot), as compile_decoder calls it."""
        if self.device.type != "cuda":
            raise AdaptcError(f"a CUDA graph needs the decoder on a CUDA device; its weights "
                              f"are on {self.device}")
        if hasattr(self.graph, "_orig_mod"):
            raise AdaptcError("torch_compile and cuda_graph do not combine: Inductor with "
                              "CUDA graphs is torch.compile(mode='reduce-overhead')")
        self.step = StepGraph(self.graph, self.device)

    @torch.no_grad()
    def logits(self, ids: list[int], start: int) -> torch.Tensor:
        """Run tokens `ids` at positions start.. and return their logits [len(ids), vocab]."""
        if self.virtual + start + len(ids) > self.max_cache_len:
            raise AdaptcError(f"sequence of {self.virtual + start + len(ids)} tokens"
                              f"{self.virtual_note()} exceeds the cache ({self.max_cache_len}); "
                              "compile the decoder with a larger max_cache_len")
        check_token_ids(ids, self.vocab_size)
        lead = self.virtual if start == 0 else 0
        first = start + self.virtual - lead
        if self.step is not None and len(ids) == 1 and not lead:
            return self.step(ids[0], first)
        positions = torch.arange(first, first + lead + len(ids), device=self.device)
        out = self.graph(input_ids=torch.tensor([[0] * lead + ids], device=self.device),
                         cache_position=positions)[0]
        return out[lead:]

    def virtual_note(self) -> str:
        return f" (with {self.virtual} virtual tokens)" if self.virtual else ""

    def generate(self, prompt: list[int], max_new_tokens: int,
                 eos_token_id: int | Sequence[int] | None = None) -> list[int]:
        """Prompt followed by up to `max_new_tokens` greedily chosen token ids; generation
        stops after `eos_token_id` (an id or a list of them) when one is given."""
        if isinstance(prompt, str) or not all(isinstance(t, int) for t in prompt):
            raise TypeError(f"prompt must be a list of token ids (ints), got {prompt!r:.60}")
        if not prompt:
            raise AdaptcError(EMPTY_PROMPT)
        if max_new_tokens < 0:
            raise AdaptcError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        stops = stop_ids(eos_token_id, self.vocab_size)
        if self.virtual + len(prompt) + max_new_tokens > self.max_cache_len:
            raise AdaptcError(f"a {len(prompt)}-token prompt and {max_new_tokens} new tokens"
                              f"{self.virtual_note()} exceed the cache ({self.max_cache_len}); "
                              "compile the decoder with a larger max_cache_len")
        tokens = list(prompt)
        scores = self.logits(tokens, 0)
        for _ in range(max_new_tokens):
            tokens.append(int(scores[-1].argmax()))
            if len(tokens) == len(prompt) + max_new_tokens or tokens[-1] in stops:
                break
            scores = self.logits(tokens[-1:], len(tokens) - 1)
        return tokens


EMPTY_PROMPT = "generation needs a prompt of at least one token"


def stop_ids(eos_token_id: int | Sequence[int] | None, vocab_size: int) -> frozenset[int]:
    """The ids generation stops after: none, one, or several, as a chat checkpoint's
    generation_config lists them (Llama 3 Instruct: end of text and end of turn, [128001,
    128009]). An id no argmax can produce (-1, or past the vocabulary) would never stop
    generation: it is refused rather than silently run every step."""
    ids = end_ids(eos_token_id)
    for token in ids:
        if not 0 <= token < vocab_size:
            raise AdaptcError(f"eos_token_id {token} is outside the model's vocabulary "
                              f"(0..{vocab_size - 1}), so generation would never stop at it")
    return frozenset(ids)


def end_ids(eos_token_id: int | Sequence[int] | None) -> list[int]:
    """`eos_token_id` as a list of ints (a generation_config gives one id or a list)."""
    if eos_token_id is None:
        return []
    ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    if not ids or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
        raise TypeError(f"eos_token_id takes a token id or a list of them, got {eos_token_id!r}")
    return ids


class StepGraph:
    """The decoder graph's one-token step, captured once as a CUDA graph, replayed per token.

    A step is a few thousand small kernels: launched one at a time from Python, the GPU waits
    on the host (benchmarks/host_overhead.py). A CUDA graph records the launches once and
    replays them with one call. The replay reads its token and position from two device
    tensors this object owns (filled before each replay) and writes the logits into memory
    of the graph's private pool, copied out on return; the KV cache buffers are the graph
    module's own, updated in place as by an ordinary call. Two calls on a side stream before
    the capture compile and autotune the Triton kernels (autotuning synchronises, which a
    capture must not); they write a placeholder token into cache slot 0, which the prompt's
    prefill overwrites.
    """

    @torch.no_grad()
    def __init__(self, graph: nn.Module, device: torch.device):
        self.ids = torch.zeros(1, 1, dtype=torch.long, device=device)
        self.position = torch.zeros(1, dtype=torch.long, device=device)
        inputs = {"input_ids": self.ids, POSITIONS: self.position}
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(2):
                graph(**inputs)
        torch.cuda.current_stream(device).wait_stream(side)
        self.replay = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.replay):
            self.logits = graph(**inputs)[0]

    def __call__(self, token: int, position: int) -> torch.Tensor:
        """Logits [1, vocab] of `token` at cache position `position`."""
        self.ids.fill_(token)
        self.position.fill_(position)
        self.replay.replay()
        return self.logits.clone()


def check_token_ids(ids: list[int], vocab_size: int) -> None:
    """An id past the vocabulary would surface as an IndexError inside the embedding."""
    if not ids:
        raise AdaptcError(EMPTY_PROMPT)
    bad = [t for t in ids if not 0 <= t < vocab_size]
    if bad:
        raise AdaptcError(f"token id {bad[0]} is outside the model's vocabulary "
                          f"(0..{vocab_size - 1})")


def compile_decoder(model, spec, *, adapters: str | Path | None = None,
                    max_cache_len: int = MAX_CACHE_LEN, merge: bool = True,
                    fuse_projections: bool = False, torch_compile: bool = False,
                    cuda_graph: bool = False) -> Decoder:
    """The infer-mode graph of `spec` on a causal LM, exported for cached decoding
    (`merge` and `fuse_projections` as in `adaptc.compile`).

    `torch_compile=True` runs the graph through `torch.compile` (dynamic shapes: the
    prefill and the one-token steps compile once each, on their first call). Decoding one
    token is many small ops, which Inductor fuses: the same tokens, faster after the first
    calls (benchmarks/decode.py --torch-compile). `cuda_graph=True` (on CUDA) replays each
    one-token step from a CUDA graph instead (`StepGraph`, benchmarks/decode.py --cuda-graph).
    """
    if not isinstance(max_cache_len, int):
        raise TypeError(f"max_cache_len must be an int, got {max_cache_len!r}")
    if max_cache_len < 2:
        raise AdaptcError(f"max_cache_len must be at least 2, got {max_cache_len}")
    loaded = as_model(model, None)
    warn_past_trained_positions(max_cache_len, loaded)
    device = next(loaded.module.parameters()).device
    wrapped = LoadedModel(static_cache_module(loaded, max_cache_len), example_step(device),
                          loaded.source, loaded.family)
    ctx = prepare(wrapped, spec, "infer", inside=PREFIX)
    refuse_gated(ctx.assignments)
    ctx.adapters, ctx.adapter_prefix, ctx.merge = adapters, PREFIX, merge
    ctx.fuse_projections, ctx.positions_input = fuse_projections, POSITIONS
    virtual = sum(a.rule.config.tokens for a in ctx.assignments
                  if a.method in PROMPT_METHODS)
    check_room(max_cache_len, virtual)
    graph = export_cached(wrapped, type(loaded.module).__name__, max_cache_len)
    table = reads_position_table(graph)
    graph = run_pipeline(graph, ctx)
    if table:
        check_cache_positions(max_cache_len, sequence_limit(loaded), ctx.table_positions)
    if torch_compile:
        graph = torch.compile(graph, dynamic=True)
    decoder = Decoder(graph, max_cache_len, loaded.module.config.vocab_size, virtual)
    if cuda_graph:
        decoder.capture_step()
    return decoder


def export_cached(wrapped: LoadedModel, name: str, max_cache_len: int) -> nn.Module:
    """The static-cache wrapper exported. Some models' forward cannot run over a static
    cache under torch.export (OPT's positions read the mask's values, MPT's attention bias
    has a fixed length): the export error named transformers' wrapper class and advised
    `make_fx`, not what still decodes the model."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # one per mutated cache buffer
            return export(wrapped, step_shapes(max_cache_len))
    except ModelError as err:
        raise ModelError(f"cached decoding cannot export {name} over a static KV cache "
                         f"({err}); adaptc.greedy_generate decodes a compiled module without "
                         "a cache") from err


def check_room(max_cache_len: int, virtual: int) -> None:
    """Virtual tokens fill the first cache slots: a cache without two more (a prompt token
    and a new one) could decode nothing, and `compile --decoder` failed only after exporting
    it, in its check, on a prompt the user never gave."""
    if max_cache_len < virtual + 2:
        raise AdaptcError(f"max_cache_len={max_cache_len} leaves no room for a prompt and a "
                          f"new token after the {virtual} virtual tokens in the first cache "
                          f"slots; use max_cache_len >= {virtual + 2}")


def check_cache_positions(max_cache_len: int, limit: int, prefix: int) -> None:
    """A model whose positions index a learned table (GPT-2's `wpe`) has `limit` of them, a
    prefix taking the first `prefix`: a longer cache would fill its later slots through an
    IndexError inside the embedding, mid-generation. (Rotary models have no table.)"""
    if max_cache_len + prefix > limit:
        taken = f" ({prefix} of them taken by the prefix)" if prefix else ""
        raise AdaptcError(f"max_cache_len={max_cache_len} exceeds the model's {limit} "
                          f"positions{taken}: its learned position table has no row past "
                          f"them; use max_cache_len <= {limit - prefix}")


def warn_past_trained_positions(max_cache_len: int, model: LoadedModel) -> None:
    """A rotary model computes every position's rotation, so a cache past its
    `max_position_embeddings` decodes (a learned table cannot: check_cache_positions), but the
    model was not trained there: an AdaptcWarning naming both numbers, not an error."""
    config = getattr(model.module, "config", None)
    trained = getattr(config, "max_position_embeddings", None)
    rotary = any(getattr(config, key, None) for key in ("rope_parameters", "rope_theta",
                                                          "rope_scaling"))
    if rotary and isinstance(trained, int) and max_cache_len > trained:
        warnings.warn(f"max_cache_len={max_cache_len} exceeds the model's "
                      f"max_position_embeddings={trained}: rotary positions extend past it, "
                      "but the model was not trained on them and may decode worse there",
                      AdaptcWarning, stacklevel=3)


def allocate_cache(build: Callable[[], Built], max_cache_len: int) -> Built:
    """`build()`, which allocates a static KV cache of `max_cache_len` slots: a cache beyond
    the device's memory, or beyond torch's int64 sizes, is an AdaptcError naming
    max_cache_len (it was the allocator's traceback from inside transformers' StaticCache)."""
    try:
        return build()
    except (RuntimeError, MemoryError, TypeError) as err:
        if not (out_of_memory(err) or "overflow" in str(err).lower()):
            raise
        raise AdaptcError(f"max_cache_len={max_cache_len}: cannot allocate the KV cache "
                          f"({first_line(err)}); use a smaller max_cache_len") from None


def example_step(device) -> dict:
    """Inputs the decoder graph is traced (and saved, decoding_program) with: two tokens."""
    return {"input_ids": torch.zeros(1, 2, dtype=torch.long, device=device),
            POSITIONS: torch.arange(2, device=device)}


def step_shapes(max_cache_len: int) -> dict:
    """The decoder graph's dynamic dims: a prompt's prefill and one-token steps."""
    steps = Dim("steps", min=1, max=max_cache_len)
    return {"input_ids": {1: steps}, POSITIONS: {0: steps}}


def refuse_gated(assignments) -> None:
    """A causal LM's cached decoder cannot run a gated (UniPELT) site."""
    gated = sorted({a.method for a in assignments if getattr(a.rule.config, "gate", False)})
    if gated:
        raise AdaptcError(f"cached decoding cannot run gated {', '.join(gated)} (UniPELT): a "
                          "gate averages over the whole sequence, so every token's output "
                          "depends on the tokens after it; use adaptc.greedy_generate, which "
                          "reruns the whole sequence each step")


def check_causal_lm(model: LoadedModel) -> None:
    """A model without a language-model head (BERT's encoder) has no next token to pick."""
    if not hasattr(model.module, "generate"):
        raise ModelError(f"{type(model.module).__name__} is not a causal language model; "
                         "decoding needs one")


def static_cache_module(model: LoadedModel, max_cache_len: int) -> nn.Module:
    """transformers' export wrapper around a shallow copy (the user's model is not changed)."""
    from transformers import GenerationConfig
    from transformers.integrations.executorch import TorchExportableModuleWithStaticCache

    if model.on_meta:
        raise ModelError(f"model '{model.source}' is on the meta device; decoding needs weights")
    if is_encoder_decoder(model):
        raise ModelError(f"{type(model.module).__name__} is an encoder-decoder; "
                         "compile_decoder is for causal language models: decode it with "
                         "adaptc.decode_seq2seq.compile_seq2seq_decoder")
    check_causal_lm(model)
    root = copy.copy(model.module)
    root.generation_config = GenerationConfig(
        use_cache=True, cache_implementation="static",
        cache_config={"batch_size": 1, "max_cache_len": max_cache_len})
    wrapper = allocate_cache(lambda: TorchExportableModuleWithStaticCache(
        root, batch_size=1, max_cache_len=max_cache_len), max_cache_len)
    wrapper.config = root.config  # passes read the model's config (insert_prefix: GQA's kv heads)
    return wrapper
