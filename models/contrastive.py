"""Contrastive search (Su et al. 2022, "A Contrastive Framework for Neural Text
Generation") for ``models.generation.generate`` (``penalty_alpha > 0`` and
``top_k > 1``).

Why it is written this way: ``transformers`` 5 no longer ships contrastive search
in its core, so it follows the paper (tests/test_generation.py checks it step by
step); the greedy loop of ``models.generation`` drives it one token at a time.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from models.generation import Runner


class Contrastive:
    """Su et al. 2022: among the top-k tokens pick the one maximising
    (1 - alpha) * p(token) - alpha * max cosine(h_token, h_previous).

    With the cache, every prompt keeps k rows that share their history; the k
    candidates are scored in one batched step and the chosen row's new key/value
    is copied to its siblings (one position, not the whole cache)."""

    def __init__(self, model, runner: Runner, prompt_hidden, attention_mask, k: int, alpha: float, total: int):
        B, P, d = prompt_hidden.shape
        self.model, self.runner, self.k, self.alpha, self.B = model, runner, k, alpha, B
        self.context = prompt_hidden.new_zeros(B, total, d)  # hidden states of the tokens so far
        self.context[:, :P] = prompt_hidden
        self.valid = torch.ones(B, total, dtype=torch.bool, device=prompt_hidden.device)
        if attention_mask is not None:
            self.valid[:, :P] = attention_mask.bool()
        runner.expand(k)
        self.rows = torch.arange(B, device=prompt_hidden.device)

    def select(self, scores: torch.Tensor, seqs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Next token (B,) and the logits (B, V) that follow it."""
        B, k, cur = self.B, self.k, seqs.size(1)
        probs, cand = scores.softmax(-1).topk(k, dim=-1)  # (B, k)
        if self.runner.use_cache:
            h = self.runner.step(cand.reshape(-1, 1), cur + 1)  # (B*k, d)
        else:
            h = self.runner.step(torch.cat([seqs.repeat_interleave(k, 0), cand.reshape(-1, 1)], 1))
        h = h.view(B, k, -1)
        ctx = F.normalize(self.context[:, :cur], dim=-1)  # (B, cur, d)
        cos = torch.einsum("bkd,btd->bkt", F.normalize(h, dim=-1), ctx)  # (B, k, cur)
        cos = cos.masked_fill(~self.valid[:, None, :cur], float("-inf"))
        score = (1.0 - self.alpha) * probs - self.alpha * cos.max(-1).values  # (B, k)
        best = score.argmax(-1)  # (B,)
        chosen = h[self.rows, best]  # (B, d)
        self.context[:, cur] = chosen
        cache = self.runner.cache
        if cache is not None:  # siblings take the chosen candidate's key/value at this position
            src = (self.rows * k + best).repeat_interleave(k)
            t = (cache.length - 1) % cache.k.size(3)  # the slot of this position (ring caches wrap around)
            cache.k[:, :, :, t] = cache.k[:, :, :, t].index_select(1, src)
            cache.v[:, :, :, t] = cache.v[:, :, :, t].index_select(1, src)
        return cand[self.rows, best], self.model.hidden_state_to_token(chosen).float()
