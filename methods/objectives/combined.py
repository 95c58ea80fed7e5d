"""The one wrapper that turns a task's logits into its training loss with every regulariser its
``ObjectiveSettings`` ask for (``cli.common.add_objective_args`` has their flags).

A task gives ``logits_fn(model, batch) -> (B, C) logits`` (and, if its loss is not the
cross-entropy of ``batch["labels"]``, ``task_loss(logits, batch)``); the wiring is then::

    objective = build_objective(settings, logits_fn)             # the loss_fn for the Trainer
    Trainer(model, objective, ..., callbacks=objective.callbacks)

With every setting at its default the objective is exactly the task loss of one forward pass
(which is why a task without an objective asked for trains on that loss directly:
``ObjectiveSettings.enabled``).
Terms combine freely; one forward pass is shared wherever it can be (R-Drop's two passes are
also unsupervised SimCSE's two views, and the first is SMART's clean prediction).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from engine.trainer import Callback
from methods.objectives import LogitsFn, ObjectiveSettings, TaskLoss, cross_entropy_loss
from methods.objectives.contrastive import (
    Gather,
    PairViewCollator,
    add_pair_views,
    local,
    pair_views_loss,
    unsupervised_contrastive_loss,
)
from methods.objectives.rdrop import rdrop_loss
from methods.objectives.smart import (
    MomentumTeacher,
    adversarial_perturbation,
    find_body,
    proximal_loss,
    smoothness_loss,
)
from models.heads import pool


@contextlib.contextmanager
def body_outputs(model: nn.Module) -> Iterator[list[tuple[torch.Tensor, torch.Tensor | None]]]:
    """Within the block, every call of the GPT-2 body appends (last_hidden_state, attention_mask)
    to the yielded list: the sentence representation of a pass without asking the head for it."""
    seen: list[tuple[torch.Tensor, torch.Tensor | None]] = []

    def record(module: nn.Module, args: tuple, kwargs: dict, output: dict) -> None:
        mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
        seen.append((output["last_hidden_state"], mask))

    handle = find_body(model).register_forward_hook(record, with_kwargs=True)
    try:
        yield seen
    finally:
        handle.remove()


class Objective(Callback):
    """``loss_fn(model, batch)`` for the Trainer: the task loss plus the terms the settings switch
    on. Also a Trainer callback (pass ``objective.callbacks``) that keeps SMART's momentum teacher
    up to date and gives SimCSE the strategy's ``all_gather`` (its negatives come from every rank).
    ``last_terms`` holds the detached unweighted terms of the last call, for logs."""

    def __init__(self, settings: ObjectiveSettings, logits_fn: LogitsFn, task_loss: TaskLoss | None = None) -> None:
        self.settings = settings
        self.logits_fn = logits_fn
        self.task_loss = task_loss or cross_entropy_loss
        self.teacher: MomentumTeacher | None = None
        self.gather: Gather = local  # the Trainer strategy's all_gather, from on_train_begin
        self.last_terms: dict[str, torch.Tensor] = {}

    @property
    def callbacks(self) -> list[Callback]:
        """SMART's teacher follows the steps; SimCSE takes its negatives from every rank's rows."""
        return [self] if self.settings.smart_proximal_weight > 0 or self.settings.contrastive_weight > 0 else []

    def pair_view_collate(self, features: Sequence[dict[str, Any]], first: Sequence[str], second: Sequence[str],
                          tokenizer: Any, max_length: int, padding_side: str = "right") -> PairViewCollator:
        """Supervised SimCSE reads each pair's two texts encoded alone: add those views to the
        training ``features`` (in place) and return the collate that pads them beside the prompt."""
        add_pair_views(features, first, second, tokenizer, max_length)
        return PairViewCollator(tokenizer.pad_token_id, padding_side=padding_side)

    def on_train_begin(self, trainer: Any) -> None:
        self.gather = trainer.strategy.all_gather
        if self.settings.smart_proximal_weight > 0:
            self.teacher = MomentumTeacher(trainer.model, self.settings.smart_momentum)

    def on_step_end(self, trainer: Any, step: int, loss: float | None) -> None:
        if self.teacher is not None:
            self.teacher.update(trainer.model)

    def __call__(self, model: nn.Module, batch: Any) -> torch.Tensor:
        s = self.settings
        unsupervised = s.contrastive_weight > 0 and not s.contrastive_supervised
        n_views = 2 if s.rdrop_alpha > 0 or unsupervised else 1
        need_body = unsupervised or s.smart_weight > 0
        logits, states = [], []
        for _ in range(n_views):
            with body_outputs(model) if need_body else contextlib.nullcontext([]) as seen:
                logits.append(self.logits_fn(model, batch))
            states.append(seen[-1] if seen else None)
        terms = {"task": sum(self.task_loss(x, batch) for x in logits) / n_views}
        weighted = terms["task"]
        if s.rdrop_alpha > 0:
            terms["rdrop"] = rdrop_loss(logits[0], logits[1])
            weighted = weighted + s.rdrop_alpha * terms["rdrop"]
        if s.contrastive_weight > 0:
            if s.contrastive_supervised:
                terms["contrastive"] = pair_views_loss(find_body(model), batch, s.pooling, s.contrastive_temperature,
                                                       self.gather)
            else:
                reps = [pool(h, m, s.pooling) for h, m in states]  # type: ignore[misc]
                terms["contrastive"] = unsupervised_contrastive_loss(reps[0], reps[1], s.contrastive_temperature,
                                                                     self.gather)
            weighted = weighted + s.contrastive_weight * terms["contrastive"]
        if s.smart_weight > 0:
            hidden, mask = states[0]  # type: ignore[misc]
            if mask is None:
                mask = torch.ones(hidden.shape[:2], dtype=torch.long, device=hidden.device)
            delta = adversarial_perturbation(model, batch, self.logits_fn, logits[0], mask[:, -hidden.size(1):],
                                             s.smart_epsilon, s.smart_steps, s.smart_step_size, s.smart_noise_std)
            terms["smart"] = smoothness_loss(model, batch, self.logits_fn, logits[0], delta)
            weighted = weighted + s.smart_weight * terms["smart"]
        if s.smart_proximal_weight > 0:
            if self.teacher is None:  # used without the Trainer callback: theta~ starts here
                self.teacher = MomentumTeacher(model, s.smart_momentum)
            terms["proximal"] = proximal_loss(logits[0], self.teacher.logits(model, batch, self.logits_fn))
            weighted = weighted + s.smart_proximal_weight * terms["proximal"]
        self.last_terms = {k: v.detach() for k, v in terms.items()}
        return weighted


def build_objective(settings: ObjectiveSettings, logits_fn: LogitsFn, task_loss: TaskLoss | None = None) -> Objective:
    """The Trainer's ``loss_fn`` from the settings, a task's ``logits_fn(model, batch)`` and
    optionally its ``task_loss(logits, batch)`` (default: cross-entropy of ``batch["labels"]``)."""
    return Objective(settings, logits_fn, task_loss)


__all__ = ["Objective", "body_outputs", "build_objective"]
