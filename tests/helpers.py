"""Test helpers: inputs, output selection and a tiny next-token task."""
from __future__ import annotations

import torch

FAMILIES = ["llama", "mistral", "gpt2", "bert"]


def inputs(vocab: int = 512, batch: int = 3, seq: int = 7, seed: int = 1) -> dict:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, seq), generator=gen)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # left padding on one row
    return {"input_ids": ids, "attention_mask": mask}


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
