"""Blockwise kernels for sparse causal attention: the numbers of attention under a
pattern's mask without ever forming a (T, T) score matrix, so time and memory grow as
T * (span + extra) instead of T^2. They know block sizes and key offsets; which pattern
needs which is ``methods.sparse_attention``'s business (``pattern_mask`` defines the patterns).

- ``window_attention``: queries in blocks of ``w``; each block scores its own block and
  the previous one (span 2w) and keeps the pairs at distance < w.
- ``strided_attention``: the window above, plus per-query "far" keys at given distances
  (powers of two, or multiples of a stride), gathered by index.
- ``block_global_attention``: each block of ``b`` scores only itself (span b), plus the
  ``g`` leading global tokens that lie outside the query's own block.

``window`` and ``block_global`` hand every query block with its key set
(own span, plus the globals) to one batched SDPA call, blocks as batch, so
PyTorch's fused kernel does the softmax. ``strided`` scores local and far keys
explicitly under one softmax (far keys differ per query). Either way the
result is exactly attention under the pattern's mask.

Positions here are slot indices (no cache: the T queries are the T keys).
Without padding no (T, T) tensor exists at all. With padding, the boolean
``mask`` (B or 1, 1, T, T) of the sparse mask builder (T^2 bytes per row, built
once per forward for all layers) is read only at the pairs each kernel visits;
it must allow nothing outside the pattern. ``block_global`` with padding counts
blocks in real tokens, so it takes the masked path instead.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _block_mask_view(mask: torch.Tensor, block: int, n_prev: int, Tp: int) -> torch.Tensor:
    """Entries of a (B', 1, T, T) mask at the (query, key) pairs of each block's
    span: (B', 1, nb, block, span), False outside the sequence."""
    T = mask.size(-1)
    nb, span = Tp // block, (n_prev + 1) * block
    mp = F.pad(mask, (n_prev * block, Tp - T, 0, Tp - T), value=False)  # (B', 1, Tp, Tp + n_prev*block)
    win = mp.unfold(-1, span, block)  # (B', 1, Tp, nb, span): column window of every block
    win = win.reshape(mask.size(0), 1, nb, block, nb, span)
    return win.diagonal(dim1=2, dim2=4).permute(0, 1, 4, 2, 3)  # (B', 1, nb, block, span)


def window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int,
                     mask: torch.Tensor | None = None, dropout: float = 0.0) -> torch.Tensor:
    """(B, nh, T, hs) queries over the same T keys, each seeing the last ``window`` (itself included)."""
    return _fused_blocks(q, k, v, window, 1, 0, mask, dropout)


def block_global_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block: int, num_global: int,
                           dropout: float = 0.0) -> torch.Tensor:
    """Each query sees its own block of ``block`` positions and the first ``num_global`` (<= T)
    positions; no padding (blocks are counted in real tokens, which a mask of slots cannot say)."""
    return _fused_blocks(q, k, v, block, 0, num_global, None, dropout)


def _local_allowed(block: int, n_prev: int, nb: int, device: torch.device) -> torch.Tensor:
    """(nb, block, span) pairs of each query block and its key span that the pattern keeps."""
    span = (n_prev + 1) * block
    q_pos = torch.arange(nb * block, device=device).view(nb, block, 1)
    k_pos = (torch.arange(nb, device=device) * block - n_prev * block).view(nb, 1, 1) + torch.arange(span,
                                                                                                     device=device)
    allowed = (k_pos >= 0) & (k_pos <= q_pos)
    rule = (q_pos - k_pos < block) if n_prev else (k_pos // block == q_pos // block)  # window w = block
    return allowed & rule  # (nb, block, span)


def _fused_blocks(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block: int,
    n_prev: int,
    n_global: int,
    mask: torch.Tensor | None,
    dropout: float,
) -> torch.Tensor:
    """Window (n_prev=1) and block_global (n_prev=0, n_global leading keys): every
    query block is one small SDPA call over its own key set, so PyTorch's fused
    kernel does the softmax; blocks become the batch dimension."""
    B, nh, T, hs = q.shape
    nb = -(-T // block)
    Tp, span = nb * block, (n_prev + 1) * block

    def blocks(x: torch.Tensor, size: int, lead: int) -> torch.Tensor:
        """(B, nh, T, hs) -> (B * nb, nh, size, hs): rows i*block - lead .. + size of block i,
        gathered in one copy. Rows outside 0..T-1 repeat an edge row: the mask hides
        them from every query that is kept."""
        idx = (torch.arange(nb, device=x.device) * block - lead)[:, None] + torch.arange(size, device=x.device)
        xb = x.transpose(1, 2)[:, idx.clamp(0, T - 1)]  # (B, nb, size, nh, hs); in the model a view's gather
        return xb.reshape(B * nb, size, nh, hs).transpose(1, 2)

    qb = blocks(q, block, 0)  # (B*nb, nh, block, hs)
    kb, vb = blocks(k, span, n_prev * block), blocks(v, span, n_prev * block)  # (B*nb, nh, span, hs)
    allowed = _local_allowed(block, n_prev, nb, q.device)  # (nb, block, span)
    if mask is not None:
        allowed = allowed & _block_mask_view(mask, block, n_prev, Tp)  # (B', 1, nb, block, span)
    eye = torch.arange(block, device=q.device)[:, None] + n_prev * block == torch.arange(span, device=q.device)
    allowed = (allowed | eye).expand(B, 1, nb, block, span) if allowed.dim() == 5 else allowed | eye
    if n_global:
        t = torch.arange(Tp, device=q.device).view(nb, block, 1)
        gpos = torch.arange(n_global, device=q.device)
        g_ok = (gpos <= t) & (gpos // block != t // block)  # (nb, block, g): globals outside the own block
        kg = k[:, None, :, :n_global].expand(B, nb, nh, n_global, hs).reshape(B * nb, nh, n_global, hs)
        vg = v[:, None, :, :n_global].expand(B, nb, nh, n_global, hs).reshape(B * nb, nh, n_global, hs)
        kb, vb = torch.cat([kg, kb], dim=2), torch.cat([vg, vb], dim=2)
        allowed = torch.cat([g_ok, allowed], dim=-1)  # (nb, block, g + span)
    if allowed.dim() == 5:  # per row (padding): (B, 1, nb, block, S) -> (B*nb, 1, block, S)
        allowed = allowed.permute(0, 2, 1, 3, 4).reshape(B * nb, 1, block, allowed.size(-1))
    else:
        allowed = allowed.repeat(B, 1, 1)[:, None]  # (B*nb, 1, block, S)
    y = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=allowed, dropout_p=dropout)  # (B*nb, nh, block, hs)
    y = y.transpose(1, 2).reshape(B, Tp, nh, hs)[:, :T]  # (B, T, nh, hs): the layer's layout, one copy
    return y.transpose(1, 2)  # (B, nh, T, hs)


def strided_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window: int,
    far: list[int],
    mask: torch.Tensor | None = None,
    dropout: float = 0.0,
) -> torch.Tensor:
    """The window's keys plus, for each query, the keys at the distances ``far`` (each >= window,
    below T). Window blocks plus per-query far keys gathered by index, one explicit softmax
    over both (the far keys differ for every query, so no block shares them)."""
    B, nh, T, hs = q.shape
    block, n_prev = window, 1
    nb = -(-T // block)
    Tp, span = nb * block, (n_prev + 1) * block
    dev = q.device

    # Local part: block i of queries against key blocks i - 1 .. i.
    qb = F.pad(q, (0, 0, 0, Tp - T)).view(B, nh, nb, block, hs)
    kp = F.pad(k, (0, 0, n_prev * block, Tp - T))  # (B, nh, Tp + block, hs)
    vp = F.pad(v, (0, 0, n_prev * block, Tp - T))
    kT = kp.unfold(2, span, block)  # (B, nh, nb, hs, span)
    vs = vp.unfold(2, span, block).transpose(-1, -2)  # (B, nh, nb, span, hs)
    scale = 1.0 / math.sqrt(hs)
    s_loc = (qb @ kT) * scale  # (B, nh, nb, block, span)
    allowed = _local_allowed(block, n_prev, nb, dev)  # (nb, block, span)
    if mask is not None:
        allowed = allowed & _block_mask_view(mask, block, n_prev, Tp)  # (B', 1, nb, block, span)
    eye = torch.arange(block, device=dev)[:, None] + n_prev * block == torch.arange(span, device=dev)
    allowed = allowed | eye  # every row keeps itself: no all-masked row, even in the padding
    s_loc = s_loc.masked_fill(~allowed, float("-inf")).view(B, nh, Tp, span)

    # Far part: key t - o for each far offset o.
    t = torch.arange(Tp, device=dev)[:, None]  # (Tp, 1)
    offs = torch.tensor(far, device=dev, dtype=torch.long)
    idx = t - offs  # (Tp, E) key slot of each far key
    far_ok = (idx >= 0) & (t < T)
    idx = idx.clamp(min=0)
    k_far = kp[:, :, n_prev * block :][:, :, idx]  # (B, nh, Tp, E, hs)
    s_far = torch.einsum("bhtd,bhted->bhte", qb.view(B, nh, Tp, hs), k_far) * scale
    if mask is not None:
        mrow = F.pad(mask, (0, 0, 0, Tp - T), value=False)  # (B', 1, Tp, T)
        far_ok = far_ok & mrow.gather(-1, idx.expand(mrow.size(0), 1, Tp, idx.size(-1)))
    s_far = s_far.masked_fill(~far_ok, float("-inf"))
    E = s_far.size(-1)

    p = torch.cat([s_loc, s_far], dim=-1).softmax(-1)  # (B, nh, Tp, span + E)
    if dropout > 0.0:
        p = F.dropout(p, p=dropout)
    p_loc, p_far = p.split([span, E], dim=-1)
    y = (p_loc.reshape(B, nh, nb, block, span) @ vs).view(B, nh, Tp, hs)  # (B, nh, Tp, hs)
    if E:
        v_far = vp[:, :, n_prev * block :][:, :, idx]  # (B, nh, Tp, E, hs)
        y = y + torch.einsum("bhte,bhted->bhtd", p_far, v_far)
    return y[:, :, :T]  # (B, nh, T, hs)
