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
        # float32 without autocast: one logits buffer reused by every chunk (no allocation or
        # page faults per chunk); small chunks keep it in the last-level cache on CPU.
        plain = h.dtype == weight.dtype == torch.float32 and not torch.is_autocast_enabled(h.device.type)
        buf = torch.empty(min(chunk_size, N), weight.size(0), device=h.device) if plain else None
        for s in range(0, N, chunk_size):
            e = min(s + chunk_size, N)
            hc, t, w = h[s:e], safe_t[s:e], row_w[s:e]  # (c, d), (c,), (c,)
            if plain:
                logits = torch.mm(hc, weight.t(), out=buf[: e - s])  # (c, V)
            else:
                logits = (hc @ weight.t()).float()  # (c, V)
            rows = torch.arange(e - s, device=h.device)
            m = logits.amax(dim=-1)  # (c,)
            tgt = logits[rows, t]  # (c,)
            ex = logits.sub_(m[:, None]).exp_()  # (c, V) exp(logit - max), in place
            z = ex.sum(dim=-1)  # (c,) softmax normaliser
            loss = loss + ((m + z.log() - tgt) * w).sum()
            if not (need_h or need_w):
                continue
            # d loss / d logits = w * (ex / z - onehot) = (w / z) * (ex - z * onehot): subtract z at the
            # targets, and apply the row scale w / z on the thin (c, d) side of each matmul.
            ex[rows, t] -= z
            g = ex.to(h.dtype)
            r = (w / z)[:, None].to(h.dtype)  # (c, 1)
            if need_h:
                grad_h[s:e] = (g @ weight) * r  # (c, d)
            if need_w:
                if grad_w is None:
                    grad_w = (g.t() @ (hc * r)).float()  # (V, d)
                elif plain:
                    grad_w.addmm_(g.t(), hc * r)  # accumulate in place: no (V, d) temporary
                else:
                    grad_w += (g.t() @ (hc * r)).float()
        ctx.save_for_backward(
            grad_h if need_h else None,
            grad_w.to(weight.dtype) if need_w else None,
        )
        return loss

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):  # type: ignore[override]
        grad_h, grad_w = ctx.saved_tensors
        gh = grad_h * grad_out.to(grad_h.dtype) if grad_h is not None else None
        gw = grad_w * grad_out.to(grad_w.dtype) if grad_w is not None else None
        return gh, gw, None, None, None


def lm_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int = -100,
    chunk_size: int = 128,
) -> torch.Tensor:
    """Mean cross-entropy of ``hidden @ weight.T`` against ``targets``, chunk by chunk.

    ``hidden`` is (B, T, d) or (N, d), ``targets`` the matching (B, T) or (N,)
    token ids with ``ignore_index`` for positions that do not count (padding,
    prompts). Shift before calling: ``lm_loss(h[:, :-1], W, ids[:, 1:])``.
    The full (N, V) logits are never held at once, in forward or backward.
    Gradients flow to both ``hidden`` and ``weight`` (the tied embedding).
    """
    if hidden.shape[:-1] != targets.shape:
        raise ValueError(f"hidden {tuple(hidden.shape)} and targets {tuple(targets.shape)} do not match")
    if hidden.size(-1) != weight.size(1):
        raise ValueError(f"hidden width {hidden.size(-1)} != weight width {weight.size(1)}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    h = hidden.reshape(-1, hidden.size(-1))  # (N, d)
    return _ChunkedLinearCrossEntropy.apply(h, weight, targets.reshape(-1), ignore_index, chunk_size)
