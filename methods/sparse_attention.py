"""Sparse causal attention: an attention class, chosen when the model is built, under which
a query sees only some earlier positions (``apply_sparse_attention(model, SparseAttention(...))``).

Patterns change only which earlier positions a query sees, never the weights, so
pretrained checkpoints load unchanged:

- ``window``: the last ``window`` positions (itself included);
- ``strided``: that window plus positions at distances 1, 2, 4, 8... (LogSparse,
  Li et al. 2019), or at multiples of ``stride`` when it is > 0 (the strided
  pattern of Child et al. 2019);
- ``block_global``: its own block of ``block`` positions plus the first
  ``num_global`` tokens, which every query sees.

``pattern_mask`` (through ``build_sparse_mask``) defines them and is the reference.
Training and prefill without a cache use the blockwise kernels of
``methods.sparse_kernels`` (``impl="blockwise"``), whose cost is O(T * w);
``impl="mask"`` runs SDPA on the reference mask instead. With a cache, each step
attends only to the keys the pattern can reach (the last w for ``window``, a slice; the
window plus the log-spaced keys for ``strided``, gathered), and under ``window`` the
model's cache is a ``RingKVCache`` that stores only the last w. A pattern that covers
the whole sequence (``covers_all``) runs the dense code, so it gives the dense numbers
bit for bit.

A saved model keeps its pattern as the fields ``attention_fields`` returns (named as
the command-line flags); ``methods.restore`` rebuilds it from them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from config import GPT2Config
from methods.layer_swap import gpt2_body, swap_attention
from methods.sparse_kernels import block_global_attention, strided_attention, window_attention
from modules.attention import (
    CausalSelfAttention,
    apply_padding,
    build_attention_mask,
    check_padding_length,
    eager_attention,
    slot_positions,
)
from modules.kv_cache import BaseKVCache

ATTENTION_PATTERNS = ("dense", "window", "strided", "block_global")
# SparseAttention field -> the command-line flag (and saved-file key) that sets it
FIELD_NAMES = {"pattern": "attn_pattern", "window": "attn_window", "block": "attn_block",
               "num_global": "attn_num_global", "stride": "attn_stride", "impl": "attn_sparse_impl"}
M = TypeVar("M", bound=nn.Module)


@dataclass(frozen=True)
class SparseAttention:
    """Which pattern, its sizes, and how it is computed; ``dense`` is plain causal attention."""

    pattern: str = "dense"
    window: int = 256  # local window width, the query included (window, strided)
    block: int = 64  # block size (block_global)
    num_global: int = 1  # leading global tokens (block_global)
    stride: int = 0  # strided: 0 = far keys at distances 2^k (LogSparse); s > 0 = at multiples of s
    impl: str = "blockwise"  # "blockwise": the O(T*w) kernels; "mask": SDPA on the full reference mask

    def __post_init__(self) -> None:
        if self.pattern not in ATTENTION_PATTERNS:
            raise ValueError(f"attn_pattern must be one of {ATTENTION_PATTERNS}, got {self.pattern!r}")
        if self.impl not in ("blockwise", "mask"):
            raise ValueError(f"attn_sparse_impl must be 'blockwise' or 'mask', got {self.impl!r}")
        for name in ("window", "block"):
            if getattr(self, name) < 1:
                raise ValueError(f"{FIELD_NAMES[name]} must be >= 1, got {getattr(self, name)}")
        if self.num_global < 0 or self.stride < 0:
            raise ValueError("attn_num_global and attn_stride must be >= 0")

    def fields(self) -> dict[str, Any]:
        """The settings under their flag names, as a saved file keeps them."""
        return {flag: getattr(self, name) for name, flag in FIELD_NAMES.items()}

    @classmethod
    def from_fields(cls, saved: Mapping[str, Any]) -> SparseAttention:
        """The settings among ``saved``'s flag-named entries (others are ignored; missing ones default)."""
        return cls(**{name: saved[flag] for name, flag in FIELD_NAMES.items() if flag in saved})


def covers_all(settings: SparseAttention, length: int) -> bool:
    """Whether the pattern lets every query see every earlier position of a
    sequence of ``length``: then it is dense attention, computed as such."""
    p = settings.pattern
    if p in ("window", "strided"):
        return settings.window >= length
    if p == "block_global":
        return settings.block >= length or settings.num_global >= length
    return True


def pattern_mask(settings: SparseAttention, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
    """Which (query, key) pairs the sparse pattern keeps, before causality.
    Positions broadcast against each other (e.g. (T, 1) and (1, S))."""
    p = settings.pattern
    if p == "dense":
        return torch.ones((), dtype=torch.bool, device=q_pos.device)
    d = q_pos - k_pos  # distance back from the query
    if p == "window":
        return d < settings.window
    if p == "strided":
        if settings.stride > 0:
            far = (d > 0) & (d % settings.stride == 0)
        else:
            far = (d > 0) & ((d & (d - 1)) == 0)  # powers of two
        return (d < settings.window) | far
    if p == "block_global":
        b = settings.block
        return (k_pos // b == q_pos // b) | (k_pos < settings.num_global)
    raise NotImplementedError(f"attention pattern {p!r}")


def far_offsets(settings: SparseAttention, length: int) -> list[int]:
    """Distances >= w that the strided pattern also attends to (below ``length``)."""
    w = settings.window
    if settings.stride > 0:
        s = settings.stride
        return list(range(((w + s - 1) // s) * s, length, s))
    out, o = [], 1
    while o < length:
        if o >= w:
            out.append(o)
        o *= 2
    return out


def build_sparse_mask(
    settings: SparseAttention,
    query_len: int,
    past_len: int,
    key_padding_mask: torch.Tensor | None,
    device: torch.device,
) -> torch.Tensor | None:
    """Boolean (B or 1, 1, T, S) mask, or None when the attention layer applies causality
    and the pattern by itself: a covering pattern is dense (``build_attention_mask``), and
    without a cache the blockwise kernels build their masks block by block. An all-ones
    padding mask counts as none.

    ``window`` and ``strided`` depend only on the distance between slots, which
    equals the distance in tokens under left padding. ``block_global`` counts
    blocks and global tokens in real tokens (as the position embeddings do), so
    left padding never makes a pad token "global".
    """
    if covers_all(settings, past_len + query_len):
        return build_attention_mask(query_len, past_len, key_padding_mask, device)
    check_padding_length(key_padding_mask, query_len, past_len)
    if key_padding_mask is not None and bool(key_padding_mask.all()):
        key_padding_mask = None
    if key_padding_mask is None and past_len == 0 and settings.impl == "blockwise":
        return None
    q_pos, k_pos = slot_positions(query_len, past_len, device)  # (T, 1), (1, S)
    pq, pk = q_pos, k_pos
    if settings.pattern == "block_global" and key_padding_mask is not None:
        pos = (key_padding_mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, S) token positions
        pq, pk = pos[:, None, -query_len:, None], pos[:, None, None, :]  # (B, 1, T, 1), (B, 1, 1, S)
    allowed = (k_pos <= q_pos) & pattern_mask(settings, pq, pk)  # (T, S) or (B, 1, T, S)
    allowed = allowed if allowed.dim() == 4 else allowed[None, None]  # (B or 1, 1, T, S)
    return apply_padding(allowed, key_padding_mask, q_pos, k_pos)


def sparse_blockwise_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    settings: SparseAttention,
    mask: torch.Tensor | None = None,
    dropout: float = 0.0,
) -> torch.Tensor:
    """Attention of (B, nh, T, hs) queries over the same T keys under the pattern
    (window, strided or block_global), in O(T * span)."""
    pattern, T = settings.pattern, q.size(2)
    if pattern == "window":
        return window_attention(q, k, v, settings.window, mask, dropout)
    if pattern == "block_global":
        if mask is not None:
            raise ValueError("block_global counts blocks in real tokens; with padding use the masked path")
        return block_global_attention(q, k, v, settings.block, min(settings.num_global, T), dropout)
    if pattern == "strided":
        return strided_attention(q, k, v, settings.window, far_offsets(settings, T), mask, dropout)
    raise ValueError(f"no blockwise kernel for attention pattern {pattern!r}")


class SparseCausalSelfAttention(CausalSelfAttention):
    """Causal self-attention under a sparse pattern: its own mask, attend step and cache."""

    def __init__(self, config: GPT2Config, layer_idx: int = 0, sparse: SparseAttention | None = None) -> None:
        super().__init__(config, layer_idx)
        self.sparse = sparse or SparseAttention()

    def build_mask(self, query_len: int, past_len: int, key_padding_mask: torch.Tensor | None,
                   device: torch.device) -> torch.Tensor | None:
        return build_sparse_mask(self.sparse, query_len, past_len, key_padding_mask, device)

    def new_cache(self, batch_size: int, max_length: int, device: torch.device | str,
                  dtype: torch.dtype) -> BaseKVCache:
        """A ring of the last w positions under ``window`` (when w is shorter than the cache), else every position."""
        if self.sparse.pattern == "window" and self.sparse.window < max_length:
            return RingKVCache(self.config, batch_size, max_length, device, dtype, self.sparse)
        return super().new_cache(batch_size, max_length, device, dtype)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
               past: int) -> torch.Tensor:
        if covers_all(self.sparse, past + q.size(2)):
            return super().attend(q, k, v, mask, past)
        dropout = self.attn_dropout if self.training else 0.0
        if self.sparse.impl == "blockwise" and past == 0 and (mask is None or self.sparse.pattern != "block_global"):
            return sparse_blockwise_attention(q, k, v, self.sparse, mask, dropout)
        return self._masked_sparse(q, k, v, mask, past, dropout)

    def _masked_sparse(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, past: int, dropout: float
    ) -> torch.Tensor:
        """Reference path (and decoding with a cache): attention on the pattern's
        mask, restricted first to the keys some query can reach."""
        T, S = q.size(2), k.size(2)
        total = past + T
        if mask is None:
            q_pos, k_pos = slot_positions(T, past, q.device)
            mask = ((k_pos <= q_pos) & pattern_mask(self.sparse, q_pos, k_pos))[None, None]  # (1, 1, T, total)
        mask = mask[..., total - S :]  # the key slots this cache returned
        if self.sparse.pattern == "window":  # a contiguous tail: slice, no copy
            first = max(0, past - self.sparse.window + 1 - (total - S))
            k, v, mask = k[:, :, first:], v[:, :, first:], mask[..., first:]
        elif past > 0:  # decoding: gather the few reachable keys (LogSparse: w + log2(S))
            keep = mask.flatten(0, -2).any(0).nonzero().squeeze(1)  # (S',)
            k, v, mask = k.index_select(2, keep), v.index_select(2, keep), mask.index_select(-1, keep)
        if self.config.attn_impl == "sdpa":
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
        return eager_attention(q, k, v, mask, False, dropout)


class RingKVCache(BaseKVCache):
    """Bounded cache for the ``window`` pattern: only the last ``window`` keys/values
    per layer, in a ring indexed by position mod w, so memory is O(w), not O(length).

    ``append`` returns, in order, the last w - 1 cached keys followed by the new ones:
    the most any new query can see.
    """

    def __init__(self, config: GPT2Config, batch_size: int, max_length: int, device: torch.device | str,
                 dtype: torch.dtype, sparse: SparseAttention) -> None:
        if sparse.pattern != "window":
            raise ValueError(f"RingKVCache needs the window pattern, got {sparse.pattern!r}")
        super().__init__(config, batch_size, max_length, min(sparse.window, max_length), device, dtype)

    def slot(self, position: int) -> int:
        if not self.length - self.capacity <= position < self.length:
            raise IndexError(f"position {position} is not in the ring (holds {self.length - self.capacity} .. "
                             f"{self.length - 1})")
        return position % self.capacity

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        T, cap = k.size(2), self.capacity
        self._check_room(T)
        n_old = min(self.length, cap - 1)
        old = torch.arange(self.length - n_old, self.length, device=k.device) % cap
        k_out = torch.cat([self._k[layer].index_select(2, old), k], dim=2)  # (B, nh, n_old + T, hs)
        v_out = torch.cat([self._v[layer].index_select(2, old), v], dim=2)
        n_new = min(T, cap)
        slots = torch.arange(self.length + T - n_new, self.length + T, device=k.device) % cap
        self._k[layer].index_copy_(2, slots, k[:, :, T - n_new :])
        self._v[layer].index_copy_(2, slots, v[:, :, T - n_new :])
        return k_out, v_out


def apply_sparse_attention(model: M, settings: SparseAttention) -> M:
    """Every attention layer of ``model``'s GPT-2 body (the model or a head's ``.gpt``) under
    ``settings``' pattern, the same weights held; ``dense`` puts plain attention back where a
    pattern was. Returns ``model``."""
    body = gpt2_body(model, "sparse attention")
    if settings.pattern == "dense":
        if sparse_attention_of(body) is not None:
            swap_attention(body, lambda old: CausalSelfAttention(old.config, old.layer_idx))
        return model
    for block in body.h:
        if type(block.attn) not in (CausalSelfAttention, SparseCausalSelfAttention):
            raise ValueError(f"sparse attention replaces plain attention layers, not {type(block.attn).__name__} "
                             "(prefix tuning supports dense attention only)")
    swap_attention(body, lambda old: SparseCausalSelfAttention(old.config, old.layer_idx, settings))
    return model


def sparse_attention_of(model: nn.Module) -> SparseAttention | None:
    """The settings of the model's sparse attention, or None for dense attention."""
    attn = gpt2_body(model, "sparse attention").h[0].attn
    return attn.sparse if isinstance(attn, SparseCausalSelfAttention) else None


def attention_fields(model: nn.Module) -> dict[str, Any]:
    """What a saved file must keep beside the config for the model to be rebuilt with its
    attention (``methods.restore``): the flag-named settings, or nothing for dense attention."""
    settings = sparse_attention_of(model)
    return settings.fields() if settings is not None else {}
