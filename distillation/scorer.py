"""The entailment scorer of the filters: P("yes") of our cloze paraphrase model
for ordered (s1, s2) pairs, as a plain function (``filters.ScoreFn``).

The model is a checkpoint trained by ``paraphrase_detection.py`` (``--scorer``, read and
scored by ``tasks.paraphrase``),
or, without one, GPT-2 asked the cloze question zero-shot (``--model_size``,
``--random_init``: what the tiny end-to-end test uses).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from distillation.filters import ScoreFn


def add_scorer_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--scorer", default=None,
                   help="paraphrase classifier checkpoint from paraphrase_detection.py (default: GPT-2 "
                        "zero-shot from --model_size)")


def cloze_score_fn(model, tokenizer, batch_size: int = 64, max_length: int = 0) -> ScoreFn:
    """A ScoreFn over a ``ClozeParaphraseScorer``, through the paraphrase task's own
    scoring (same prompt, features and batching as it trains and predicts with)."""
    from tasks.paraphrase import score_paraphrase_pairs

    def score(pairs: Sequence[tuple[str, str]]) -> list[float]:
        return score_paraphrase_pairs(model, tokenizer, pairs, batch_size, max_length or None) if pairs else []

    return score


def scorer_from_args(args: argparse.Namespace) -> ScoreFn:
    """The ScoreFn ``--scorer`` (or the zero-shot model) gives, on ``--device``."""
    from cli.common import build_from_args, pick_device
    from models.heads import ClozeParaphraseScorer
    from models.loading import load_tokenizer

    device = pick_device(args.use_gpu, args.device)
    if args.scorer:
        from tasks.paraphrase import load_paraphrase_scorer

        model, tokenizer = load_paraphrase_scorer(args.scorer, device), load_tokenizer(args.tokenizer)
    else:
        gpt, tokenizer = build_from_args(args)
        model = ClozeParaphraseScorer(gpt)
    model.to(device).eval()
    return cloze_score_fn(model, tokenizer, args.batch_size, args.max_length)
