"""Prefix tuning (Li & Liang 2021, arXiv:2101.00190) and P-tuning v2 (Liu et al. 2022,
arXiv:2110.07602): trainable keys and values prepended to the attention of every adapted layer.

For layer l with P virtual tokens, H_kv key/value heads of width d:

    K'_l = [P_K,l ; K_l],  V'_l = [P_V,l ; V_l]       P_K,l, P_V,l: [P, H_kv, d], unrotated
    attention(Q_l, K'_l, V'_l, mask') with mask' = [1…1 (P) ; mask]: every real token sees
    every prefix slot; padding and causal masking among real tokens stay as they were.

Real tokens take positions P … P+S-1, as they do when the prefix is handed to a Hugging Face
model as a P-token KV cache (PEFT's PrefixTuning, Li & Liang's GPT-2 code).

With `gate` (UniPELT), P_K,l and P_V,l are multiplied by G_P,l(x_l) ∈ (0, 1), a per-example
gate read from the attention block's input x_l (`methods.gate`).

Where the prefix comes from:
    prefix:   projection=0 — a free tensor [L, 2, P, H_kv, d];
              projection=h — Li & Liang's reparameterisation, shared over layers:
              MLP(E) = W₂·tanh(W₁·E + b₁) + b₂ with E [P, H_kv·d], W₁ [h, H_kv·d],
              W₂ [L·2·H_kv·d, h]; `fold()` replaces it with its output (a free tensor).
    ptuning2: always a free tensor (no reparameterisation: P-tuning v2 found it unnecessary
              for NLU), with optional dropout on the prefix while training as in its code.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import ClassVar

import torch
from torch import nn

from adaptc.methods.gate import Gate, gate_bias
from adaptc.methods.options import option
from adaptc.methods.prompt import vectors


@dataclass(frozen=True)
class PrefixConfig:
    method: ClassVar[str] = "prefix"
    adapts: ClassVar[tuple[str, ...]] = ("attention",)

    tokens: int = option(16, "virtual tokens P prepended to every adapted layer's keys and values",
                         low=1)
    projection: int = option(0, "0: the prefix is a free tensor; h > 0: it is the output of a "
                             "shared MLP of hidden width h while training (Li & Liang's "
                             "reparameterisation, PEFT prefix_projection)", low=0)
    gate: bool = option(False, "UniPELT: scale each layer's prefix by a learned per-example "
                        "gate in (0, 1) read from the attention's input")
    dropout: ClassVar[float] = 0.0

    def check(self) -> list[tuple[str, str]]:
        return []


@dataclass(frozen=True)
class Ptuning2Config:
    method: ClassVar[str] = "ptuning2"
    adapts: ClassVar[tuple[str, ...]] = ("attention",)

    tokens: int = option(16, "virtual tokens P prepended to every adapted layer's keys and values",
                         low=1)
    dropout: float = option(0.0, "dropout on the prefix while training (P-tuning v2)", low=0,
                            high=1, high_open=True, training=True)
    projection: ClassVar[int] = 0
    gate: ClassVar[bool] = False

    def check(self) -> list[tuple[str, str]]:
        return []


class PrefixEncoder(nn.Module):
    """The key/value prefixes of every layer one prefix statement adapts, computed once per
    forward pass and read by each layer's `PrefixAttention`.

    forward() → [L, 2, P, H_kv, d] (index 0 keys, 1 values). Parameters: `prefix`
    [L, 2, P, H_kv, d] ~ N(0, 1) without projection; with projection h, `embedding`
    [P, H_kv·d] ~ N(0, 1) and the MLP `hidden_weight` [h, H_kv·d], `hidden_bias` [h],
    `out_weight` [L·2·H_kv·d, h], `out_bias` [L·2·H_kv·d] (PEFT's PrefixEncoder layout).
    """

    def __init__(self, config: PrefixConfig | Ptuning2Config, layers: int, kv_heads: int,
                 head_dim: int, device: torch.device | None = None,
                 dtype: torch.dtype | None = None):
        super().__init__()
        self.config = config
        self.shape = (layers, 2, config.tokens, kv_heads, head_dim)
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        factory = {"device": device, "dtype": dtype}
        width, hidden = kv_heads * head_dim, config.projection
        if hidden:
            self.embedding = nn.Parameter(torch.empty(config.tokens, width, **factory))
            self.hidden_weight = nn.Parameter(torch.empty(hidden, width, **factory))
            self.hidden_bias = nn.Parameter(torch.empty(hidden, **factory))
            self.out_weight = nn.Parameter(torch.empty(layers * 2 * width, hidden, **factory))
            self.out_bias = nn.Parameter(torch.empty(layers * 2 * width, **factory))
        else:
            self.prefix = nn.Parameter(torch.empty(self.shape, **factory))
        if (device is None or torch.device(device).type != "meta"):
            self.reset_parameters()

    def reset_parameters(self) -> None:
        """N(0, 1) prefixes or embeddings, nn.Linear's default init for the MLP (as PEFT)."""
        if self.config.projection:
            nn.init.normal_(self.embedding)
            for weight, bias in ((self.hidden_weight, self.hidden_bias),
                                 (self.out_weight, self.out_bias)):
                linear = nn.Linear(weight.shape[1], weight.shape[0], device=weight.device,
                                   dtype=weight.dtype)
                weight.data.copy_(linear.weight)
                bias.data.copy_(linear.bias)
        else:
            nn.init.normal_(self.prefix)

    def forward(self) -> torch.Tensor:
        if not self.config.projection:
            return self.dropout(self.prefix)
        hidden = torch.tanh(nn.functional.linear(self.embedding, self.hidden_weight,
                                                 self.hidden_bias))
        flat = nn.functional.linear(hidden, self.out_weight, self.out_bias)  # [P, L·2·H_kv·d]
        layers, _, tokens, heads, dim = self.shape
        return self.dropout(flat.view(tokens, layers, 2, heads, dim).permute(1, 2, 0, 3, 4))

    def adapter_parameters(self) -> dict[str, nn.Parameter]:
        return dict(self.named_parameters())

    fast_parameters = undecayed_parameters = property(vectors)  # the MLP's biases

    def fold(self) -> PrefixEncoder:
        """The same prefixes as a free tensor: no MLP (for inference and export)."""
        plain = PrefixEncoder(replace(self.config, projection=0) if self.config.projection
                              else self.config, *self.shape[:1], *self.shape[3:],
                              device=torch.device("meta"))
        plain.prefix = nn.Parameter(self().detach().clone(memory_format=torch.contiguous_format),
                                    requires_grad=False)
        plain.dropout = nn.Identity()
        return plain


class PrefixAttention(nn.Module):
    """One layer's rewrite of `scaled_dot_product_attention(q, k, v, mask)`: prepend the
    layer's prefix to k and v and open the mask for it.

    key, value [B, H, S_k, d] (after RoPE and GQA's repeat_kv); prefix [2, P, H_kv, d] is
    repeated to H heads (head h reads kv head h // (H / H_kv)) and batch B. mask is bool
    (True = attend) or additive float, broadcastable to [B, H, S_q, S_k], or None; the result
    is [.., S_q, P + S_k] with the prefix columns open. An op with is_causal and no mask gets
    the explicit causal mask (the pass turns is_causal off). With a gate, `hidden` [B, S, F] is
    the attention block's input and both prefixes are scaled by G_P(hidden) [B]. With
    `relative` (T5), the mask carries a relative position bias, and the prefix columns get
    theirs from `bias_table` (`RelativePositions`) instead of zeros, for queries at
    `positions` [S_q] (None: 0 … S_q-1; cached decoding passes the cache positions).
    """

    def __init__(self, gate_features: int = 0, device: torch.device | None = None,
                 dtype: torch.dtype | None = None, relative: RelativePositions | None = None):
        super().__init__()
        self.gate = Gate(gate_features, device, dtype) if gate_features else None
        self.relative = relative

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                mask: torch.Tensor | None, prefix: torch.Tensor, is_causal: bool = False,
                hidden: torch.Tensor | None = None, bias_table: torch.Tensor | None = None,
                positions: torch.Tensor | None = None):
        batch, heads, tokens = key.shape[0], key.shape[1], prefix.shape[1]
        prefix_k, prefix_v = (self.expand(part, batch, heads) for part in prefix.to(key.dtype))
        if self.gate is not None:
            gate = self.gate(hidden).view(batch, 1, 1, 1).to(key.dtype)
            prefix_k, prefix_v = prefix_k * gate, prefix_v * gate
        if mask is None and is_causal:
            mask = causal_mask(query.shape[2], key.shape[2], key.device)
        key = torch.cat([prefix_k, key], dim=2)
        value = torch.cat([prefix_v, value], dim=2)
        if mask is None:
            return key, value, None
        shape = (*mask.shape[:-1], tokens)
        if self.relative is not None:
            if positions is None:
                positions = torch.arange(query.shape[2], device=key.device)
            opening = self.relative.bias(bias_table, positions, tokens).to(mask.dtype)
            opening = opening.expand(shape)
        else:
            opening = (mask.new_ones if mask.dtype == torch.bool else mask.new_zeros)(shape)
        return key, value, torch.cat([opening, mask], dim=-1)

    def adapter_parameters(self) -> dict[str, nn.Parameter]:
        return dict(self.named_parameters())

    @property
    def undecayed_parameters(self) -> tuple[str, ...]:
        return gate_bias(self.gate)

    @staticmethod
    def expand(part: torch.Tensor, batch: int, heads: int) -> torch.Tensor:
        """[P, H_kv, d] → [B, H, P, d]."""
        part = part.transpose(0, 1)
        if heads != part.shape[0]:
            part = part.repeat_interleave(heads // part.shape[0], dim=0)
        return part.unsqueeze(0).expand(batch, -1, -1, -1)


@dataclass(frozen=True)
class RelativePositions:
    """T5's relative position bias, for the prefix columns of an attention that adds one:
    the prefix keys sit at positions 0 … P-1 and the queries at P … P+S-1 (where transformers
    puts them behind a P-token cache), so real keys keep their bias and prefix key j gets
    the table's entry for the bucket of j - (P + i). `bucket` is the model's own bucketing
    function (T5Attention._relative_position_bucket)."""

    bucket: Callable
    buckets: int
    max_distance: int
    bidirectional: bool

    def bias(self, table: torch.Tensor, positions: torch.Tensor, tokens: int) -> torch.Tensor:
        """[1, H, S, P] from the relative bias table [buckets, H], for queries at `positions`
        [S] (counted without the prefix)."""
        rows = positions[:, None] + tokens
        cols = torch.arange(tokens, device=table.device)[None, :]
        found = self.bucket(cols - rows, bidirectional=self.bidirectional,
                            num_buckets=self.buckets, max_distance=self.max_distance)
        return nn.functional.embedding(found, table).permute(2, 0, 1).unsqueeze(0)


def causal_mask(query_len: int, key_len: int, device) -> torch.Tensor:
    """[S_q, S_k] bool, what SDPA's is_causal means: query i sees keys j ≤ i (top left)."""
    rows = torch.arange(query_len, device=device).unsqueeze(1)
    cols = torch.arange(key_len, device=device).unsqueeze(0)
    return cols <= rows
