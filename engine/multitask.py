"""Several tasks trained in one run by the one Trainer: a loader that draws each batch from one
task's loader, and a loss that reads the batch's ``task`` and applies that task's loss times its
weight. The Trainer sees one loader and one loss, so checkpoints, accumulation and schedules are
unchanged; only a multi-task run imports this module.

Which task a batch comes from follows ``task_probabilities``: with sizes n_t (examples) and
temperature T, p_t = n_t^(1/T) / sum_s n_s^(1/T) (Arivazhagan et al. 2019), so ``proportional``
is T = 1 (every example as likely as in one concatenated set), ``uniform`` T -> infinity (each
task equally often, a small task repeated), and ``temperature`` anything between. An epoch is as
many batches as the tasks' loaders hold together; a task whose loader runs out starts it again
(a fresh shuffle).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

SAMPLINGS = ("proportional", "uniform", "temperature")
TASK_KEY = "task"  # the batch key naming the batch's task

TaskLossFn = Callable[[nn.Module, Any], torch.Tensor]  # (model, batch) -> loss, as the Trainer calls it


def task_probabilities(sizes: Mapping[str, int], sampling: str = "proportional",
                       temperature: float = 2.0) -> dict[str, float]:
    """Probability of drawing each task's next batch, from the tasks' sizes (see the module's
    docstring); ``temperature`` is read only by ``sampling="temperature"``."""
    if sampling not in SAMPLINGS:
        raise ValueError(f"sampling must be one of {SAMPLINGS}, got {sampling!r}")
    if not sizes or any(n <= 0 for n in sizes.values()):
        raise ValueError(f"every task needs at least one example, got {dict(sizes)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    power = {"proportional": 1.0, "uniform": 0.0, "temperature": 1.0 / temperature}[sampling]
    mass = {t: float(n) ** power for t, n in sizes.items()}
    total = sum(mass.values())
    return {t: m / total for t, m in mass.items()}


class MultiTaskLoader:
    """Batches drawn task by task from ``loaders`` (each with ``len``) with ``probabilities``; each
    batch (a dict) gets ``batch["task"]``. The task draws come from a generator seeded from the
    global torch RNG at each epoch's start, which the Trainer saves and restores (so a resumed run
    draws the same tasks). ``num_batches`` (default: the loaders' batches together) is an epoch."""

    def __init__(self, loaders: Mapping[str, Iterable[Any]], probabilities: Mapping[str, float],
                 num_batches: int | None = None) -> None:
        if set(loaders) != set(probabilities):
            raise ValueError(f"loaders for {sorted(loaders)} but probabilities for {sorted(probabilities)}")
        self.loaders = dict(loaders)
        self.tasks = list(self.loaders)
        self.weights = torch.tensor([float(probabilities[t]) for t in self.tasks])
        self.num_batches = num_batches if num_batches is not None else sum(len(x) for x in loaders.values())  # type: ignore[arg-type]

    def __len__(self) -> int:
        return self.num_batches

    def draws(self, generator: torch.Generator) -> list[str]:
        """The task of each batch of one epoch."""
        picks = torch.multinomial(self.weights, self.num_batches, replacement=True, generator=generator)
        return [self.tasks[i] for i in picks.tolist()]

    def __iter__(self) -> Iterator[Any]:
        generator = torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,)).item()))
        running: dict[str, Iterator[Any]] = {}
        for task in self.draws(generator):
            try:
                batch = next(running[task])
            except (KeyError, StopIteration):  # first use, or the task's loader ran out: start it again
                running[task] = iter(self.loaders[task])
                batch = next(running[task])
            yield {**batch, TASK_KEY: task}


class WeightedTaskLoss:
    """The Trainer's ``loss_fn`` for a ``MultiTaskLoader``: ``weights[task] * losses[task](model,
    batch)`` for the batch's task (weight 1 where none is given)."""

    def __init__(self, losses: Mapping[str, TaskLossFn], weights: Mapping[str, float] | None = None) -> None:
        unknown = sorted(set(weights or {}) - set(losses))
        if unknown:
            raise ValueError(f"weights for tasks {unknown} that have no loss (tasks: {sorted(losses)})")
        self.losses = dict(losses)
        self.weights = {t: float((weights or {}).get(t, 1.0)) for t in losses}

    def __call__(self, model: nn.Module, batch: Mapping[str, Any]) -> torch.Tensor:
        task = batch[TASK_KEY]
        return self.weights[task] * self.losses[task](model, batch)


__all__ = ["SAMPLINGS", "TASK_KEY", "MultiTaskLoader", "WeightedTaskLoss", "task_probabilities"]
