"""Contrastive search (Su et al. 2022, "A Contrastive Framework for Neural Text
Generation"), the strategy ``models.generation.generate`` runs when
``penalty_alpha > 0`` and ``top_k > 1``, with two variants some reports found better:

- ``contrastive_mean_sim``: the degeneration penalty is the *mean* cosine similarity of a
  candidate's hidden state to the context's, instead of the maximum (one near-duplicate
  position no longer dominates the penalty; the whole history counts).
- ``contrastive_dynamic_alpha``: alpha changes every step with the model's uncertainty,
  after Adaptive Contrastive Search (Garces Arias et al. 2024, "Adaptive Contrastive
  Search: Uncertainty-Guided Decoding for Open-Ended Text Generation", Findings of EMNLP
  2024, arXiv:2407.18698). ACS measures the entropy H_t of the next-token distribution,
  centres it on the median entropy of the earlier steps and scales it by the maximum
  entropy log|V|, and maps it through a sigmoid into alpha (and k). Here, per row:

      u_t     = (H_t - median(H_1 .. H_{t-1})) / log|V|        (u_1 = 0; lower median)
      alpha_t = sigmoid(logit(penalty_alpha) + q * u_t),       q = contrastive_alpha_sensitivity

  so ``penalty_alpha`` is alpha at median uncertainty (ACS's sigmoid centre is 0.5, i.e.
  ``penalty_alpha=0.5``); a step where the model is less sure than usual weighs the
  degeneration penalty more, a confident step weighs the model's probability more.
  Unlike ACS, k stays ``top_k`` (the candidates of all prompts are scored as one batch of
  fixed width), and H_t is the entropy of the processed scores (after repetition
  penalty / n-gram bans), the distribution candidates are drawn from.
- ``contrastive_alpha_min``: alpha follows the step instead, the "dynamic alpha" of the
  course's reports (R2): it rises linearly from ``contrastive_alpha_min`` at the first
  generated token to ``penalty_alpha`` at the last one (``max_new_tokens``), the same for
  every row, so the start of a text follows the model and the degeneration penalty grows
  as repetition becomes the risk:

      alpha_t = alpha_min + (penalty_alpha - alpha_min) * t / (max_new_tokens - 1),   t = 0, 1, ...

  (alpha_min for a single token). With ``contrastive_alpha_min == penalty_alpha`` it is
  the constant alpha of plain contrastive search, token for token.

Why it is written this way: ``transformers`` 5 no longer ships contrastive search
in its core, so it follows the paper (tests/test_generation.py checks it step by
step); the one-token-per-step loop of ``models.decoding`` drives it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from models.decoding import DecoderLM, Runner, one_token_per_step
from models.generation_config import GenerationConfig


def degeneration_penalty(cos: torch.Tensor, valid: torch.Tensor, mean: bool) -> torch.Tensor:
    """(B, k, T) cosine similarities of candidates to the context, ``valid`` (B, T) the
    context positions that count -> (B, k) penalty: their max (Su et al.) or mean."""
    if mean:
        return (cos * valid[:, None]).sum(-1) / valid.sum(-1, keepdim=True).clamp(min=1)
    return cos.masked_fill(~valid[:, None], float("-inf")).max(-1).values


class DynamicAlpha:
    """alpha_t of the module docstring, one per row, from the entropies seen so far."""

    def __init__(self, base: float, sensitivity: float, batch: int, steps: int, device: torch.device) -> None:
        self.logit, self.q = math.log(base) - math.log1p(-base), sensitivity
        self.history = torch.zeros(batch, steps, device=device)  # entropies H_1 .. H_{t-1}
        self.t = 0

    def __call__(self, scores: torch.Tensor) -> torch.Tensor:
        """(B, V) processed scores -> (B, 1) alpha for this step."""
        entropy = torch.special.entr(scores.float().softmax(-1)).sum(-1)  # (B,), 0 log 0 = 0
        u = torch.zeros_like(entropy)
        if self.t > 0:
            u = (entropy - self.history[:, : self.t].median(-1).values) / math.log(scores.size(-1))
        self.history[:, self.t] = entropy
        self.t += 1
        return torch.sigmoid(self.logit + self.q * u)[:, None]


class LinearAlpha:
    """alpha_t of the linear schedule (module docstring): ``alpha_min`` at the first generated token,
    ``alpha_max`` at token ``steps`` (and after)."""

    def __init__(self, alpha_min: float, alpha_max: float, steps: int) -> None:
        self.low, self.high, self.steps, self.t = alpha_min, alpha_max, steps, 0

    def __call__(self, scores: torch.Tensor) -> float:
        """This step's alpha (the same for every row; ``scores`` is not read)."""
        share = min(self.t / (self.steps - 1), 1.0) if self.steps > 1 else 0.0
        self.t += 1
        return self.low + (self.high - self.low) * share


class Contrastive:
    """Su et al. 2022: among the top-k tokens pick the one maximising
    (1 - alpha) * p(token) - alpha * max cosine(h_token, h_previous)
    (or the mean cosine, or a per-step alpha, by uncertainty or by step: see the module docstring).

    With the cache, every prompt keeps k rows that share their history; the k
    candidates are scored in one batched step and the chosen row's new key/value
    is copied to its siblings (one position, not the whole cache)."""

    def __init__(self, runner: Runner, prompt_hidden: torch.Tensor, config: GenerationConfig) -> None:
        B, P, d = prompt_hidden.shape
        self.runner, self.k, self.B = runner, config.top_k, B
        self.mean_sim = config.contrastive_mean_sim
        self.alpha: float | DynamicAlpha | LinearAlpha = config.penalty_alpha
        if config.contrastive_alpha_min is not None:
            self.alpha = LinearAlpha(config.contrastive_alpha_min, config.penalty_alpha, config.max_new_tokens)
        if config.contrastive_dynamic_alpha:
            self.alpha = DynamicAlpha(config.penalty_alpha, config.contrastive_alpha_sensitivity, B,
                                      config.max_new_tokens, prompt_hidden.device)
        self.context = prompt_hidden.new_zeros(B, runner.total, d)  # hidden states of the tokens so far
        self.context[:, :P] = prompt_hidden
        self.valid = torch.ones(B, runner.total, dtype=torch.bool, device=prompt_hidden.device)
        if runner.mask is not None:
            self.valid[:, :P] = runner.mask[:, :P].bool()
        runner.expand(self.k)
        self.rows = torch.arange(B, device=prompt_hidden.device)

    def select(self, scores: torch.Tensor, seqs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Next token (B,) and the logits (B, V) that follow it."""
        B, k, cur = self.B, self.k, seqs.size(1)
        alpha = self.alpha(scores) if callable(self.alpha) else self.alpha  # a number or (B, 1)
        probs, cand = scores.softmax(-1).topk(k, dim=-1)  # (B, k)
        if self.runner.use_cache:
            h = self.runner.step(cand.reshape(-1, 1), cur + 1)  # (B*k, d)
        else:
            h = self.runner.step(torch.cat([seqs.repeat_interleave(k, 0), cand.reshape(-1, 1)], 1))
        h = h.view(B, k, -1)
        ctx = F.normalize(self.context[:, :cur], dim=-1)  # (B, cur, d)
        cos = torch.einsum("bkd,btd->bkt", F.normalize(h, dim=-1), ctx)  # (B, k, cur)
        penalty = degeneration_penalty(cos, self.valid[:, :cur], self.mean_sim)  # (B, k)
        score = (1.0 - alpha) * probs - alpha * penalty  # (B, k)
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
        lambda runner, hidden: Contrastive(runner, hidden, config).select,
        filter_top_k=False,
    )
