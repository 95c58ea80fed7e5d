"""Contrastive search (Su et al. 2022, "A Contrastive Framework for Neural Text
Generation"), the strategy ``models.generation.generate`` runs when
``penalty_alpha > 0`` and ``top_k > 1``.

Why it is written this way: ``transformers`` 5 no longer ships contrastive search
in its core, so it follows the paper (tests/test_generation.py checks it step by
step); the one-token-per-step loop of ``models.decoding`` drives it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from models.decoding import DecoderLM, Runner, one_token_per_step
from models.generation_config import GenerationConfig


class Contrastive:
    """Su et al. 2022: among the top-k tokens pick the one maximising
    (1 - alpha) * p(token) - alpha * max cosine(h_token, h_previous).

    With the cache, every prompt keeps k rows that share their history; the k
    candidates are scored in one batched step and the chosen row's new key/value
    is copied to its siblings (one position, not the whole cache)."""

    def __init__(self, runner: Runner, prompt_hidden: torch.Tensor, k: int, alpha: float) -> None:
        B, P, d = prompt_hidden.shape
        self.runner, self.k, self.alpha, self.B = runner, k, alpha, B
        self.context = prompt_hidden.new_zeros(B, runner.total, d)  # hidden states of the tokens so far
        self.context[:, :P] = prompt_hidden
        self.valid = torch.ones(B, runner.total, dtype=torch.bool, device=prompt_hidden.device)
        if runner.mask is not None:
            self.valid[:, :P] = runner.mask[:, :P].bool()
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
        if self.runner.cache is not None:  # siblings take the chosen candidate's key/value at this position
            self.runner.cache.copy_last_position((self.rows * k + best).repeat_interleave(k))
        return cand[self.rows, best], self.runner.logits(chosen)


def contrastive_search(model: DecoderLM, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                       config: GenerationConfig, generator: torch.Generator | None = None) -> torch.Tensor:
    """Contrastive search over ``config.top_k`` candidates with penalty ``config.penalty_alpha``
    (``top_k`` picks candidates here, so it does not filter the scores)."""
    return one_token_per_step(
        model, input_ids, attention_mask, config,
        lambda runner, hidden: Contrastive(runner, hidden, config.top_k, config.penalty_alpha).select,
        filter_top_k=False,
    )
