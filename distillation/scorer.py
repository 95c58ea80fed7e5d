"""The entailment scorer of the filters: P("yes") of our cloze paraphrase model
for ordered (s1, s2) pairs, as a plain function (``filters.ScoreFn``).

The model is a checkpoint trained by ``paraphrase_detection.py`` (``--scorer``, read by
``tasks.restore`` and scored by ``tasks.paraphrase``),
or, without one, GPT-2 asked the cloze question zero-shot (``--model_size``,
``--random_init``: what the tiny end-to-end test uses).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

from distillation.filters import ScoreFn
from models.heads import ClozeParaphraseScorer
from tasks.common import build_body, pick_device
from tasks.paraphrase import score_paraphrase_pairs
from tasks.restore import restore_task_model
from tasks.settings import TaskSettings


def add_scorer_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--scorer", default=None,
                   help="paraphrase classifier checkpoint from paraphrase_detection.py (default: GPT-2 "
                        "zero-shot from --model_size)")


def cloze_score_fn(model: ClozeParaphraseScorer, tokenizer: Any, batch_size: int = 64, max_length: int = 0) -> ScoreFn:
    """A ScoreFn over a ``ClozeParaphraseScorer``, through the paraphrase task's own
    scoring (same prompt, features and batching as it trains and predicts with)."""

    def score(pairs: Sequence[tuple[str, str]]) -> list[float]:
        return score_paraphrase_pairs(model, tokenizer, pairs, batch_size, max_length or None) if pairs else []

    return score


def load_scorer(settings: TaskSettings, scorer: str | None) -> ScoreFn:
    """The ScoreFn of the paraphrase model file ``scorer`` (``--scorer``), or of the zero-shot
    model of ``settings.model``, on the run's device, in batches of ``--batch_size``."""
    device = pick_device(settings.run.use_gpu, settings.run.device)
    if scorer:
        restored = restore_task_model(scorer, "paraphrase", settings, device=device)
        model, tokenizer = restored.model, restored.tokenizer
    else:
        gpt, tokenizer = build_body(settings.model)
        model = ClozeParaphraseScorer(gpt)
    model.to(device).eval()
    return cloze_score_fn(model, tokenizer, settings.data.batch_size, settings.data.max_length)
