"""Multi-task training of the cloze paraphrase scorer (report 002's weighted multi-task runs):
Quora beside auxiliary sentence-classification tasks (SST, CFIMDB, CoLA) in one run, through the
one Trainer (``engine.multitask``: batches drawn task by task, a loss weighted per task).

    python paraphrase_detection.py --multitask sst --task_sampling temperature --task_weights quora=1,sst=0.5

Each auxiliary task gets a linear head on the shared body's last-token state (as the classifier
task's head); Quora keeps its cloze answer through the LM head. Only the body is what the run
keeps: the saved model is the paraphrase scorer, the auxiliary heads are dropped with the run.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from engine.data import make_loader
from engine.multitask import MultiTaskLoader, TaskLossFn, WeightedTaskLoss, task_probabilities
from models.heads import ClozeParaphraseScorer
from tasks.course_data import sentiment_features
from tasks.quora_data import SHARED_DATA
from tasks.sentiment import DATASETS, NUM_LABELS, default_path, read_split

MAIN_TASK = "quora"
AUX_TASKS = DATASETS  # the sentence-classification tasks a paraphrase run can add


class MultiTaskModel(nn.Module):
    """The paraphrase scorer and one linear head per auxiliary task on its body. ``head`` names
    the parameters outside the body, which LoRA/prefix modes keep trainable."""

    head = ("heads",)

    def __init__(self, scorer: ClozeParaphraseScorer, num_labels: Mapping[str, int],
                 hidden_dropout_prob: float = 0.1) -> None:
        super().__init__()
        self.scorer = scorer
        self.dropout = nn.Dropout(hidden_dropout_prob)
        width = scorer.gpt.config.hidden_size
        self.heads = nn.ModuleDict({task: nn.Linear(width, n) for task, n in num_labels.items()})
        self.heads.to(next(scorer.parameters()).device)

    def forward(self, task: str, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, T) sentences of auxiliary ``task`` -> (B, num_labels) logits from the last real token."""
        last = self.scorer.gpt(input_ids, attention_mask)["last_token"]  # (B, d)
        return self.heads[task](self.dropout(last))


def check_tasks(aux: Sequence[str], weights: Mapping[str, float]) -> None:
    """Refuse an unknown auxiliary task, Quora named as one, or a weight for a task not trained."""
    unknown = [t for t in aux if t not in AUX_TASKS]
    if unknown:
        raise ValueError(f"unknown auxiliary task(s) {unknown}: choose from {', '.join(AUX_TASKS)}")
    extra = sorted(set(weights) - {MAIN_TASK, *aux})
    if extra:
        raise ValueError(f"loss weights for {extra}, which this run does not train (tasks: {MAIN_TASK}, "
                         f"{', '.join(aux)})")


def aux_features(aux: Sequence[str], tokenizer: Any, max_length: int, limit: int = 0) -> dict[str, list[dict]]:
    """The training sentences of each auxiliary task (the first ``limit``): its file in data/, or
    in ../shared/data where setup.sh has not copied it."""
    out = {}
    for task in aux:
        path = Path(default_path(task, "train"))
        rows = read_split(task, path if path.exists() else SHARED_DATA / path.name, limit=limit)
        out[task] = sentiment_features(rows, tokenizer, max_length, f"{task} train")
    return out


def aux_loss(task: str) -> TaskLossFn:
    """Cross-entropy of ``task``'s head on a batch of its sentences."""

    def loss(model: nn.Module, batch: Mapping[str, Any]) -> torch.Tensor:
        return F.cross_entropy(model(task, batch["input_ids"], batch["attention_mask"]).float(), batch["labels"])

    return loss


def multitask_training(
    scorer: ClozeParaphraseScorer,
    paraphrase_loss: TaskLossFn,
    features: Mapping[str, Sequence[dict[str, Any]]],
    collate: Callable[[list[dict[str, Any]]], dict[str, Any]],
    batch_size: int,
    *,
    num_workers: int = 0,
    group_by_length: bool = False,
    sampling: str = "proportional",
    temperature: float = 2.0,
    weights: Mapping[str, float] | None = None,
    hidden_dropout_prob: float = 0.1,
) -> tuple[MultiTaskModel, MultiTaskLoader, WeightedTaskLoss]:
    """(model, loader, loss) for ``fit_task``: ``features`` maps ``quora`` and each auxiliary task
    to its training examples, each task's batches made as a one-task run's (``batch_size``,
    ``num_workers``, ``group_by_length``); ``paraphrase_loss(scorer, batch)`` is the paraphrase run's loss."""
    aux = [t for t in features if t != MAIN_TASK]
    weights = dict(weights or {})
    check_tasks(aux, weights)
    model = MultiTaskModel(scorer, {t: NUM_LABELS[t] for t in aux}, hidden_dropout_prob)
    probs = task_probabilities({t: len(f) for t, f in features.items()}, sampling, temperature)
    # a task's loader restarts whenever it runs out: its worker processes are kept, not started again
    loaders = {t: make_loader(f, collate, batch_size, shuffle=True, num_workers=num_workers,
                              group_by_length=group_by_length, persistent_workers=num_workers > 0)
               for t, f in features.items()}
    losses: dict[str, TaskLossFn] = {MAIN_TASK: lambda m, b: paraphrase_loss(m.scorer, b)}
    losses.update({t: aux_loss(t) for t in aux})
    loss = WeightedTaskLoss(losses, weights)
    print("multi-task: " + ", ".join(f"{t} {len(f)} examples (p {probs[t]:.2f}, weight {loss.weights[t]:g})"
                                      for t, f in features.items()) + f"; {sampling} sampling")
    return model, MultiTaskLoader(loaders, probs), loss


__all__ = ["AUX_TASKS", "MAIN_TASK", "MultiTaskModel", "aux_features", "check_tasks", "multitask_training"]
