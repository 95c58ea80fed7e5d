"""Judging sonnet models beyond chrF: the handout's held-out perplexity, and the sonnet form.

chrF of sampled sonnets is noisy (a dozen dev sonnets, one sample each) and blind to form.
The handout's metric for this task is the held-out cross-entropy of the true sonnets, which
needs no decoding and has no sampling noise; the form metrics (``tasks.sonnet_form``: line
count, syllables per line, ABAB CDCD EFEF GG rhyme) say whether a generated text is a sonnet
at all. ``evaluate_sonnets`` gives all three for one model, each epoch (the Trainer logs them to
``metrics.jsonl``) and at the end of a run; ``write_form_report`` leaves the final files' form
in the run folder (``form.json``).

``split_train`` is the validation split of ``--train_size``: a seeded random fraction of the
training sonnets trains, the rest validates (prompt: the first lines, reference and loss: the
whole sonnet), so that picking the best epoch never looks at the dev sonnets.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from engine.data import PadCollator, make_loader
from tasks.lm import held_out_loss, sonnet_features
from tasks.metrics import chrf
from tasks.sonnet_form import FormSummary, summarize_form

PROMPT_LINES = 3  # the course's prompts are the first 3 lines of a sonnet
EARLY_STOP_METRICS = {"chrf": "max", "loss": "min"}  # --early_stop_metric -> Trainer mode

Complete = Callable[[nn.Module, Sequence[str]], list[str]]  # (model, prompts) -> full sonnet texts


def sonnet_prompt(text: str, num_lines: int = PROMPT_LINES) -> str:
    """The first ``num_lines`` lines of a sonnet, as the course's prompt files hold them."""
    return "\n".join(text.strip().splitlines()[:num_lines])


def split_train(texts: Sequence[str], train_size: float, seed: int) -> tuple[list[str], list[str]]:
    """(train, validation): a random ``train_size`` fraction of ``texts`` (rounded, drawn with
    ``random.Random(seed)``, so a seed always gives the same split) and the rest, both in file
    order. ``train_size`` 1 keeps every text for training and none for validation."""
    if not 0 < train_size <= 1:
        raise ValueError(f"train_size must be in (0, 1], got {train_size}")
    if train_size == 1:
        return list(texts), []
    n_train = round(len(texts) * train_size)
    if not 0 < n_train < len(texts):
        raise ValueError(f"train_size {train_size} of {len(texts)} sonnets leaves {n_train} to train and "
                         f"{len(texts) - n_train} to validate; both need at least one")
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    chosen = set(order[:n_train])
    return ([t for i, t in enumerate(texts) if i in chosen], [t for i, t in enumerate(texts) if i not in chosen])


def loss_loader(texts: Sequence[str], tokenizer: Any, max_length: int, batch_size: int) -> Any:
    """Batches of whole sonnets for ``tasks.lm.held_out_loss``, tokenised as training tokenises
    them (an EOS appended, so the loss includes knowing where a sonnet ends)."""
    feats = sonnet_features(texts, tokenizer, max_length, "held-out sonnets")
    return make_loader(feats, PadCollator(tokenizer.pad_token_id), batch_size, shuffle=False)


def form_metrics(texts: Sequence[str], prompt_lines: int = PROMPT_LINES) -> dict[str, float]:
    """The form summary of generated sonnets as flat ``form_*`` numbers, for metric logs: the
    syllables and rhymes of the lines after the ``prompt_lines`` given ones, the line counts of
    the whole sonnets (``tasks.sonnet_form``)."""
    summary = summarize_form(texts, prompt_lines).as_dict()
    return {f"form_{k}": float(v) for k, v in summary.items() if k != "num_sonnets"}


def evaluate_sonnets(model: nn.Module, complete: Complete, prompts: Sequence[str], references: Sequence[str],
                     loader: Any) -> dict[str, float]:
    """chrF of the completed ``prompts`` against ``references``, the held-out loss and perplexity
    of the sonnets in ``loader`` (``loss_loader``), and the form of the completions."""
    texts = complete(model, prompts)
    return {"chrf": chrf(texts, list(references)), **held_out_loss(model, loader), **form_metrics(texts)}


def form_line(name: str, summary: FormSummary) -> str:
    """One printed line: a form summary in words."""
    return (f"{name} form: {summary.mean_lines:.1f} lines in the whole sonnet ({summary.frac_14_lines:.0%} with 14); "
            f"generated lines: {summary.mean_syllables:.1f} syllables/line "
            f"(mean |syl - 10| {summary.mean_syllable_error:.2f}), rhyme adherence {summary.rhyme_adherence:.2f}")


def write_form_report(folder: str | Path | None, outputs: Mapping[str, Sequence[str]],
                      extra: Mapping[str, Any] | None = None, prompt_lines: int = PROMPT_LINES
                      ) -> dict[str, dict[str, float]]:
    """Print a form line per output (e.g. ``dev``, ``test``: sonnets whose first ``prompt_lines``
    lines were given, scored on the lines after them) and, given a run folder, write them with
    ``extra`` (e.g. dev chrF and perplexity) to ``<folder>/form.json``. Returns the summaries."""
    report = {}
    for name, texts in outputs.items():
        summary = summarize_form(texts, prompt_lines)
        print(form_line(name, summary))
        report[name] = summary.as_dict()
    if folder is not None:
        path = Path(folder) / "form.json"
        path.write_text(json.dumps({**(extra or {}), "form": report}, indent=2) + "\n")
        print(f"wrote {path}")
    return report


__all__ = ["EARLY_STOP_METRICS", "PROMPT_LINES", "evaluate_sonnets", "form_line", "form_metrics", "loss_loader",
           "sonnet_prompt", "split_train", "write_form_report"]
