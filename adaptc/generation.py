"""Text generation with a compiled module, and why transformers' `generate` with a KV cache
does not run on one.

A compiled module is a torch.fx GraphModule traced from the model's forward with
`use_cache=False`. transformers' `generate` cannot drive it, for three reasons:

1. It is not a `PreTrainedModel`: there is no `generate`, `generation_config` or
   `prepare_inputs_for_generation` on it.
2. The graph has no cache: no `past_key_values` input or output exists in it, and each
   attention op reads the keys and values of the current call only, so there is nothing to
   carry from one decoding step to the next.
3. A cached decoding step feeds 1 new token with a mask over all past tokens; the traced
   graph requires the mask and the token ids to have the same length (the compiled module
   refuses such a call with a ValueError naming both shapes).

What works on such a module is decoding without a cache: run the whole sequence each step
(`adaptc.decode.compile_decoder` traces a separate graph with a static cache instead).
Prefixes and virtual tokens are part of the graph, so every call re-applies them:
`greedy_generate` produces the greedy tokens of PEFT's model for prefix tuning and prompt
tuning, which are those of PEFT's `generate` with its KV cache before transformers 5.24
(with 5.24 and PEFT 0.21.2 that `generate` loses the virtual tokens;
tests/test_generation.py), at O(S²) cost instead of O(S). In a left-padded batch
`generate` gives each row positions counted from its first real token, the traced forward
counts from the first column (as the model's forward does without `position_ids`): the same
scores under rotary positions, which depend on distances only, but not with a learned
position table (GPT-2's `wpe`), so there each padded row is decoded alone (`by_row`).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.fx import GraphModule

from adaptc.compiler import REPORT
from adaptc.decode import end_ids
from adaptc.frontend.trace import INPUT_CHECK
from adaptc.passes.graph import reads_position_table


@torch.no_grad()
def greedy_generate(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    max_new_tokens: int, eos_token_id: int | Sequence[int] | None = None,
                    decoder_start_token_id: int | None = None) -> torch.Tensor:
    """Append up to `max_new_tokens` argmax tokens to `input_ids` [B, S] (no KV cache: the
    full sequence runs every step). `eos_token_id` is an id or a list of them (as a
    generation_config gives it); rows that produced one continue with the first, as
    transformers' `generate` pads them when the pad id is unset.

    For an encoder-decoder (T5, BART), pass `decoder_start_token_id` (its config's): the
    source stays as given, and the decoder's tokens are returned, [B, 1 + new], starting
    with that id, as transformers' `generate` returns them."""
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    check_batch(input_ids)
    seq2seq = decoder_start_token_id is not None
    check_kind(model, seq2seq)
    vocab = vocab_size(model)
    if vocab is not None:
        check_vocabulary(input_ids, vocab)
        if seq2seq and not 0 <= decoder_start_token_id < vocab:
            raise ValueError(f"decoder_start_token_id {decoder_start_token_id} is outside the "
                             f"model's vocabulary (0..{vocab - 1})")
    check_length(model, (1 if seq2seq else input_ids.shape[1]) + max_new_tokens)
    if not seq2seq and shifts_positions(model, attention_mask):
        return by_row(model, input_ids, attention_mask, max_new_tokens, eos_token_id)
    ids = end_ids(eos_token_id)
    ends = torch.tensor(ids, dtype=input_ids.dtype, device=input_ids.device)
    tokens = (torch.full((input_ids.shape[0], 1), decoder_start_token_id, dtype=input_ids.dtype,
                         device=input_ids.device) if seq2seq else input_ids)
    done = torch.zeros(input_ids.shape[0], 1, dtype=torch.bool, device=input_ids.device)
    for _ in range(max_new_tokens):
        if seq2seq:
            logits = model(input_ids=input_ids, attention_mask=attention_mask,
                           decoder_input_ids=tokens).logits
        else:
            logits = model(input_ids=tokens, attention_mask=attention_mask).logits
        outside = [t for t in ids if not 0 <= t < logits.shape[-1]]
        if outside:
            raise ValueError(f"eos_token_id {outside[0]} is outside the model's vocabulary "
                             f"(0..{logits.shape[-1] - 1}), so generation would never stop at it")
        token = logits[:, -1].argmax(-1, keepdim=True)
        if ids:
            token = torch.where(done, ends[0], token)
            done |= torch.isin(token, ends)
        tokens = torch.cat([tokens, token], dim=1)
        if not seq2seq:
            attention_mask = torch.cat([attention_mask, torch.ones_like(token)], dim=1)
        if ids and done.all():
            break
    return tokens


def shifts_positions(model: nn.Module, attention_mask: torch.Tensor) -> bool:
    """Whether a row's padding moves its tokens to other rows of a learned position table
    (a compiled module's graph that reads one, and a left-padded mask: 0s, then 1s)."""
    graph = getattr(model, "_orig_mod", model)
    left = attention_mask.bool()
    return (isinstance(graph, GraphModule) and not bool(left[:, 0].all())
            and bool((left[:, 1:] >= left[:, :-1]).all()) and reads_position_table(graph))


def by_row(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
           max_new_tokens: int, eos_token_id: int | Sequence[int] | None) -> torch.Tensor:
    """greedy_generate of each row without its padding, put back behind it: the tokens
    `generate` gives a left-padded row (the batch's padded positions would read other rows
    of the position table). Rows that stop early continue with the first end id."""
    rows = []
    for i, (ids, mask) in enumerate(zip(input_ids, attention_mask)):
        if not mask.any():
            raise ValueError(f"row {i} of attention_mask is all padding: no token to continue")
        real = ids[mask.bool()][None]
        out = greedy_generate(model, real, torch.ones_like(real), max_new_tokens, eos_token_id)
        rows.append(torch.cat([ids[~mask.bool()], out[0]]))
    width = max(len(row) for row in rows)
    fill = (end_ids(eos_token_id) or [0])[0]  # only rows ended by an end id are short
    return torch.stack([torch.cat([row, row.new_full((width - len(row),), fill)])
                        for row in rows])


def check_batch(input_ids: torch.Tensor) -> None:
    """The sequence length is read from `input_ids` before the module sees it: a single row
    without its batch dimension failed there with a bare IndexError."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        shape = (tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor)
                 else f"a {type(input_ids).__name__}")
        raise ValueError(f"input_ids must be a 2-D tensor [batch, sequence], got {shape} "
                         "(a single prompt is input_ids[None])")


def vocab_size(model: nn.Module) -> int | None:
    """The vocabulary a compiled module (or its torch.compile wrapper) checks its token ids
    against, else the model's config's; None when neither says."""
    graph = getattr(model, "_orig_mod", model)
    check = graph.meta.get(INPUT_CHECK) if isinstance(graph, GraphModule) else None
    size = (check.vocab_size if check is not None
            else getattr(getattr(model, "config", None), "vocab_size", None))
    return size if isinstance(size, int) else None


def check_vocabulary(ids: torch.Tensor, vocab_size: int) -> None:
    """Token ids outside the vocabulary are the compiled module's ValueError, on any device.
    Its forward checks CPU tensors only: on a GPU a check there would synchronise every call
    (and could not run inside a CUDA graph's capture), and the embedding's device-side
    assert reported the id, leaving the process's CUDA context unusable. A generation call
    checks its prompt once, before the first step: one min/max reduction and one sync."""
    if ids.numel() == 0:
        return
    low, high = torch.stack(torch.aminmax(ids)).tolist()
    if low < 0 or high >= vocab_size:
        raise ValueError(f"input 'input_ids' holds token id {low if low < 0 else high}, outside "
                         f"the model's vocabulary (0..{vocab_size - 1})")


def check_kind(model: nn.Module, seq2seq: bool) -> None:
    """A compiled encoder-decoder takes `decoder_input_ids`, a decoder-only one does not: the
    wrong call failed inside the first step with an input error that named neither
    `decoder_start_token_id` nor what to pass."""
    check = getattr(model, "meta", {}).get(INPUT_CHECK) if isinstance(model, GraphModule) else None
    if check is None or seq2seq == ("decoder_input_ids" in check.expected):
        return
    if seq2seq:
        raise ValueError("decoder_start_token_id is for an encoder-decoder; this compiled "
                         "module is decoder-only (it takes no decoder_input_ids)")
    raise ValueError("the compiled module is an encoder-decoder (it takes decoder_input_ids): "
                     "pass decoder_start_token_id, its config's "
                     "(model.config.decoder_start_token_id)")


def check_length(model: nn.Module, length: int) -> None:
    """A compiled module's sequence bound (`report_of(module).max_tokens`), checked before the
    first step: past it the call would fail only when the sequence reaches it, all the steps
    before it wasted."""
    report = getattr(model, "meta", {}).get(REPORT) if isinstance(model, GraphModule) else None
    limit = report.max_tokens if report is not None else None
    if limit is not None and length > limit:
        raise ValueError(f"generation would reach {length} tokens; the compiled module takes at "
                         f"most {limit} (fewer max_new_tokens, or a shorter prompt)")
