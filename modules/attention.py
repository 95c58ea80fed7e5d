"""Causal self-attention with padding masks and a key/value cache.

Two implementations give the same numbers: ``sdpa`` calls
``torch.nn.functional.scaled_dot_product_attention`` (flash / memory-efficient
kernels on CUDA), ``eager`` writes softmax(QK^T / sqrt(d)) V out by hand.

Masks are boolean, True = may attend, of shape (B, 1, T, S) for T queries over
S keys. A query always may attend to itself, so that no row is fully masked
(left-padding rows would otherwise give NaN); pad rows hold garbage that no
caller reads.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from config import GPT2Config


class KVCache:
    """Preallocated keys and values of every layer, filled left to right.

    Preallocation avoids a ``torch.cat`` per layer per step; ``length`` is a
    Python int, so decoding needs no host-device synchronisation to index it.
    """

    def __init__(
        self,
        config: GPT2Config,
        batch_size: int,
        max_length: int,
        device: torch.device | str,
        dtype: torch.dtype,
    ) -> None:
        shape = (config.num_hidden_layers, batch_size, config.num_attention_heads, max_length, config.head_dim)
        self.k = torch.empty(shape, device=device, dtype=dtype)
        self.v = torch.empty(shape, device=device, dtype=dtype)
        self.max_length = max_length
        self.length = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write this step's (B, nh, T, hs) keys/values; return all keys/values so far."""
        start, end = self.length, self.length + k.size(2)
        if end > self.max_length:
            raise ValueError(f"KV cache full: {end} positions > max_length {self.max_length}")
        self.k[layer, :, :, start:end] = k
        self.v[layer, :, :, start:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def advance(self, n: int) -> None:
        self.length += n

    def reorder(self, index: torch.Tensor) -> None:
        """Select batch rows (beam search): row i becomes old row index[i]."""
        self.k = self.k.index_select(1, index)
        self.v = self.v.index_select(1, index)


def build_attention_mask(
    config: GPT2Config,
    query_len: int,
    past_len: int,
    key_padding_mask: torch.Tensor | None,
    device: torch.device,
) -> torch.Tensor | None:
    """Boolean (B or 1, 1, T, S) mask, or None when plain causal attention applies.

    ``key_padding_mask`` is (B, S) with 1 for real tokens, covering cached and new
    positions. None is returned only for dense attention without padding; callers
    then use ``is_causal`` (T == S) or no mask at all (T == 1).
    """
    if key_padding_mask is None and config.attn_pattern == "dense" and (past_len == 0 or query_len == 1):
        return None
    total = past_len + query_len
    q_pos = torch.arange(past_len, total, device=device)[:, None]  # (T, 1)
    k_pos = torch.arange(total, device=device)[None, :]  # (1, S)
    allowed = k_pos <= q_pos
    allowed = allowed & pattern_mask(config, q_pos, k_pos)
    mask = allowed[None, None]  # (1, 1, T, S)
    if key_padding_mask is not None:
        if key_padding_mask.shape[1] != total:
            raise ValueError(
                f"attention_mask covers {key_padding_mask.shape[1]} positions, expected {total} "
                f"({past_len} cached + {query_len} new)"
            )
        mask = mask & key_padding_mask.bool()[:, None, None, :]
        mask = mask | (k_pos == q_pos)[None, None]
    return mask


def pattern_mask(config: GPT2Config, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
    """Which (query, key) pairs the sparse pattern keeps, before causality."""
    if config.attn_pattern == "dense":
        return torch.ones((), dtype=torch.bool, device=q_pos.device)
    raise NotImplementedError(f"attention pattern {config.attn_pattern!r}")


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPT2Config, layer_idx: int = 0) -> None:
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.n_head = config.num_attention_heads
        self.head_dim = config.head_dim
        self.c_attn = nn.Linear(config.hidden_size, 3 * config.hidden_size)  # fused q, k, v
        self.c_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.attn_dropout = config.attention_probs_dropout_prob
        self.resid_dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        past = 0
        if cache is not None:
            past = cache.length
            k, v = cache.update(self.layer_idx, k, v)  # (B, nh, S, hs)
        is_causal = mask is None and past == 0 and T > 1
        dropout = self.attn_dropout if self.training else 0.0
        if self.config.attn_impl == "sdpa":
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=is_causal)
        else:
            y = eager_attention(q, k, v, mask, is_causal, dropout)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        return self.resid_dropout(self.c_proj(y))


def eager_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    is_causal: bool,
    dropout: float = 0.0,
) -> torch.Tensor:
    """softmax(Q K^T / sqrt(hs)) V written out; the reference for the SDPA path."""
    T, S = q.size(-2), k.size(-2)
    att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.size(-1)))  # (B, nh, T, S)
    if is_causal:
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
    if mask is not None:
        att = att.masked_fill(~mask, float("-inf"))
    att = F.softmax(att, dim=-1)
    if dropout > 0.0:
        att = F.dropout(att, p=dropout)
    return att @ v  # (B, nh, T, hs)
