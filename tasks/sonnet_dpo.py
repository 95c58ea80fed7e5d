"""DPO on sonnets (``sonnet_generation.py --dpo``): the handout's preference-tuning extension.

From a fine-tuned sonnet model: prompt it with the first 3 lines of each training sonnet,
sample ``--dpo_samples`` completions per prompt, score each (``--dpo_rank chrf``: chrF against
the sonnet's true continuation; ``form``: ``tasks.sonnet_form.form_score`` of the lines
generated after the prompt), pair the better against the worse (``methods.dpo.build_pairs``), and train the model
with the DPO loss against a frozen copy of itself (``--dpo_beta``) on the shared Trainer. The
pairs are written to ``<run>/dpo_pairs.jsonl``.

Dropout is switched off in the policy (and the reference is in eval mode), so at the first
step the policy equals the reference and the loss is exactly log 2; with dropout the two
would disagree from the start and the implicit reward would be noise. Candidates are sampled
with the sampling settings (``--temperature``, ``--top_p``, ``--top_k``) whatever ``--decoding``
says: pairs need different completions; ``--decoding`` applies to the prediction files.
Completions that are empty (the model ended the sonnet at once) are dropped. A completion the
model ended with EOS keeps the EOS text at its end (``continue_prompts(keep_eos=True)``), so DPO
scores the ending too (``methods.dpo.encode_completion``) while ranking ignores it; one cut off at
``max_new_tokens`` has none.

``--dpo_rejected shuffled|truncated`` makes the pairs without sampling (``corruption_pairs``): the
chosen side is the training sonnet's true continuation, the rejected side the same lines shuffled,
or cut after a random number of lines; both end with the EOS text, so a truncated sonnet teaches
the model not to end early. The random draws come from ``random.Random(seed)`` (``--seed``).
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from engine.data import DataFormatError
from engine.trainer import EvalFn, TrainConfig
from methods.dpo import (
    DEFAULT_BETA,
    PreferencePair,
    build_pairs,
    disable_dropout,
    encode_pair,
    frozen_reference,
    make_dpo_loss_fn,
    pair_collator,
)
from models.generation_config import GenerationConfig
from tasks.common import fit_task
from tasks.lm import EOS_TEXT
from tasks.metrics import chrf
from tasks.sonnet_eval import sonnet_prompt
from tasks.sonnet_form import form_score, sonnet_lines

RANKINGS = ("chrf", "form")
PAIRINGS = ("best_worst", "all")
REJECTED = ("sampled", "shuffled", "truncated")  # sampled and ranked (today's), or a corrupted true sonnet


@dataclass(frozen=True)
class DpoSettings:
    """A DPO run (the ``--dpo_*`` flags): ``samples`` completions per prompt, drawn with ``sampling``
    (the sampling settings, whatever ``--decoding`` says), ranked by ``rank``, paired by ``pairs``
    where their scores differ by more than ``min_margin``; ``beta`` bounds how far the policy may
    leave the reference. ``rejected`` other than ``sampled`` makes the pairs by corrupting the true
    continuation (``corruption_pairs``, drawn with ``seed``) and samples nothing."""

    sampling: GenerationConfig
    samples: int = 4
    rank: str = "chrf"
    pairs: str = "best_worst"
    min_margin: float = 0.0
    beta: float = DEFAULT_BETA
    rejected: str = "sampled"  # REJECTED: sampled and ranked, or the true continuation corrupted
    seed: int = 11711  # the draws of the corruptions


def prompts_and_continuations(texts: Sequence[str]) -> tuple[list[str], list[str]]:
    """(prompt, true continuation) of each training sonnet longer than its prompt: the first 3
    lines, and the text after them."""
    prompts, rest = [], []
    for t in texts:
        p = sonnet_prompt(t)
        tail = t.strip()[len(p):]
        if tail.strip():
            prompts.append(p)
            rest.append(tail)
    return prompts, rest


def sample_completions(complete: Callable[[Sequence[str]], list[str]], prompts: Sequence[str],
                       n: int) -> list[list[str]]:
    """``n`` sampled completions (the text after the prompt, with the EOS text where the model
    ended it) of each prompt, in one batched decode of every prompt repeated ``n`` times; empty
    completions dropped."""
    texts = complete([p for p in prompts for _ in range(n)])
    out = []
    for i, p in enumerate(prompts):
        rows = texts[i * n:(i + 1) * n]
        out.append([t[len(p):] for t in rows if t.startswith(p) and _text(t[len(p):]).strip()])
    return out


def _text(completion: str) -> str:
    """A completion without the EOS text that marks it finished: what ranking reads."""
    return completion.removesuffix(EOS_TEXT)


def chrf_scores(candidates: Sequence[str], reference: str) -> list[float]:
    """Each candidate's chrF (sacrebleu, 0-100) against the one true continuation: the ranking
    signal the handout suggests for sonnet DPO."""
    return [chrf([c], [reference]) for c in candidates]


def score_completions(prompts: Sequence[str], continuations: Sequence[str], candidates: Sequence[Sequence[str]],
                      rank: str) -> list[list[float]]:
    """Each candidate's score (higher is better): chrF against the true continuation, or the
    form score of the candidate's lines after the prompt (which they rhyme with)."""
    if rank not in RANKINGS:
        raise ValueError(f"rank must be one of {RANKINGS}, got {rank!r}")
    if rank == "chrf":
        return [chrf_scores([_text(x) for x in c], ref) if c else []
                for c, ref in zip(candidates, continuations, strict=True)]
    return [[form_score(p + _text(c), len(sonnet_lines(p))) for c in cs]
            for p, cs in zip(prompts, candidates, strict=True)]


def corrupt(text: str, kind: str, rng: random.Random) -> str | None:
    """``text`` (a continuation: leading newlines, then lines) with its lines shuffled into another
    order, or cut after 1 .. n-1 of its n lines; None where no different text can be made (a
    single line; to shuffle, lines all alike)."""
    if kind not in REJECTED[1:]:
        raise ValueError(f"kind must be one of {REJECTED[1:]}, got {kind!r}")
    body = text.lstrip("\n")
    lead, lines = text[:len(text) - len(body)], body.rstrip("\n").split("\n")
    if len(lines) < 2:
        return None
    if kind == "truncated":
        return lead + "\n".join(lines[:rng.randint(1, len(lines) - 1)])
    if len(set(lines)) < 2:
        return None
    order = list(range(len(lines)))
    while [lines[i] for i in order] == lines:  # a shuffle that changes the text (lines not all alike)
        rng.shuffle(order)
    return lead + "\n".join(lines[i] for i in order)


def corruption_pairs(prompts: Sequence[str], continuations: Sequence[str], kind: str,
                     seed: int) -> list[PreferencePair]:
    """One pair per prompt: its true continuation chosen (score 1), the continuation corrupted by
    ``kind`` rejected (score 0), both ending with the EOS text; prompts whose continuation cannot be
    corrupted are skipped. The same inputs and seed give the same pairs."""
    rng, pairs = random.Random(seed), []
    for i, (prompt, rest) in enumerate(zip(prompts, continuations, strict=True)):
        bad = corrupt(rest, kind, rng)
        if bad is not None:
            pairs.append(PreferencePair(i, prompt, rest + EOS_TEXT, bad + EOS_TEXT, 1.0, 0.0))
    return pairs


def preference_pairs(prompts: Sequence[str], continuations: Sequence[str],
                     complete: Callable[[Sequence[str]], list[str]], settings: DpoSettings) -> list[PreferencePair]:
    """The run's pairs: sampled, ranked and paired (``rejected`` ``sampled``), or by corruption."""
    if settings.rejected != "sampled":
        return corruption_pairs(prompts, continuations, settings.rejected, settings.seed)
    candidates = sample_completions(complete, prompts, settings.samples)
    scores = score_completions(prompts, continuations, candidates, settings.rank)
    return build_pairs(prompts, candidates, scores, strategy=settings.pairs, min_margin=settings.min_margin)


def dpo_fine_tune(
    model: nn.Module,
    tokenizer: Any,
    train_texts: Sequence[str],
    complete: Callable[[Sequence[str]], list[str]],
    eval_fn: EvalFn | None,
    config: TrainConfig,
    settings: DpoSettings,
    *,
    batch_size: int,
    max_length: int = 0,
    source: str | Path = "training sonnets",
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Sample, rank and pair completions of the training prompts with ``model`` (``complete``:
    prompts -> sampled full texts), then DPO-train it in place against a frozen copy; leaves
    the best epoch's weights in ``model``. ``batch_size`` pairs per step, each cut to
    ``max_length`` tokens (0: the context). Returns the best dev metrics."""
    disable_dropout(model)
    reference = frozen_reference(model)
    prompts, continuations = prompts_and_continuations(train_texts)
    pairs = preference_pairs(prompts, continuations, complete, settings)
    if not pairs and settings.rejected != "sampled":
        raise DataFormatError(source, None, f"no preference pairs: none of {len(prompts)} true continuations "
                                            f"has two different lines to make {settings.rejected}")
    if not pairs:
        raise DataFormatError(source, None, f"no preference pairs from {len(prompts)} prompts x "
                                            f"{settings.samples} samples: every prompt's candidates scored "
                                            "alike; sample more (--dpo_samples) or lower --dpo_min_margin")
    mean_margin = sum(p.margin for p in pairs) / len(pairs)
    if settings.rejected == "sampled":
        print(f"DPO: {len(pairs)} pairs from {len(prompts)} prompts x {settings.samples} samples, ranked by "
              f"{settings.rank} (mean margin {mean_margin:.3f}), beta {settings.beta}")
    else:
        print(f"DPO: {len(pairs)} pairs from {len(prompts)} prompts, each true continuation against it "
              f"{settings.rejected}, beta {settings.beta}")
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "dpo_pairs.jsonl", "w") as f:
        for p in pairs:
            f.write(json.dumps(p.__dict__) + "\n")
    max_length = max_length or model.gpt.config.max_position_embeddings
    try:
        feats = [encode_pair(tokenizer, p, max_length) for p in pairs]
    except ValueError as e:  # a prompt that fills --max_length leaves nothing to score
        raise DataFormatError(source, None, f"{e}; raise --max_length") from None
    best, _ = fit_task(model, make_dpo_loss_fn(reference, settings.beta), feats,
                       pair_collator(tokenizer.pad_token_id), eval_fn, config, batch_size=batch_size,
                       extra=extra)
    return best


__all__ = ["PAIRINGS", "RANKINGS", "REJECTED", "DpoSettings", "corrupt", "corruption_pairs",
           "dpo_fine_tune", "preference_pairs", "prompts_and_continuations", "sample_completions",
           "score_completions"]
