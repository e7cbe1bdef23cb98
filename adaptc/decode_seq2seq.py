"""Greedy generation of an encoder-decoder (T5, BART) through infer-mode graphs: the encoder
and the decoder's cross-attention keys and values, run once per source, and the decoder
step over a static self-attention cache, run once per token.

Both graphs hold the whole model at `model` (so spec targets and adapter files resolve as
in the causal decoder, adaptc.decode) and each is compiled with the assignments whose modules
it calls: encoder sites in one, decoder and LM-head sites in the other, from one adapter file.
Virtual tokens (prompt tuning, P-tuning) go before the encoder's input; as in cached causal
decoding the encoder pads nothing: it is given n placeholder ids and their positions, the
prompt module writes the virtual tokens over them, and the decoder cross-attends to all
n + S encoder states, as the full model does. The decoder's self-attention keys and values
live in transformers' StaticCache (buffers written at `cache_position`). Exported with a
DynamicCache that it sees empty, the decoder graph computes the cross-attention keys and
values from the encoder states at every call; `hoist_invariant` moves that (and anything
else reading only the encoder states) into a third graph run once per source, whose outputs
the step graph takes as inputs. Prefixes (prefix tuning, P-tuning v2) are rewritten into
the attentions each graph calls, from one tensor per statement that both graphs hold; in
the decoder they sit before the cache's keys, its positions shift by P (BART) and T5's
relative bias for the prefix columns follows `cache_position`. Gated methods (UniPELT) on
decoder sites are refused: a gate averages over the whole decoder sequence.
"""
from __future__ import annotations

import copy
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from torch.export import Dim

from adaptc.adapters import ENCODERS
from adaptc.compiler import as_model, prepare, run_pipeline
from adaptc.decode import (MAX_CACHE_LEN, PREFIX, allocate_cache, check_cache_positions,
                           check_token_ids, stop_ids, warn_past_trained_positions)
from adaptc.errors import AdaptcError, ModelError, WeightsError
from adaptc.frontend.models import LoadedModel
from adaptc.frontend.trace import export, is_encoder_decoder, sequence_limit
from adaptc.passes.base import CompileContext
from adaptc.passes.bind_ops import shortcut_modules
from adaptc.passes.graph import reads_position_table
from adaptc.passes.hoist_invariant import hoist_invariant
from adaptc.passes.insert_prefix import PREFIX_METHODS
from adaptc.passes.insert_prompt import PROMPT_METHODS

POSITIONS = "positions"  # the encoder graph's input of token positions (for virtual tokens)


class SourceEncoder(nn.Module):
    """The encoder's last hidden states for `input_ids`; `positions` is read only by a prompt
    module the compiler inserts (the model ignores it)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model, self.config = model, model.config

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.model.get_encoder()(input_ids=input_ids).last_hidden_state


class CachedDecoder(nn.Module):
    """Logits of `decoder_input_ids` at `cache_position`, cross-attending to
    `encoder_hidden_states`; self-attention keys and values in a static cache (buffers)."""

    def __init__(self, model: nn.Module, max_cache_len: int):
        from transformers import DynamicCache, EncoderDecoderCache, StaticCache
        from transformers.integrations.executorch import get_head_shapes

        super().__init__()
        self.model, self.config = model, model.config
        self.static = StaticCache(config=model.config, max_cache_len=max_cache_len)
        weight = next(model.parameters())
        self.static.early_initialization(1, *get_head_shapes(model.config), weight.dtype,
                                         weight.device)
        self.cache = EncoderDecoderCache(self.static, DynamicCache(config=model.config))
        for i, layer in enumerate(self.static.layers):
            self.register_buffer(f"key_cache_{i}", layer.keys, persistent=False)
            self.register_buffer(f"value_cache_{i}", layer.values, persistent=False)
            self.register_buffer(f"cumulative_length_{i}", layer.cumulative_length,
                                 persistent=False)

    def forward(self, decoder_input_ids: torch.Tensor, encoder_hidden_states: torch.Tensor,
                cache_position: torch.Tensor) -> torch.Tensor:
        for layer in self.static.layers:  # the cache holds the tokens before this call's
            layer.cumulative_length.copy_(cache_position[0])
        return self.model(encoder_outputs=(encoder_hidden_states,),
                          decoder_input_ids=decoder_input_ids, past_key_values=self.cache,
                          use_cache=True, cache_position=cache_position).logits


class Seq2SeqDecoder:
    """Greedy decoding (batch 1) of an encoder-decoder over its compiled graphs: the encoder;
    `cross`, what the decoder computes from the encoder states alone (cross-attention keys
    and values, hoisted out of the decoding loop: `hoisted` nodes); and the decoder step.

    Token ids are checked against the vocabulary, and lengths against the source's position
    limit and the cache, before anything runs; inputs are made on the graphs' device."""

    def __init__(self, encoder: nn.Module, cross: nn.Module, decoder: nn.Module,
                 max_cache_len: int, max_source_len: int, vocab_size: int, start: int,
                 virtual: int = 0, hoisted: int = 0):
        self.encoder, self.cross, self.decoder, self.hoisted = encoder, cross, decoder, hoisted
        self.max_cache_len, self.max_source_len = max_cache_len, max_source_len
        self.vocab_size, self.start = vocab_size, start
        self.virtual = virtual
        self.device = next(decoder.parameters()).device

    @torch.no_grad()
    def encode(self, source: list[int]) -> tuple[torch.Tensor, ...]:
        """What decoding `source` reads: the encoder states [1, n + S, d] of `source` behind
        the n virtual tokens, then the values hoisted from them (`cross`)."""
        check_token_ids(source, self.vocab_size)
        if len(source) > self.max_source_len:
            taken = f" left by {self.virtual} virtual tokens" if self.virtual else ""
            raise AdaptcError(f"a {len(source)}-token source exceeds the encoder's "
                              f"{self.max_source_len} positions{taken}")
        ids = torch.tensor([[0] * self.virtual + source], device=self.device)
        states = self.encoder(input_ids=ids,
                              positions=torch.arange(ids.shape[1], device=self.device))
        return states, *self.cross(states)

    @torch.no_grad()
    def generate(self, source: list[int], max_new_tokens: int,
                 eos_token_id: int | Sequence[int] | None = None) -> list[int]:
        """The reply to `source`: up to `max_new_tokens` greedily chosen ids after the decoder
        start token, ending after `eos_token_id` (an id or a list of them) when one is given."""
        if isinstance(source, str) or not all(isinstance(t, int) for t in source):
            raise TypeError(f"source must be a list of token ids (ints), got {source!r:.60}")
        if max_new_tokens < 0:
            raise AdaptcError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        stops = stop_ids(eos_token_id, self.vocab_size)
        if max_new_tokens > self.max_cache_len:
            raise AdaptcError(f"{max_new_tokens} new tokens exceed the decoder's cache "
                              f"({self.max_cache_len}); compile it with a larger max_cache_len")
        memory = self.encode(source)
        reply, last = [], self.start
        for position in range(max_new_tokens):
            last = int(self.logits(memory, [last], position)[-1].argmax())
            reply.append(last)
            if last in stops:
                break
        return reply

    @torch.no_grad()
    def logits(self, memory: tuple[torch.Tensor, ...], ids: list[int],
               start: int) -> torch.Tensor:
        """Run decoder tokens `ids` at positions start.. over a source's `memory` (`encode`);
        their logits [len(ids), vocab]. The cache keeps what calls before wrote at positions
        < start."""
        if start + len(ids) > self.max_cache_len:
            raise AdaptcError(f"decoder position {start + len(ids) - 1} is past the cache "
                              f"({self.max_cache_len}); compile with a larger max_cache_len")
        check_token_ids(ids, self.vocab_size)
        positions = torch.arange(start, start + len(ids), device=self.device)
        return self.decoder(torch.tensor([ids], device=self.device), memory[0], positions,
                            *memory[1:])[0][0]


def compile_seq2seq_decoder(model, spec, *, adapters: str | Path | None = None,
                            max_cache_len: int = MAX_CACHE_LEN, merge: bool = True,
                            fuse_projections: bool = False,
                            torch_compile: bool = False) -> Seq2SeqDecoder:
    """The infer-mode graphs of `spec` on an encoder-decoder, exported for cached decoding
    (`merge`, `fuse_projections` and `torch_compile` as in `adaptc.compile_decoder`)."""
    if not isinstance(max_cache_len, int):
        raise TypeError(f"max_cache_len must be an int, got {max_cache_len!r}")
    if max_cache_len < 2:  # the decoder is traced with two steps, and export needs min < max
        raise AdaptcError(f"max_cache_len must be at least 2, got {max_cache_len}")
    loaded = as_model(model, None)
    if loaded.on_meta:
        raise ModelError(f"model '{loaded.source}' is on the meta device; decoding needs weights")
    if not is_encoder_decoder(loaded):
        raise ModelError(f"{type(loaded.module).__name__} is not an encoder-decoder; decode a "
                         "causal language model with adaptc.compile_decoder")
    warn_past_trained_positions(max_cache_len, loaded)  # a rotary decoder's (T5: relative)
    device = next(loaded.module.parameters()).device
    limit = sequence_limit(loaded)
    ids = torch.tensor([[1, 2, 3]], device=device)
    encoder = LoadedModel(SourceEncoder(copy.copy(loaded.module)),
                          {"input_ids": ids, POSITIONS: torch.arange(3, device=device)},
                          loaded.source, loaded.family)
    encoder_ctx = prepare(encoder, spec, "infer", inside=PREFIX)
    virtual = sum(a.rule.config.tokens for a in encoder_ctx.assignments
                  if a.method in PROMPT_METHODS)
    source = Dim("source", min=1, max=limit)
    encoder_graph = compile_half(encoder, encoder_ctx, encoder_shapes(source),
                                 adapters, merge, fuse_projections, prompts=True)
    with torch.no_grad():
        states = encoder.module(**encoder.example_inputs)
    cached = allocate_cache(lambda: CachedDecoder(copy.copy(loaded.module), max_cache_len),
                            max_cache_len)
    decoder = LoadedModel(cached,
                          {"decoder_input_ids": ids[:, :2], "encoder_hidden_states": states,
                           "cache_position": torch.arange(2, device=device)},
                          loaded.source, loaded.family)
    steps = Dim("steps", min=1, max=max_cache_len)
    decoder_ctx = prepare(decoder, spec, "infer", inside=PREFIX)
    decoder_graph = compile_half(decoder, decoder_ctx, decoder_shapes(source, steps),
                                 adapters, merge, fuse_projections, prompts=False,
                                 cache_len=max_cache_len)
    if adapters is not None:
        check_all_loaded(adapters, encoder_ctx, decoder_ctx)
    cross, step, hoisted = hoist_invariant(decoder_graph, "encoder_hidden_states",
                                           ("decoder_input_ids", "cache_position"))
    for graph in (cross, step):  # new GraphModules, new containers: bind_ops' shortcuts again
        shortcut_modules(graph)
    graphs = encoder_graph, cross, step
    if torch_compile:
        graphs = tuple(torch.compile(graph, dynamic=True) for graph in graphs)
    config = loaded.module.config
    return Seq2SeqDecoder(*graphs, max_cache_len, limit - virtual, config.vocab_size,
                          config.decoder_start_token_id, virtual, hoisted)


def encoder_shapes(source: Dim) -> dict:
    """The encoder graph's dynamic dims (traced here, saved by decoding_program)."""
    return {"input_ids": {1: source}, POSITIONS: {0: source}}


def decoder_shapes(source: Dim, steps: Dim) -> dict:
    """The decoder graph's dynamic dims, those of its inputs before hoisting."""
    return {"decoder_input_ids": {1: steps}, "encoder_hidden_states": {1: source},
            "cache_position": {0: steps}}


def compile_half(model: LoadedModel, ctx, shapes: dict, adapters, merge: bool,
                 fuse_projections: bool, prompts: bool, cache_len: int = 0) -> nn.Module:
    """One of the two graphs: exported, given the assignments whose modules it calls (virtual
    tokens only in the encoder's), run through the infer pipeline. The decoder's, given its
    `cache_len`, is refused when its positions index a learned table (BART's
    `decoder.embed_positions`) with fewer rows than the cache and a prefix take."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # one per mutated cache buffer
        graph = export(model, shapes)
    called = {path for node in graph.graph.nodes
              for path, _ in node.meta.get("nn_module_stack", {}).values()}
    gated = sorted({a.method for a in ctx.assignments
                    if a.site.path in called and getattr(a.rule.config, "gate", False)})
    if gated and not prompts:
        raise AdaptcError(f"cached decoding cannot run gated {', '.join(gated)} (UniPELT) in "
                          "the decoder: a gate averages over the whole decoder sequence, so "
                          "every token's output depends on the tokens after it; use "
                          "adaptc.greedy_generate, which reruns the whole sequence each step")
    ctx.assignments = [a for a in ctx.assignments if (
        prompts if a.method in PROMPT_METHODS
        else a.method in PREFIX_METHODS or a.site.path in called)]  # a statement's prefixes
    # are one tensor over all its layers, held by both graphs (insert_prefix, ctx.partial)
    ctx.adapters, ctx.adapter_prefix, ctx.partial = adapters, PREFIX, True
    ctx.merge, ctx.fuse_projections = merge, fuse_projections
    ctx.positions_input = POSITIONS if prompts else "cache_position"
    table = reads_position_table(graph)
    graph = run_pipeline(graph, ctx)
    if cache_len and table:
        check_cache_positions(cache_len, sequence_limit(model), ctx.table_positions)
    return graph


def check_all_loaded(path: str | Path, *contexts: CompileContext) -> None:
    """Each graph loaded the file's tensors it has; raise if the file holds others (adapters
    of a spec other than the one compiled)."""
    loaded = {name for ctx in contexts for name in ctx.loaded_adapters}
    with safe_open(str(path), "pt") as handle:
        names = {k if k.startswith(f"{ENCODERS}.") else PREFIX + k for k in handle.keys()}
    extra = sorted(names - loaded)
    if extra:
        raise WeightsError(f"{path}: adapter tensors do not match the compiled graphs "
                           f"({len(extra)} unexpected; unexpected "
                           f"{extra[0].removeprefix(PREFIX)})")
