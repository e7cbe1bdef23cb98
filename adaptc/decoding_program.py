"""Cached-decoding programs saved in an infer artifact and loaded without the spec, the
model or the compiler: what `adaptc compile --mode infer -o DIR --decoder` adds as
DIR/decoding/.

    decoder.pt2     causal LM: one call per prompt or token over the static KV cache
                    (input_ids, cache_position), as compile_decoder's graph
    encoder.pt2     encoder-decoder: the encoder (input_ids, positions), once per source;
    cross.pt2       what the decoder reads from the encoder states alone (hoist_invariant);
    decoder.pt2     the decoder step (decoder_input_ids, states, cache_position, *cross)
    decoding.json   kind, limits, vocabulary size, virtual tokens, the decoder start token,
                    and the check: greedy tokens and logits of the saved programs against
                    the compiled decoder's on a random prompt
    tokenizer files and generation_config.json (the end ids `adaptc generate --text` stops
                    at) copied from the model's checkpoint directory, when it has them

`load_decoding(DIR)` gives back the Decoder or Seq2SeqDecoder that compile_decoder or
compile_seq2seq_decoder returned, over the loaded programs (`adaptc generate DIR`). The
programs run on the device they were compiled for.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from torch.export import Dim

from adaptc.artifact import copy_tokenizer
from adaptc.decode import Decoder, example_step, step_shapes
from adaptc.decode_seq2seq import POSITIONS as SOURCE_POSITIONS
from adaptc.decode_seq2seq import Seq2SeqDecoder, decoder_shapes, encoder_shapes
from adaptc.errors import AdaptcError, ArtifactError, first_line
from adaptc.export import load_program, save_program
from adaptc.frontend.trace import export_dynamic
from adaptc.passes.bind_ops import bind_ops

DECODING_DIR, DESCRIPTION = "decoding", "decoding.json"
GENERATION_CONFIG = "generation_config.json"
FORMAT = 1
CHECK_PROMPT, CHECK_NEW_TOKENS = 5, 8


def save_decoding(decoder: Decoder | Seq2SeqDecoder, folder: Path,
                  tokenizer_source: str | Path | None = None) -> dict:
    """Export `decoder`'s graphs into the new directory `folder` (inside an artifact's staging
    directory), load them back and check them against `decoder`; returns decoding.json."""
    programs = (export_causal(decoder) if isinstance(decoder, Decoder)
                else export_seq2seq(decoder))
    folder.mkdir()
    for name, program in programs.items():
        save_program(program, folder / f"{name}.pt2")
    description = {"format": FORMAT, **limits(decoder)}
    (folder / DESCRIPTION).write_text(json.dumps(description, indent=2) + "\n")
    description["check"] = check(load_decoding(folder), decoder)
    (folder / DESCRIPTION).write_text(json.dumps(description, indent=2) + "\n")
    if tokenizer_source:
        copy_tokenizer(tokenizer_source, folder)
        if (Path(tokenizer_source) / GENERATION_CONFIG).is_file():
            shutil.copy2(Path(tokenizer_source) / GENERATION_CONFIG, folder / GENERATION_CONFIG)
    return description


def limits(decoder: Decoder | Seq2SeqDecoder) -> dict:
    """What a loaded decoder needs besides its programs."""
    if isinstance(decoder, Decoder):
        return {"kind": "causal", "max_cache_len": decoder.max_cache_len,
                "vocab_size": decoder.vocab_size, "virtual_tokens": decoder.virtual}
    return {"kind": "encoder-decoder", "max_cache_len": decoder.max_cache_len,
            "max_source_len": decoder.max_source_len, "vocab_size": decoder.vocab_size,
            "decoder_start_token_id": decoder.start, "virtual_tokens": decoder.virtual,
            "hoisted": decoder.hoisted}


def export_causal(decoder: Decoder) -> dict[str, torch.export.ExportedProgram]:
    """The decoder graph with its traced inputs and dynamic dims (adaptc.decode)."""
    return {"decoder": export_graph(decoder.graph, example_step(decoder.device),
                                    step_shapes(decoder.max_cache_len), "decoder")}


def export_seq2seq(decoder: Seq2SeqDecoder) -> dict[str, torch.export.ExportedProgram]:
    """The three graphs, the source length dynamic in all of them (in the hoisted tensors:
    the dims whose size follows the source's) and the decoder's steps in the last."""
    device = decoder.device
    source = Dim("source", min=1, max=decoder.max_source_len + decoder.virtual)
    steps = Dim("steps", min=1, max=decoder.max_cache_len)
    n = min(3, decoder.max_source_len)
    memory, longer = decoder.encode([1] * n), decoder.encode([1] * (n + 1))
    states, hoisted = memory[0], memory[1:]
    moving = [{d: source for d in range(a.dim()) if a.shape[d] != b.shape[d]}
              for a, b in zip(hoisted, longer[1:])]
    ids = torch.ones(1, states.shape[1], dtype=torch.long, device=device)
    names = [node.target for node in graph_of(decoder.decoder).graph.nodes
             if node.op == "placeholder"]
    step_inputs = dict(zip(names, (torch.ones(1, 2, dtype=torch.long, device=device), states,
                                   torch.arange(2, device=device), *hoisted)))
    # the step graph's placeholders: decoder_shapes' three inputs, then the hoisted tensors
    step_dims = {**decoder_shapes(source, steps), **dict(zip(names[3:], moving))}
    encoder_inputs = {"input_ids": ids,
                      SOURCE_POSITIONS: torch.arange(ids.shape[1], device=device)}
    return {
        "encoder": export_graph(decoder.encoder, encoder_inputs, encoder_shapes(source),
                                "encoder"),
        "cross": export_graph(decoder.cross, {names[1]: states}, {names[1]: {1: source}},
                              "cross", positional=True),
        "decoder": export_graph(decoder.decoder, step_inputs, step_dims, "decoder",
                                positional=True)}


def bound(graph: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A loaded program's module with its ops bound as the compiler binds them (bind_ops):
    the saved programs hold aten ops, which cost more host time per decoding step."""
    bind_ops(graph)
    return graph


def graph_of(module: torch.nn.Module) -> torch.nn.Module:
    """The graph under a torch.compile wrapper (export traces the graph itself)."""
    return getattr(module, "_orig_mod", module)


def export_graph(graph: torch.nn.Module, inputs: dict, shapes: dict, name: str,
                 positional: bool = False) -> torch.export.ExportedProgram:
    try:
        with torch.no_grad():
            return export_dynamic(graph_of(graph), inputs, shapes, positional)
    except Exception as err:  # torch.export raises many types; all mean "cannot export"
        raise ArtifactError(f"cannot export the {name} graph to {name}.pt2 with dynamic "
                            f"lengths: {first_line(err)}") from err


def load_decoding(path: str | Path, torch_compile: bool = False,
                  cuda_graph: bool = False) -> Decoder | Seq2SeqDecoder:
    """The decoder saved in `path`: an artifact directory holding decoding/, or decoding/
    (`torch_compile` and, for a causal LM, `cuda_graph` as in compile_decoder)."""
    folder = Path(path)
    if (folder / DECODING_DIR / DESCRIPTION).is_file():
        folder = folder / DECODING_DIR
    if not (folder / DESCRIPTION).is_file():
        raise ArtifactError(f"{path}: no cached-decoding programs ({DECODING_DIR}/{DESCRIPTION}); "
                            "write them with `adaptc compile --mode infer -o DIR --decoder`")
    try:
        about = json.loads((folder / DESCRIPTION).read_text())
        if not isinstance(about, dict):
            raise ValueError(f"a JSON {type(about).__name__}, not an object")
        kind = about["kind"]
        if about.get("format") != FORMAT:
            raise ValueError(f"format {about.get('format')!r}, this adaptc reads {FORMAT}")
        if kind not in ("causal", "encoder-decoder"):
            raise ValueError(f"unknown kind {kind!r}")
        check_sizes(about, kind)
        names = ("decoder",) if kind == "causal" else ("encoder", "cross", "decoder")
        graphs = [bound(load_program(folder / f"{name}.pt2").module()) for name in names]
        if torch_compile:
            graphs = [torch.compile(graph, dynamic=True) for graph in graphs]
        if kind == "causal":
            decoder = Decoder(*graphs, about["max_cache_len"], about["vocab_size"],
                              about["virtual_tokens"])
            if cuda_graph:
                decoder.capture_step()
            return decoder
        if cuda_graph:
            raise AdaptcError("cuda_graph is for causal LM decoders; this one is "
                              "encoder-decoder")
        return Seq2SeqDecoder(*graphs, about["max_cache_len"], about["max_source_len"],
                              about["vocab_size"], about["decoder_start_token_id"],
                              about["virtual_tokens"], about["hoisted"])
    except (KeyError, TypeError, ValueError) as err:
        raise ArtifactError(f"{folder / DESCRIPTION}: not a decoding description "
                            f"({first_line(err)})") from None


def check_sizes(about: dict, kind: str) -> None:
    """The description's sizes and ids are non-negative integers; a hand-edited one
    ("max_cache_len": "x", "virtual_tokens": -5) was a TypeError or IndexError traceback from
    inside the decoder."""
    keys = ["max_cache_len", "vocab_size", "virtual_tokens"]
    if kind != "causal":
        keys.append("max_source_len")
    for key in keys:
        value = about[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{key} is {json.dumps(value)}, not an integer >= 0")


def check(saved: Decoder | Seq2SeqDecoder, compiled: Decoder | Seq2SeqDecoder) -> dict:
    """Greedy tokens of both on a random prompt, and the max absolute difference of the
    logits they give the prompt and the tokens (one prefill call, teacher-forced)."""
    gen = torch.Generator().manual_seed(0)
    if isinstance(compiled, Decoder):
        room = compiled.max_cache_len - compiled.virtual
        length = max(1, min(CHECK_PROMPT, room - 1))
        new = max(0, min(CHECK_NEW_TOKENS, room - length))
    else:
        length = min(CHECK_PROMPT, compiled.max_source_len)
        new = min(CHECK_NEW_TOKENS, compiled.max_cache_len)
    prompt = torch.randint(0, compiled.vocab_size, (length,), generator=gen).tolist()
    ours, theirs = saved.generate(prompt, new), compiled.generate(prompt, new)
    if isinstance(compiled, Decoder):
        error = (saved.logits(theirs, 0) - compiled.logits(theirs, 0)).abs().max()
    else:
        steps = [compiled.start, *theirs[:-1]]
        error = (saved.logits(saved.encode(prompt), steps, 0)
                 - compiled.logits(compiled.encode(prompt), steps, 0)).abs().max()
    return {"prompt": prompt, "tokens": theirs, "same_tokens": ours == theirs,
            "max_abs_logit_error": error.item()}
