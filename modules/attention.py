"""Causal self-attention over a key/value cache (any ``modules.kv_cache.BaseKVCache``).

Two implementations give the same numbers: ``sdpa`` calls
``torch.nn.functional.scaled_dot_product_attention`` (flash / memory-efficient
kernels on CUDA), ``eager`` writes softmax(QK^T / sqrt(d)) V out by hand.

Masks are boolean, True = may attend, of shape (B, 1, T, S) for T queries over
S keys. A query always may attend to itself, so that no row is fully masked
(left-padding rows would otherwise give NaN); pad rows hold garbage that no
caller reads.

``forward`` is a few steps, each a method: ``project`` to queries, keys and values, the
cache's ``append``, ``attend``, the output projection. The model asks its layers for the
mask (``build_mask``) and the cache (``new_cache``) too, so a variant of attention is a
subclass that overrides one step and holds the same submodules: the weights and their
names stay those of GPT-2.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from config import GPT2Config
from modules.kv_cache import BaseKVCache, KVCache


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

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, cache: BaseKVCache | None = None,
                ) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.project(x)  # (B, nh, T, hs) each
        past = 0
        if cache is not None:
            past = cache.length
            k, v = cache.append(self.layer_idx, k, v)  # (B, nh, S, hs): the keys a new query may see
        y = self.attend(q, k, v, mask, past)  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        y = self.c_proj(y)
        return self.resid_dropout(y) if self.training else y

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries, keys and values of (B, T, C) inputs, each (B, nh, T, hs)."""
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        return q, k, v

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
               past: int) -> torch.Tensor:
        """(B, nh, T, hs) outputs of T queries over S keys, the last T of which are theirs (``past``
        cached before them). A None mask means causal, or every key for a single query."""
        dropout = self.attn_dropout if self.training else 0.0
        is_causal = mask is None and past == 0 and q.size(2) > 1
        if self.config.attn_impl == "sdpa":
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=is_causal)
        return eager_attention(q, k, v, mask, is_causal, dropout)

    def build_mask(self, query_len: int, past_len: int, key_padding_mask: torch.Tensor | None,
                   device: torch.device) -> torch.Tensor | None:
        """The mask every layer's ``attend`` gets for this forward pass (built once per pass)."""
        return build_attention_mask(query_len, past_len, key_padding_mask, device)

    def new_cache(self, batch_size: int, max_length: int, device: torch.device | str,
                  dtype: torch.dtype) -> BaseKVCache:
        """The decoding cache this attention reads: every position."""
        return KVCache(self.config, batch_size, max_length, device, dtype)


def check_padding_length(key_padding_mask: torch.Tensor | None, query_len: int, past_len: int) -> None:
    """A padding mask must cover the cached and the new positions."""
    total = past_len + query_len
    if key_padding_mask is not None and key_padding_mask.shape[1] != total:
        raise ValueError(
            f"attention_mask covers {key_padding_mask.shape[1]} positions, expected {total} "
            f"({past_len} cached + {query_len} new)"
        )


def slot_positions(query_len: int, past_len: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions of the queries (T, 1) and of the keys (1, S)."""
    q_pos = torch.arange(past_len, past_len + query_len, device=device)[:, None]  # (T, 1)
    k_pos = torch.arange(past_len + query_len, device=device)[None, :]  # (1, S)
    return q_pos, k_pos


def apply_padding(allowed: torch.Tensor, key_padding_mask: torch.Tensor | None, q_pos: torch.Tensor,
                  k_pos: torch.Tensor) -> torch.Tensor:
    """(B or 1, 1, T, S) ``allowed`` without the pad keys, each query keeping itself."""
    if key_padding_mask is None:
        return allowed
    mask = allowed & key_padding_mask.bool()[:, None, None, :]
    return mask | (k_pos == q_pos)[None, None]


def build_attention_mask(query_len: int, past_len: int, key_padding_mask: torch.Tensor | None,
                         device: torch.device) -> torch.Tensor | None:
    """Boolean (B or 1, 1, T, S) causal mask without the pad keys, or None when ``attend`` needs
    none: no padding and no cache (``is_causal``), or one query (it sees every key).

    ``key_padding_mask`` is (B, S) with 1 for real tokens, covering cached and new positions."""
    check_padding_length(key_padding_mask, query_len, past_len)
    if key_padding_mask is None and (past_len == 0 or query_len == 1):
        return None
    q_pos, k_pos = slot_positions(query_len, past_len, device)
    return apply_padding((k_pos <= q_pos)[None, None], key_padding_mask, q_pos, k_pos)  # (B or 1, 1, T, S)


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
