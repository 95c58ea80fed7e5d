"""Minimum Bayes risk selection over a candidate pool: decode several candidates per
prompt with one or more strategies (the reports' "candidate ensemble + MBR") and keep
the consensus one, the candidate with the highest mean utility (chrF by default)
against the others.

A pool is written ``"beam:4,sample:8,contrastive:1"``: the 4 best beams, 8 samples and
the contrastive search output of every prompt, 13 candidates. ``CandidatePool.parse``
validates it once (unknown strategy, bad count, a name twice, several copies of a
deterministic strategy) before any model work. Each member decodes with the caller's
``GenerationConfig`` (length, EOS, stop condition, temperature, top-p, repetition
penalties...) changed only where its strategy needs it.

Why a module of its own: it is a layer above decoding (many ``generate`` rows in,
one chosen token list per prompt out, judged by a text-level utility such as chrF),
not a decoding strategy that ``generate`` dispatches to.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from sacrebleu.metrics import CHRF

from models.generation import generate, trim
from models.generation_config import GenerationConfig

POOL_STRATEGIES = ("greedy", "beam", "sample", "contrastive")
DETERMINISTIC = ("greedy", "contrastive")  # a second copy would add the same candidate again
CONTRASTIVE_ALPHA, CONTRASTIVE_K = 0.6, 4  # Su et al.'s settings, for a config that sets none
Utility = Callable[[str, str], float]  # (candidate, pseudo-reference) -> score, higher is better


@dataclass(frozen=True)
class CandidatePool:
    """Which strategies fill the pool and how many candidates each gives per prompt."""

    members: tuple[tuple[str, int], ...]

    @classmethod
    def parse(cls, spec: str) -> CandidatePool:
        """``"beam:4,sample:8,contrastive"`` (a missing count is 1); ValueError names the bad part."""
        members: list[tuple[str, int]] = []
        for part in (p.strip() for p in spec.split(",")):
            if not part:
                raise ValueError(f"candidate pool {spec!r}: empty entry; write e.g. 'beam:4,sample:8,contrastive:1'")
            name, _, count_text = part.partition(":")
            name = name.strip()
            if name not in POOL_STRATEGIES:
                raise ValueError(f"candidate pool {spec!r}: unknown strategy {name!r}; "
                                 f"use {', '.join(POOL_STRATEGIES)}")
            try:
                count = int(count_text) if count_text.strip() else 1
            except ValueError:
                raise ValueError(f"candidate pool {spec!r}: count {count_text!r} of {name} is not an integer") from None
            members.append((name, count))
        return cls(tuple(members))

    def __post_init__(self) -> None:
        names = [n for n, _ in self.members]
        if not names:
            raise ValueError("a candidate pool needs at least one strategy")
        for name, count in self.members:
            if name not in POOL_STRATEGIES:
                raise ValueError(f"candidate pool: unknown strategy {name!r}; use {', '.join(POOL_STRATEGIES)}")
            if names.count(name) > 1:
                raise ValueError(f"candidate pool: {name} is listed twice; give it once with the total count")
            if count < 1:
                raise ValueError(f"candidate pool: {name}:{count}: the count must be >= 1")
            if name in DETERMINISTIC and count != 1:
                raise ValueError(f"candidate pool: {name}:{count}: {name} decoding is deterministic, "
                                 f"so its count must be 1")

    @property
    def size(self) -> int:
        """Candidates per prompt."""
        return sum(count for _, count in self.members)

    def __str__(self) -> str:
        return ",".join(f"{name}:{count}" for name, count in self.members)


def member_config(config: GenerationConfig, name: str, count: int) -> GenerationConfig:
    """``config`` changed only where strategy ``name`` needs it, returning ``count`` rows per prompt
    (contrastive search keeps the config's ``penalty_alpha`` and ``top_k`` when they select it)."""
    off = dict(num_beams=1, num_return_sequences=1, do_sample=False, penalty_alpha=0.0,
               contrastive_dynamic_alpha=False, contrastive_alpha_min=None, on_token=None)  # candidates: not streamed
    if name == "greedy":
        return dataclasses.replace(config, **off)
    if name == "sample":
        return dataclasses.replace(config, **{**off, "do_sample": True, "num_return_sequences": count})
    if name == "beam":
        return dataclasses.replace(config, **{**off, "num_beams": max(count, 2), "num_return_sequences": count})
    alpha = config.penalty_alpha if config.penalty_alpha > 0 else CONTRASTIVE_ALPHA
    k = config.top_k if config.top_k > 1 else CONTRASTIVE_K
    return dataclasses.replace(config, **{**off, "penalty_alpha": alpha, "top_k": k,
                                          "contrastive_dynamic_alpha": config.contrastive_dynamic_alpha,
                                          "contrastive_alpha_min": config.contrastive_alpha_min})


@torch.no_grad()
def pool_candidates(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, pool: CandidatePool,
                    config: GenerationConfig, generator: torch.Generator | None = None) -> list[list[list[int]]]:
    """Per prompt, ``pool.size`` candidates as token lists (prompt included, padding and what
    follows EOS removed), in pool order."""
    B, P = input_ids.shape
    num_pad = [0] * B if attention_mask is None else (attention_mask == 0).sum(-1).tolist()
    out: list[list[list[int]]] = [[] for _ in range(B)]
    for name, count in pool.members:
        cfg = member_config(config, name, count)
        rows = generate(model, input_ids, attention_mask, config=cfg, generator=generator)  # (B * n, T)
        n = cfg.num_return_sequences
        for i in range(rows.size(0)):
            out[i // n].append(trim(rows[i], P, num_pad[i // n], cfg.eos_token_id))
    return out


def mbr_select(candidates: Sequence[str], utility: Utility) -> int:
    """Index of the candidate with the highest mean utility against the others
    (minimum Bayes risk with the candidates as pseudo-references); the first on a tie."""
    n = len(candidates)
    if n == 0:
        raise ValueError("mbr_select needs at least one candidate")
    if n == 1:
        return 0
    means = [sum(utility(c, r) for j, r in enumerate(candidates) if j != i) / (n - 1) for i, c in enumerate(candidates)]
    return max(range(n), key=means.__getitem__)


def chrf_utility(candidate: str, reference: str) -> float:
    """Sentence chrF (sacrebleu defaults, as the course grades: ``tasks.metrics.chrf`` of one pair)
    of one candidate against one other."""
    return float(CHRF().corpus_score([candidate], [[reference]]).score)


@torch.no_grad()
def mbr_pool_generate(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                      pool: CandidatePool | str, config: GenerationConfig, decode: Callable[[list[int]], str],
                      utility: Utility = chrf_utility, generator: torch.Generator | None = None) -> list[list[int]]:
    """Fill ``pool`` for every prompt and keep the candidate with the highest mean ``utility``
    against the others. Returns one token list per prompt (as ``pool_candidates``)."""
    pool = CandidatePool.parse(pool) if isinstance(pool, str) else pool
    chosen = []
    for group in pool_candidates(model, input_ids, attention_mask, pool, config, generator):
        chosen.append(group[mbr_select([decode(c) for c in group], utility)])
    return chosen


@torch.no_grad()
def mbr_generate(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                 num_candidates: int, decode: Callable[[list[int]], str], utility: Utility = chrf_utility,
                 generator: torch.Generator | None = None, **sample_kwargs) -> list[list[int]]:
    """MBR over ``num_candidates`` samples per prompt (the pool ``sample:N``); ``sample_kwargs``
    are ``generate``'s settings."""
    sample_kwargs.pop("do_sample", None)
    return mbr_pool_generate(model, input_ids, attention_mask, pool=CandidatePool((("sample", num_candidates),)),
                             config=GenerationConfig(**sample_kwargs), decode=decode, utility=utility,
                             generator=generator)
