"""Causal self-attention with padding masks, sparse patterns and a key/value cache
(any ``modules.kv_cache.BaseKVCache``).

Two implementations give the same dense numbers: ``sdpa`` calls
``torch.nn.functional.scaled_dot_product_attention`` (flash / memory-efficient
kernels on CUDA), ``eager`` writes softmax(QK^T / sqrt(d)) V out by hand.

Masks are boolean, True = may attend, of shape (B, 1, T, S) for T queries over
S keys. A query always may attend to itself, so that no row is fully masked
(left-padding rows would otherwise give NaN); pad rows hold garbage that no
caller reads.

Sparse patterns (``config.attn_pattern``) change only which earlier positions a
query sees, never the weights, so pretrained checkpoints load unchanged:

- ``window``: the last ``attn_window`` positions (itself included);
- ``strided``: that window plus positions at distances 1, 2, 4, 8... (LogSparse,
  Li et al. 2019), or at multiples of ``attn_stride`` when it is > 0 (the
  strided pattern of Child et al. 2019);
- ``block_global``: its own block of ``attn_block`` positions plus the first
  ``attn_num_global`` tokens, which every query sees.

``pattern_mask`` (through ``build_attention_mask``) defines them and is the
reference. Training and prefill without a cache use the blockwise kernels of
``methods.sparse_attention`` (``attn_sparse_impl="blockwise"``), whose cost is
O(T * w); ``attn_sparse_impl="mask"`` runs SDPA on the reference mask instead.
With a cache, each step attends only to the keys the pattern can reach (the
last w for ``window``, a slice; the window plus the log-spaced keys for
``strided``, gathered); the caches live in ``modules.kv_cache``, where
``RingKVCache`` (``new_kv_cache`` picks it for ``window``) stores only the last
w. A pattern that covers the whole sequence
(``covers_all``) runs the dense code, so it gives the dense numbers bit for bit.

Prefix tuning (``methods.prefix``) sets ``CausalSelfAttention.prefix``: a function of the
layer index that returns learned (nh, L, hs) keys and values, put before the keys of every
row and seen by every query. They are not positions (no position embedding, not in the
cache), so masks gain L leading True columns and nothing else changes. Dense attention only;
``None`` (the default) costs one attribute test.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from config import GPT2Config
from methods.sparse_attention import sparse_blockwise_attention
from modules.kv_cache import BaseKVCache


def covers_all(config: GPT2Config, length: int) -> bool:
    """Whether the pattern lets every query see every earlier position of a
    sequence of ``length``: then it is dense attention, computed as such."""
    p = config.attn_pattern
    if p in ("window", "strided"):
        return config.attn_window >= length
    if p == "block_global":
        return config.attn_block >= length or config.attn_num_global >= length
    return True


def build_attention_mask(
    config: GPT2Config,
    query_len: int,
    past_len: int,
    key_padding_mask: torch.Tensor | None,
    device: torch.device,
) -> torch.Tensor | None:
    """Boolean (B or 1, 1, T, S) mask, or None when the attention layer can apply
    causality and the pattern by itself.

    ``key_padding_mask`` is (B, S) with 1 for real tokens, covering cached and new
    positions. None is returned without padding for dense attention (callers use
    ``is_causal`` or, for T == 1, no mask) and for a sparse pattern without a
    cache (the blockwise kernels build their masks block by block). For sparse
    patterns an all-ones padding mask counts as none.

    ``window`` and ``strided`` depend only on the distance between slots, which
    equals the distance in tokens under left padding. ``block_global`` counts
    blocks and global tokens in real tokens (as the position embeddings do), so
    left padding never makes a pad token "global".
    """
    total = past_len + query_len
    if key_padding_mask is not None and key_padding_mask.shape[1] != total:
        raise ValueError(
            f"attention_mask covers {key_padding_mask.shape[1]} positions, expected {total} "
            f"({past_len} cached + {query_len} new)"
        )
    dense = covers_all(config, total)
    if key_padding_mask is not None and not dense and bool(key_padding_mask.all()):
        key_padding_mask = None
    if key_padding_mask is None:
        if dense and (past_len == 0 or query_len == 1):
            return None
        if not dense and past_len == 0 and config.attn_sparse_impl == "blockwise":
            return None
    q_pos = torch.arange(past_len, total, device=device)[:, None]  # (T, 1)
    k_pos = torch.arange(total, device=device)[None, :]  # (1, S)
    allowed = k_pos <= q_pos  # (T, S)
    if not dense:
        pq, pk = q_pos, k_pos
        if config.attn_pattern == "block_global" and key_padding_mask is not None:
            pos = (key_padding_mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, S) token positions
            pq, pk = pos[:, None, -query_len:, None], pos[:, None, None, :]  # (B, 1, T, 1), (B, 1, 1, S)
        allowed = allowed & pattern_mask(config, pq, pk)
    mask = allowed if allowed.dim() == 4 else allowed[None, None]  # (B or 1, 1, T, S)
    if key_padding_mask is not None:
        mask = mask & key_padding_mask.bool()[:, None, None, :]
        mask = mask | (k_pos == q_pos)[None, None]
    return mask


def pattern_mask(config: GPT2Config, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
    """Which (query, key) pairs the sparse pattern keeps, before causality.
    Positions broadcast against each other (e.g. (T, 1) and (1, S))."""
    p = config.attn_pattern
    if p == "dense":
        return torch.ones((), dtype=torch.bool, device=q_pos.device)
    d = q_pos - k_pos  # distance back from the query
    if p == "window":
        return d < config.attn_window
    if p == "strided":
        if config.attn_stride > 0:
            far = (d > 0) & (d % config.attn_stride == 0)
        else:
            far = (d > 0) & ((d & (d - 1)) == 0)  # powers of two
        return (d < config.attn_window) | far
    if p == "block_global":
        b = config.attn_block
        return (k_pos // b == q_pos // b) | (k_pos < config.attn_num_global)
    raise NotImplementedError(f"attention pattern {p!r}")


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
        # layer index -> (nh, L, hs) prefix keys and values (methods.prefix); None: no prefix
        self.prefix: Callable[[int], tuple[torch.Tensor, torch.Tensor]] | None = None

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None = None,
        cache: BaseKVCache | None = None,
    ) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        past = 0
        if cache is not None:
            past = cache.length
            k, v = cache.append(self.layer_idx, k, v)  # (B, nh, S, hs): the last S positions
        if self.prefix is not None:
            k, v, mask = self._prepend_prefix(k, v, mask, T)
        dropout = self.attn_dropout if self.training else 0.0
        if covers_all(self.config, past + T):
            is_causal = mask is None and past == 0 and T > 1
            if self.config.attn_impl == "sdpa":
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=is_causal)
            else:
                y = eager_attention(q, k, v, mask, is_causal, dropout)
        elif (
            self.config.attn_sparse_impl == "blockwise"
            and past == 0
            and (mask is None or self.config.attn_pattern != "block_global")
        ):
            y = sparse_blockwise_attention(q, k, v, self.config, mask, dropout)
        else:
            y = self._masked_sparse(q, k, v, mask, past, dropout)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        y = self.c_proj(y)
        return self.resid_dropout(y) if self.training else y

    def _prepend_prefix(
        self, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, T: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Keys/values (B, nh, L + S, hs) with the prefix first, and the mask that lets every
        query see it (an explicit causal mask replaces ``is_causal``, which SDPA aligns top-left)."""
        if self.config.attn_pattern != "dense":
            raise NotImplementedError(f"prefix tuning supports dense attention only, not {self.config.attn_pattern!r}")
        pk, pv = self.prefix(self.layer_idx)  # (nh, L, hs)
        B, S, L = k.size(0), k.size(2), pk.size(1)
        k = torch.cat([pk.to(k.dtype).expand(B, -1, -1, -1), k], dim=2)  # (B, nh, L + S, hs)
        v = torch.cat([pv.to(v.dtype).expand(B, -1, -1, -1), v], dim=2)
        if mask is None and T == 1:  # one query sees every key
            return k, v, None
        if mask is None:
            mask = torch.ones(T, S, dtype=torch.bool, device=k.device).tril(S - T)[None, None]  # (1, 1, T, S)
        return k, v, torch.cat([mask.new_ones(*mask.shape[:-1], L), mask], dim=-1)  # (B or 1, 1, T, L + S)

    def _masked_sparse(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, past: int, dropout: float
    ) -> torch.Tensor:
        """Reference path (and decoding with a cache): attention on the pattern's
        mask, restricted first to the keys some query can reach."""
        T, S = q.size(2), k.size(2)
        total = past + T
        if mask is None:
            mask = _reference_mask(self.config, T, past, q.device)
        mask = mask[..., total - S :]  # the key slots this cache returned
        if self.config.attn_pattern == "window":  # a contiguous tail: slice, no copy
            first = max(0, past - self.config.attn_window + 1 - (total - S))
            k, v, mask = k[:, :, first:], v[:, :, first:], mask[..., first:]
        elif past > 0:  # decoding: gather the few reachable keys (LogSparse: w + log2(S))
            keep = mask.flatten(0, -2).any(0).nonzero().squeeze(1)  # (S',)
            k, v, mask = k.index_select(2, keep), v.index_select(2, keep), mask.index_select(-1, keep)
        if self.config.attn_impl == "sdpa":
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
        return eager_attention(q, k, v, mask, False, dropout)


def _reference_mask(config: GPT2Config, query_len: int, past_len: int, device: torch.device) -> torch.Tensor:
    """The pattern's full mask without padding (for callers that passed none)."""
    q_pos = torch.arange(past_len, past_len + query_len, device=device)[:, None]  # (T, 1)
    k_pos = torch.arange(past_len + query_len, device=device)[None, :]  # (1, S)
    return ((k_pos <= q_pos) & pattern_mask(config, q_pos, k_pos))[None, None]  # (1, 1, T, S)


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
