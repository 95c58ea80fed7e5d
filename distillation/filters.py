"""The Impossible Distillation filters (Jung et al. 2023, section 2.2).

Candidate pairs are continuations of the same context; a pair is kept only if
it passes, in this order (cheap tests first, so the classifier scores only
what survives them):

1. ``length``: character-length ratio len(s2) / len(s1) within [0.8, 1.5], in the
   pair's own order (s1 the source, s2 its rewrite; candidates of one context keep the
   order of generation). Trying both orders would widen the window to [0.667, 1.5]
   and leave ``min_ratio`` without effect;
2. ``numbers``: both sentences state the same numbers (``distillation.numbers``);
3. ``copy``: ROUGE-L F at most 0.75, so the pair is a rewrite, not a copy (the
   ``rouge-score`` package, the reference implementation, with its tokenizer);
4. ``entailment``: P(paraphrase) from our classifier at least a threshold in
   *both* directions (bidirectional entailment);
5. ``dedup``: pairs that entail each other are one group (sentences joined by
   kept pairs, connected components); one pair per group is kept, the one with
   the lowest ROUGE-L, i.e. the most diverse rewrite.

Pairs that reach the entailment test and fail it are the generated negatives.
The classifier enters as a plain function, so tests pass a hand-made scorer.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from functools import lru_cache

from distillation.numbers import numbers_match

# P(s2 is a paraphrase of s1) for each ordered (s1, s2), in order.
ScoreFn = Callable[[Sequence[tuple[str, str]]], Sequence[float]]


@dataclass
class Pair:
    context_id: str
    s1: str
    s2: str
    rouge_l: float = -1.0  # ROUGE-L F of (s2, s1), set by the copy filter
    forward: float = -1.0  # P(paraphrase | s1 -> s2), set by the entailment filter
    backward: float = -1.0  # P(paraphrase | s2 -> s1)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class FilterConfig:
    min_ratio: float = 0.8
    max_ratio: float = 1.5
    max_rouge: float = 0.75
    threshold: float = 0.75


@dataclass
class FilterResult:
    kept: list[Pair]
    negatives: list[Pair]  # reached the entailment test and failed it
    counts: dict[str, int] = field(default_factory=dict)  # "candidates", "removed_by_<filter>", "kept"
    scored: list[Pair] = field(default_factory=list)  # every pair the classifier scored


def length_ratio_ok(s1: str, s2: str, min_ratio: float = 0.8, max_ratio: float = 1.5) -> bool:
    """len(s2) / len(s1) in [min_ratio, max_ratio]: a paraphrase neither drops
    half the content nor pads it out."""
    if not s1:
        return False
    return min_ratio <= len(s2) / len(s1) <= max_ratio


@lru_cache(maxsize=1)
def _rouge_l_scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"])


def rouge_f(s1: str, s2: str) -> float:
    """ROUGE-L F of s2 against s1 (symmetric in F) by ``rouge-score``, whose tokenizer lowercases
    and drops punctuation: "Is Python good?" and "Is Python good." are the copy they are (a
    whitespace split scored them 0.667, under the 0.75 bound)."""
    return _rouge_l_scorer().score(s1, s2)["rougeL"].fmeasure


def not_copy(s1: str, s2: str, max_rouge: float = 0.75) -> bool:
    return rouge_f(s1, s2) <= max_rouge


def entailment_scores(pairs: Sequence[Pair], score_fn: ScoreFn) -> None:
    """Fill ``forward`` and ``backward`` with one call on both directions."""
    if not pairs:
        return
    queries = [(p.s1, p.s2) for p in pairs] + [(p.s2, p.s1) for p in pairs]
    scores = list(score_fn(queries))
    if len(scores) != len(queries):
        raise ValueError(f"score function returned {len(scores)} scores for {len(queries)} pairs")
    n = len(pairs)
    for p, f, b in zip(pairs, scores[:n], scores[n:]):
        p.forward, p.backward = float(f), float(b)


def bidirectional_ok(p: Pair, threshold: float) -> bool:
    return p.forward >= threshold and p.backward >= threshold


def dedup(pairs: Sequence[Pair]) -> list[Pair]:
    """One pair per group of mutually entailing pairs: union-find over the
    sentences that kept pairs join; the lowest-ROUGE-L pair of each component
    survives (ties: first seen). Output keeps input order."""
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for p in pairs:
        parent[find(p.s1)] = find(p.s2)
    best: dict[str, int] = {}
    for i, p in enumerate(pairs):
        root = find(p.s1)
        if root not in best or p.rouge_l < pairs[best[root]].rouge_l:
            best[root] = i
    return [pairs[i] for i in sorted(best.values())]


def candidate_pairs(
    context_id: str, sentences: Iterable[str], max_pairs: int = 0, rng: random.Random | None = None
) -> list[Pair]:
    """All unordered pairs of distinct, non-empty sentences of one context
    (at most ``max_pairs``, a random subset, when it is positive)."""
    unique = list(dict.fromkeys(s.strip() for s in sentences if s.strip()))
    combos = list(itertools.combinations(unique, 2))
    if max_pairs > 0 and len(combos) > max_pairs:
        combos = (rng or random.Random(0)).sample(combos, max_pairs)
    return [Pair(context_id, a, b) for a, b in combos]


def apply_filters(candidates: Sequence[Pair], score_fn: ScoreFn, cfg: FilterConfig | None = None) -> FilterResult:
    """Run the five filters in order and count what each removed."""
    cfg = cfg or FilterConfig()
    counts = {"candidates": len(candidates)}
    survivors = [p for p in candidates if length_ratio_ok(p.s1, p.s2, cfg.min_ratio, cfg.max_ratio)]
    counts["removed_by_length"] = len(candidates) - len(survivors)

    before = len(survivors)
    survivors = [p for p in survivors if numbers_match(p.s1, p.s2)]
    counts["removed_by_numbers"] = before - len(survivors)

    before = len(survivors)
    for p in survivors:
        p.rouge_l = rouge_f(p.s1, p.s2)
    survivors = [p for p in survivors if p.rouge_l <= cfg.max_rouge]
    counts["removed_by_copy"] = before - len(survivors)

    entailment_scores(survivors, score_fn)
    scored = list(survivors)
    negatives = [p for p in survivors if not bidirectional_ok(p, cfg.threshold)]
    survivors = [p for p in survivors if bidirectional_ok(p, cfg.threshold)]
    counts["removed_by_entailment"] = len(negatives)

    before = len(survivors)
    survivors = dedup(survivors)
    counts["removed_by_dedup"] = before - len(survivors)
    counts["kept"] = len(survivors)
    return FilterResult(survivors, negatives, counts, scored)
