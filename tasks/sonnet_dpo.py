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
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from engine.data import DataFormatError
from engine.trainer import EvalFn, TrainConfig
from methods.dpo import build_pairs, encode_pair, frozen_reference, make_dpo_loss_fn, pair_collator
from models.generation_config import GenerationConfig
from tasks.common import fit_task
from tasks.lm import EOS_TEXT
from tasks.metrics import chrf
from tasks.sonnet_eval import sonnet_prompt
from tasks.sonnet_form import form_score, sonnet_lines

RANKINGS = ("chrf", "form")
PAIRINGS = ("best_worst", "all")


@dataclass(frozen=True)
class DpoSettings:
    """A DPO run (the ``--dpo_*`` flags): ``samples`` completions per prompt, drawn with ``sampling``
    (the sampling settings, whatever ``--decoding`` says), ranked by ``rank``, paired by ``pairs``
    where their scores differ by more than ``min_margin``; ``beta`` bounds how far the policy may
    leave the reference."""

    sampling: GenerationConfig
    samples: int = 4
    rank: str = "chrf"
    pairs: str = "best_worst"
    min_margin: float = 0.0
    beta: float = 0.1


def disable_dropout(model: nn.Module) -> nn.Module:
    """Every dropout of ``model`` set to 0 (``nn.Dropout`` modules, LoRA's included, and the
    attention-probability dropout that ``modules.attention`` applies functionally)."""
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
        if isinstance(getattr(m, "attn_dropout", None), float):
            m.attn_dropout = 0.0
    return model


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
    candidates = sample_completions(complete, prompts, settings.samples)
    scores = score_completions(prompts, continuations, candidates, settings.rank)
    pairs = build_pairs(prompts, candidates, scores, strategy=settings.pairs, min_margin=settings.min_margin)
    if not pairs:
        raise DataFormatError(source, None, f"no preference pairs from {len(prompts)} prompts x "
                                            f"{settings.samples} samples: every prompt's candidates scored "
                                            "alike; sample more (--dpo_samples) or lower --dpo_min_margin")
    mean_margin = sum(p.margin for p in pairs) / len(pairs)
    print(f"DPO: {len(pairs)} pairs from {len(prompts)} prompts x {settings.samples} samples, ranked by "
          f"{settings.rank} (mean margin {mean_margin:.3f}), beta {settings.beta}")
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


__all__ = ["PAIRINGS", "RANKINGS", "DpoSettings", "disable_dropout", "dpo_fine_tune", "prompts_and_continuations",
           "sample_completions", "score_completions"]
