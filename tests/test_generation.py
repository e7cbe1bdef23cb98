"""Generation: transformers' cached `generate` cannot drive a compiled graph (see
adaptc/generation.py); cache-free greedy decoding through the graph produces the same tokens
as PEFT's `generate` with its KV cache, for prefix tuning and prompt tuning."""
from __future__ import annotations

import pytest
import torch
import transformers
from packaging.version import Version
from test_prefix import copy_from_peft as copy_prefix
from test_prefix import peft_prefix
from test_prompt import copy_from_peft as copy_prompt
from test_prompt import peft_twin

import adaptc


def prompt_ids():
    ids = torch.randint(0, 512, (2, 6), generator=torch.Generator().manual_seed(0))
    return ids, torch.ones_like(ids)


def uncached_greedy(model, ids: torch.Tensor, steps: int) -> torch.Tensor:
    """Greedy decoding by full forward passes (no cache), the last position each step."""
    with torch.no_grad():
        for _ in range(steps):
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
            ids = torch.cat([ids, logits[:, -1:].argmax(-1)], dim=1)
    return ids


@pytest.mark.parametrize("method", ["prefix", "prompt"])
def test_greedy_equals_peft_generate_with_cache(tiny, method):
    """Our tokens are PEFT's model's greedy tokens, and those of PEFT's cached `generate`
    before transformers 5.24: with 5.24 (PEFT 0.21.2) `generate` loses the virtual tokens
    after the first step (prefix: from the start, giving the base model's tokens)."""
    model = tiny("llama")
    if method == "prefix":
        gm = adaptc.compile(model, "attn: prefix tokens=3")
        twin = peft_prefix(model.module, 3)
        copy_prefix(gm.get_submodule("adaptc.prefix_0"), twin)
    else:
        gm = adaptc.compile(model, "embed: prompt tokens=3")
        twin = peft_twin(model.module, "prompt", 3)
        copy_prompt(gm.get_submodule("model.embed_tokens.prompt"), twin)
    ids, mask = prompt_ids()
    ours = adaptc.greedy_generate(gm, ids, mask, 6)
    assert torch.equal(ours, uncached_greedy(twin, ids, 6))
    base = model.module.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6,
                                 do_sample=False)
    assert not torch.equal(ours[:, 6:], base[:, 6:])  # the virtual tokens change the output
    if Version(transformers.__version__) < Version("5.24"):
        theirs = twin.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6,
                               do_sample=False)
        assert torch.equal(ours[:, 6:], theirs[:, -6:])


def test_a_cached_decoding_step_is_refused_by_the_graph(tiny):
    gm = adaptc.compile(tiny("llama"), "attn: prefix tokens=2")
    assert not hasattr(gm, "generate")
    ids, _ = prompt_ids()
    with pytest.raises(ValueError, match=r"input 'attention_mask' has shape \(2, 7\) and "
                                         r"input 'input_ids' \(2, 1\)"):
        gm(input_ids=ids[:, -1:], attention_mask=torch.ones(2, 7, dtype=torch.long))


def test_greedy_stops_rows_at_eos(tiny):
    gm = adaptc.compile(tiny("llama"), "embed: prompt tokens=2")
    ids, mask = prompt_ids()
    first = adaptc.greedy_generate(gm, ids, mask, 1)[:, -1]
    out = adaptc.greedy_generate(gm, ids, mask, 4, eos_token_id=int(first[0]))
    assert (out[0, 6:] == first[0]).all()


def test_greedy_refuses_what_would_fail_late_or_never_stop(tiny):
    """A sequence past the compiled module's bound is refused before the first step (it failed
    when the sequence reached the bound); an end id outside the vocabulary is refused, since
    no argmax produces it."""
    gm = adaptc.compile(tiny("llama"), "embed: prompt tokens=2")
    ids, mask = prompt_ids()
    limit = adaptc.report_of(gm).max_tokens
    with pytest.raises(ValueError, match=f"would reach {limit + 1} tokens; the compiled module "
                                         f"takes at most {limit}"):
        adaptc.greedy_generate(gm, ids, mask, limit + 1 - ids.shape[1])
    with pytest.raises(ValueError, match=r"eos_token_id -1 is outside the model's vocabulary "
                                         r"\(0\.\.511\)"):
        adaptc.greedy_generate(gm, ids, mask, 2, eos_token_id=-1)
    with pytest.raises(ValueError, match="decoder_start_token_id is for an encoder-decoder; "
                                         "this compiled module is decoder-only"):
        adaptc.greedy_generate(gm, ids, mask, 2, decoder_start_token_id=0)


def test_greedy_refuses_a_prompt_without_its_batch_dimension(tiny):
    """A 1-D prompt failed with a bare IndexError while the length bound was checked."""
    gm = adaptc.compile(tiny("llama"), "q_proj: lora r=2")
    ids = torch.tensor([5, 17, 42])
    with pytest.raises(ValueError, match=r"input_ids must be a 2-D tensor \[batch, sequence\], "
                                         r"got \(3,\) \(a single prompt is input_ids\[None\]\)"):
        adaptc.greedy_generate(gm, ids, torch.ones_like(ids), 2)
    out = adaptc.greedy_generate(gm, ids[None], torch.ones_like(ids)[None], 2)
    assert out[0, :3].tolist() == [5, 17, 42] and out.shape == (1, 5)


def test_left_padded_rows_over_a_position_table_give_generate_tokens(tiny):
    """GPT-2's positions index a learned table: a left-padded row read its tokens at the
    positions after its padding, and gave other tokens than PEFT's `generate` (which counts
    a row's positions from its first real token) and than the row alone. Rows that stop at
    the end id continue with it, as `generate` pads them with pad_token_id = that id."""
    from helpers import peft_twin, randomize_and_copy

    model = tiny("gpt2")
    gm = adaptc.compile(model, "c_attn: lora r=4 alpha=8").eval()
    twin = peft_twin(model.module, ["c_attn"], 4, 8)
    randomize_and_copy(gm, twin)
    rows = [[5, 17, 42, 7, 99], [9, 8], [3, 4, 5]]
    ids = torch.tensor([[0] * (5 - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (5 - len(r)) + [1] * len(r) for r in rows])
    theirs = twin.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6,
                           do_sample=False, eos_token_id=None, pad_token_id=0)
    ours = adaptc.greedy_generate(gm, ids, mask, 6)
    assert torch.equal(ours, theirs)
    for i, row in enumerate(rows):
        alone = adaptc.greedy_generate(gm, torch.tensor([row]),
                                       torch.ones(1, len(row), dtype=torch.long), 6)
        assert ours[i, 5 - len(row):].tolist() == alone[0].tolist()
    eos = int(ours[1, 5])  # row 1's first new token
    theirs = twin.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6,
                           do_sample=False, eos_token_id=eos, pad_token_id=eos)
    assert torch.equal(adaptc.greedy_generate(gm, ids, mask, 6, eos), theirs)
    # several end ids (a chat checkpoint's generation_config): each row stops at the first of
    # them it produces and continues with the first listed, as generate pads it
    ends = [int(ours[0, 6]), int(ours[2, 7])]
    theirs = twin.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6,
                           do_sample=False, eos_token_id=ends, pad_token_id=ends[0])
    assert torch.equal(adaptc.greedy_generate(gm, ids, mask, 6, ends), theirs)
    unpadded = torch.tensor([rows[0], [3, 4, 5, 6, 7]])  # the batched path, not row by row
    theirs = twin.generate(input_ids=unpadded, attention_mask=torch.ones_like(unpadded),
                           max_new_tokens=6, do_sample=False, eos_token_id=ends,
                           pad_token_id=ends[0])
    assert torch.equal(adaptc.greedy_generate(gm, unpadded, torch.ones_like(unpadded), 6, ends),
                       theirs)


def test_greedy_checks_the_prompt_ids_on_any_device(tiny, monkeypatch):
    """The compiled module's forward checks token ids on CPU tensors only (on a GPU that
    check would synchronise every call; the embedding's device assert reported them and
    poisoned the process). greedy_generate checks the prompt itself, once per call with one
    min/max reduction whatever the device: here with the forward's check switched off, as
    it is for a GPU tensor, the error is the forward's own, before any step runs."""
    from adaptc.frontend.trace import INPUT_CHECK
    from adaptc.generation import check_vocabulary

    gm = adaptc.compile(tiny("llama"), "q_proj: lora r=2")
    monkeypatch.setattr(gm.meta[INPUT_CHECK], "check_vocabulary", lambda kwargs: None)
    ids, mask = prompt_ids()
    for bad in (512, -1):
        ids[1, 3] = bad
        with pytest.raises(ValueError, match=rf"input 'input_ids' holds token id {bad}, "
                                             r"outside the model's vocabulary \(0\.\.511\)"):
            adaptc.greedy_generate(gm, ids, mask, 2)
    mask[0, :2] = 0  # a left-padded row: GPT-2-like models decode row by row; checked too
    with pytest.raises(ValueError, match="token id -1, outside"):
        adaptc.greedy_generate(gm, ids, mask, 2)
    check_vocabulary(torch.tensor([[0, 511]]), 512)  # no device condition in the check


def test_greedy_checks_an_encoder_decoders_source_and_start_token(tiny):
    gm = adaptc.compile(tiny("t5"), "attn.q: lora r=2")
    ids, mask = prompt_ids()
    ids[0, 0] = 9999
    with pytest.raises(ValueError, match="input 'input_ids' holds token id 9999"):
        adaptc.greedy_generate(gm, ids, mask, 2, decoder_start_token_id=0)
    with pytest.raises(ValueError, match=r"decoder_start_token_id 512 is outside the model's "
                                         r"vocabulary \(0\.\.511\)"):
        adaptc.greedy_generate(gm, prompt_ids()[0], mask, 2, decoder_start_token_id=512)
