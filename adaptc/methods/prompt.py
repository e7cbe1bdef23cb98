"""Prompt tuning (Lester et al. 2021, arXiv:2104.08691) and P-tuning (Liu et al. 2021,
arXiv:2103.10385): n trainable virtual tokens before the input embeddings.

    E = word_embeddings(ids)                              [B, S, D]
    E' = [T ; E]                                          [B, n + S, D], T: [n, D]
    the attention mask gets n leading ones, positions run 0 … n+S-1, and the model's
    sequence outputs (logits, hidden states) are returned for the S real tokens only.

Where T comes from:
    prompt:  T is a free tensor, initialised N(0, 1) (`init=random`), from the embeddings of
             n random vocabulary tokens (`init=vocab`), or from the embeddings of given token
             ids (`init=[ids]`, repeated cyclically to n, like PEFT's text init).
    ptuning: T = head(encoder(E_v)) with E_v [n, D] (P-tuning v1's prompt encoder):
             mlp:  T = W₃·relu(W₂·relu(W₁·E_v + b₁) + b₂) + b₃, widths D → h → h → D;
             lstm: T = W₂·relu(W₁·BiLSTM₂(E_v) + b₁) + b₂, a 2-layer bidirectional LSTM of
                   width h, then 2h → 2h → D.
             `fold()` replaces the encoder with its output (a free tensor).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from adaptc.methods.options import option

INITS = ("random", "vocab")


@dataclass(frozen=True)
class PromptConfig:
    method: ClassVar[str] = "prompt"
    adapts: ClassVar[tuple[str, ...]] = ("embedding",)

    tokens: int = option(8, "virtual tokens n prepended to the input embeddings", low=1)
    init: str | list[int] = option("random", "random: N(0, 1); vocab: embeddings of random "
                                   "vocabulary tokens; [ids]: embeddings of these token ids, "
                                   "repeated to n", low=0, choices=INITS,
                                   training=True)

    def check(self) -> list[tuple[str, str]]:
        if isinstance(self.init, list) and not self.init:
            return [("init", "init needs at least one token id")]
        return []


@dataclass(frozen=True)
class PtuningConfig:
    method: ClassVar[str] = "ptuning"
    adapts: ClassVar[tuple[str, ...]] = ("embedding",)

    tokens: int = option(8, "virtual tokens n prepended to the input embeddings", low=1)
    encoder: str = option("mlp", "prompt encoder: mlp (3 layers) or lstm (2-layer "
                          "bidirectional LSTM and a 2-layer MLP head)", choices=("mlp", "lstm"))
    hidden: int = option(0, "hidden width h of the prompt encoder; 0: the embedding width",
                         low=0)

    def check(self) -> list[tuple[str, str]]:
        return []


class PromptEmbedding(nn.Module):
    """Free virtual-token embeddings T [n, D] written over the first n rows of the (padded)
    input embeddings: forward(E [B, n+S, D]) → [T ; E[:, n:]] (by position when decoding with
    a cache: `write_prompts`)."""

    def __init__(self, config: PromptConfig, word_embeddings: torch.Tensor,
                 generator: torch.Generator | None = None):
        super().__init__()
        self.config = config
        self.embedding = nn.Parameter(initial_prompts(config, word_embeddings, generator))

    def prompts(self) -> torch.Tensor:
        return self.embedding

    def forward(self, embeds: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        return write_prompts(self.prompts(), embeds, positions)

    def adapter_parameters(self) -> dict[str, nn.Parameter]:
        return {"embedding": self.embedding}


def vectors(encoder: nn.Module) -> tuple[str, ...]:
    """The 1-D tensors of a prompt or prefix encoder (its biases): LoRA+ gives them ratio × lr,
    as PEFT's `create_loraplus_optimizer` gives every 1-D tensor, and no weight decay."""
    return tuple(name for name, p in encoder.named_parameters() if p.ndim == 1)


class PromptEncoder(nn.Module):
    """P-tuning's prompt encoder: T = head(encoder(E_v)), E_v [n, D]; forward as
    `PromptEmbedding`. Parameters follow PEFT's PromptEncoder (`embedding` [n, D], then
    `lstm` and `head`, or `head` alone for mlp)."""

    def __init__(self, config: PtuningConfig, dim: int, device: torch.device | None = None,
                 dtype: torch.dtype | None = None):
        super().__init__()
        self.config = config
        factory = {"device": device, "dtype": dtype}
        hidden = config.hidden or dim
        self.embedding = nn.Parameter(torch.randn(config.tokens, dim, **factory))
        if config.encoder == "lstm":
            self.lstm = nn.LSTM(dim, hidden, num_layers=2, bidirectional=True, batch_first=True,
                                **factory)
            self.head = nn.Sequential(nn.Linear(2 * hidden, 2 * hidden, **factory), nn.ReLU(),
                                      nn.Linear(2 * hidden, dim, **factory))
        else:
            self.head = nn.Sequential(nn.Linear(dim, hidden, **factory), nn.ReLU(),
                                      nn.Linear(hidden, hidden, **factory), nn.ReLU(),
                                      nn.Linear(hidden, dim, **factory))

    def prompts(self) -> torch.Tensor:
        tokens = self.embedding.unsqueeze(0)
        if self.config.encoder == "lstm":
            tokens = self.lstm(tokens)[0]
        return self.head(tokens)[0]

    def forward(self, embeds: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        return write_prompts(self.prompts(), embeds, positions)

    def adapter_parameters(self) -> dict[str, nn.Parameter]:
        return dict(self.named_parameters())

    fast_parameters = undecayed_parameters = property(vectors)  # the LSTM's and head's biases

    def fold(self) -> PromptEmbedding:
        """The same virtual tokens as a free tensor: no encoder (for inference and export)."""
        folded = PromptEmbedding(PromptConfig(tokens=self.config.tokens), self.embedding)
        folded.embedding = nn.Parameter(self.prompts().detach().clone(), requires_grad=False)
        return folded


def write_prompts(prompts: torch.Tensor, embeds: torch.Tensor,
                  positions: torch.Tensor | None = None) -> torch.Tensor:
    """[T ; E[:, n:]]: the first n rows (embeddings of the padding ids) become the prompts.

    With `positions` [S] (cached decoding: the absolute position of each row), row j becomes
    T[positions[j]] where positions[j] < n and stays E[:, j] elsewhere, so a prefill call
    writes the virtual tokens and the calls after it, at positions ≥ n, write none."""
    tokens = prompts.shape[0]
    if positions is not None:
        rows = prompts.to(embeds.dtype)[positions.clamp(max=tokens - 1)]
        return torch.where((positions < tokens).unsqueeze(-1), rows, embeds)
    batch = prompts.to(embeds.dtype).unsqueeze(0).expand(embeds.shape[0], -1, -1)
    return torch.cat([batch, embeds[:, tokens:]], dim=1)


def initial_prompts(config: PromptConfig, word_embeddings: torch.Tensor,
                    generator: torch.Generator | None = None) -> torch.Tensor:
    """[n, D] initial virtual tokens, in the embeddings' dtype and device."""
    vocab, dim = word_embeddings.shape
    like = {"device": word_embeddings.device, "dtype": word_embeddings.dtype}
    if word_embeddings.is_meta:
        return torch.empty(config.tokens, dim, **like)
    if config.init == "random":
        return torch.randn(config.tokens, dim, generator=generator).to(**like)
    if config.init == "vocab":
        ids = torch.randint(0, vocab, (config.tokens,), generator=generator)
    else:
        ids = torch.tensor(config.init * (-(-config.tokens // len(config.init))))[:config.tokens]
    return word_embeddings.detach()[ids.to(word_embeddings.device)].clone()
