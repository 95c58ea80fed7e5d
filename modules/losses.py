"""Causal-LM cross-entropy over the tied embedding, without materialising all logits.

At GPT-2 sizes the 50257-way output layer dominates activation memory: for
8 x 128 tokens the float32 logits alone are 206 MB, and ``F.cross_entropy``
keeps them, its log-softmax and their gradient alive at once. ``lm_loss``
walks over row chunks instead: for each chunk it computes the logits, the
loss, and right away the gradient with respect to the chunk's logits
(softmax - one-hot), which it folds into the gradients of the hidden states
and of the embedding matrix. Backward then only scales those two stored
gradients. Peak extra memory is one (chunk, V) block, and no logit is ever
recomputed (the forward pass does the backward's matmuls, which it would have
had to do anyway).

Numbers match ``F.cross_entropy(F.linear(h, W), y, ignore_index=...)`` (mean over
non-ignored targets) in value and gradients to float32 precision.
"""

from __future__ import annotations

import torch


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of ``h @ W.T`` against ``targets``; gradients computed in forward."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        h: torch.Tensor,  # (N, d)
        weight: torch.Tensor,  # (V, d)
        targets: torch.Tensor,  # (N,)
        ignore_index: int,
        chunk_size: int,
    ) -> torch.Tensor:
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        N = h.size(0)
        valid = targets != ignore_index  # (N,)
        # Dividing by a tensor (not .item()) keeps the step free of host-device syncs.
        row_w = valid.to(torch.float32) / valid.sum().to(torch.float32)  # (N,) weight of each row in the mean
        safe_t = torch.where(valid, targets, torch.zeros_like(targets))
        loss = torch.zeros((), dtype=torch.float32, device=h.device)
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w and N == 0 else None
        # Logits are held transposed, (V, c) = W @ h_c^T, and the hidden-state gradient is computed
        # as W^T g: with the (V, d) weight as a plain operand the three products of a chunk run
        # faster on CPU BLAS (MKL) than in the (c, V) layout, and none needs a transposed copy
        # of W. Softmax reductions run over dim 0, vectorised across the columns.
        # float32 without autocast: one logits buffer reused by every chunk (no allocation or
        # page faults per chunk). Larger chunks mean fewer passes over W and better-shaped
        # products, with diminishing returns, at chunk * V * 4 bytes of buffer (51 MB for 256 rows
        # of gpt2's vocabulary); ``benchmarks/bench.py --chunk_size`` measures the trade-off.
        plain = h.dtype == weight.dtype == torch.float32 and not torch.is_autocast_enabled(h.device.type)
        buf = torch.empty(weight.size(0) * min(chunk_size, N), device=h.device) if plain else None
        for s in range(0, N, chunk_size):
            e = min(s + chunk_size, N)
            hc, t, w = h[s:e], safe_t[s:e], row_w[s:e]  # (c, d), (c,), (c,)
            if plain:  # a contiguous prefix of the buffer, also for a shorter last chunk
                logits = torch.mm(weight, hc.t(), out=buf[: weight.size(0) * (e - s)].view(-1, e - s))  # (V, c)
            else:
                logits = (weight @ hc.t()).float()  # (V, c)
            cols = torch.arange(e - s, device=h.device)
            m = logits.amax(dim=0)  # (c,)
            tgt = logits[t, cols]  # (c,)
            ex = logits.sub_(m).exp_()  # (V, c) exp(logit - max), in place
            z = ex.sum(dim=0)  # (c,) softmax normaliser
            loss = loss + ((m + z.log() - tgt) * w).sum()
            if not (need_h or need_w):
                continue
            # d loss / d logits = w * (ex / z - onehot) = (w / z) * (ex - z * onehot): subtract z at the
            # targets, and apply the row scale w / z on the thin (c, d) side of each matmul.
            ex[t, cols] -= z
            g = ex.to(h.dtype)  # (V, c)
            r = (w / z)[:, None].to(h.dtype)  # (c, 1)
            if need_h:  # as W^T g, (d, c): the faster of the two orientations
                torch.mul((weight.t() @ g).t(), r, out=grad_h[s:e])  # (c, d)
            if need_w:
                if grad_w is None:
                    grad_w = (g @ (hc * r)).float()  # (V, d)
                elif plain:
                    grad_w.addmm_(g, hc * r)  # accumulate in place: no (V, d) temporary
                else:
                    grad_w += (g @ (hc * r)).float()
        # Kept as attributes, not saved tensors: backward scales them in place and hands them over,
        # so the (V, d) weight gradient is never copied (a fresh 150 MB buffer costs page faults).
        ctx.grads = (grad_h if need_h else None, grad_w.to(weight.dtype) if need_w else None)
        return loss

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):  # type: ignore[override]
        if ctx.grads is None:
            raise RuntimeError("lm_loss: backward ran twice; its gradients were computed in the forward pass "
                               "and handed over the first time (no retain_graph support)")
        grad_h, grad_w = ctx.grads
        ctx.grads = None
        for g in (grad_h, grad_w):
            if g is not None:
                g.mul_(grad_out.to(g.dtype))
        return grad_h, grad_w, None, None, None


def shifted_targets(input_ids: torch.Tensor, attention_mask: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """(B, T-1) next-token targets of (B, T) ids: the target of position t is token t + 1, counted only
    when both are real tokens. Under left padding the first real token follows a pad; predicting it
    from a pad position is no part of the text's likelihood."""
    real = attention_mask.bool()
    return input_ids[:, 1:].masked_fill(~(real[:, 1:] & real[:, :-1]), ignore_index)


def count_lm_targets(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Next-token targets of a causal-LM batch (``input_ids`` + ``attention_mask``), counted as the
    LM loss counts them: the Trainer's ``count_fn`` that weighs LM micro-batches by their tokens."""
    return (shifted_targets(batch["input_ids"], batch["attention_mask"]) != -100).sum()


def lm_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int = -100,
    chunk_size: int = 256,
) -> torch.Tensor:
    """Mean cross-entropy of ``hidden @ weight.T`` against ``targets``, chunk by chunk.

    ``hidden`` is (B, T, d) or (N, d), ``targets`` the matching (B, T) or (N,)
    token ids with ``ignore_index`` for positions that do not count (padding,
    prompts). Shift before calling: ``lm_loss(h[:, :-1], W, ids[:, 1:])``.
    The full (N, V) logits are never held at once, in forward or backward.
    Gradients flow to both ``hidden`` and ``weight`` (the tied embedding); under ``torch.no_grad()``
    only the loss is computed (no gradient products, no (V, d) buffer).
    """
    if hidden.shape[:-1] != targets.shape:
        raise ValueError(f"hidden {tuple(hidden.shape)} and targets {tuple(targets.shape)} do not match")
    if hidden.size(-1) != weight.size(1):
        raise ValueError(f"hidden width {hidden.size(-1)} != weight width {weight.size(1)}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    h = hidden.reshape(-1, hidden.size(-1))  # (N, d)
    if not torch.is_grad_enabled():  # evaluation: the Function sees requires_grad inputs even under
        h, weight = h.detach(), weight.detach()  # no_grad, and would build both gradients in forward
    return _ChunkedLinearCrossEntropy.apply(h, weight, targets.reshape(-1), ignore_index, chunk_size)
