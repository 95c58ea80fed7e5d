"""The shared objective flags and the one wrapper that turns a task's logits into its training
loss with every regulariser asked for on the command line.

A task gives ``logits_fn(model, batch) -> (B, C) logits`` (and, if its loss is not the
cross-entropy of ``batch["labels"]``, ``task_loss(logits, batch)``); the wiring is then::

    add_objective_args(parser)                                   # once, beside add_common_args
    objective = build_objective(args, logits_fn)                 # the loss_fn for the Trainer
    Trainer(model, objective, ..., callbacks=objective.callbacks)

With every flag at its default the objective is exactly the task loss of one forward pass.
Terms combine freely; one forward pass is shared wherever it can be (R-Drop's two passes are
also unsupervised SimCSE's two views, and the first is SMART's clean prediction).
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from engine.trainer import Callback
from methods.objectives.contrastive import pair_views_loss, unsupervised_contrastive_loss
from methods.objectives.rdrop import rdrop_loss
from methods.objectives.smart import (
    MomentumTeacher,
    adversarial_perturbation,
    find_body,
    proximal_loss,
    smoothness_loss,
)
from models.pooling import POOLINGS, pool

LogitsFn = Callable[[nn.Module, Any], torch.Tensor]
TaskLoss = Callable[[torch.Tensor, Any], torch.Tensor]


@dataclass
class ObjectiveSettings:
    """What ``add_objective_args`` parses; every weight 0 (off) by default."""

    rdrop_alpha: float = 0.0
    contrastive_weight: float = 0.0
    contrastive_temperature: float = 0.05
    contrastive_supervised: bool = False
    smart_weight: float = 0.0
    smart_epsilon: float = 1e-3
    smart_steps: int = 1
    smart_step_size: float = 1e-3
    smart_noise_std: float = 1e-5
    smart_proximal_weight: float = 0.0
    smart_momentum: float = 0.99
    pooling: str = "last"

    def __post_init__(self) -> None:
        for name in ("rdrop_alpha", "contrastive_weight", "smart_weight", "smart_epsilon", "smart_step_size",
                     "smart_noise_std", "smart_proximal_weight", "smart_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.contrastive_temperature <= 0:
            raise ValueError(f"contrastive_temperature must be > 0, got {self.contrastive_temperature}")
        if not 0.0 <= self.smart_momentum < 1.0:
            raise ValueError(f"smart_momentum must be in [0, 1), got {self.smart_momentum}")
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {self.pooling!r}")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ObjectiveSettings:
        """The settings from parsed flags (flags a parser lacks keep their defaults)."""
        return cls(**{f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)})


def _number(kind: type, low: float, low_open: bool = False, high: float | None = None) -> Callable[[str], Any]:
    """An argparse type: ``kind`` parsed, then checked against [low, high) (or (low, ...) if ``low_open``)."""

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a {kind.__name__}") from None
        if value < low or (low_open and value == low) or (high is not None and value >= high):
            bound = f"> {low}" if low_open else f">= {low}"
            raise argparse.ArgumentTypeError(f"{value} must be {bound}" + (f" and < {high}" if high else ""))
        return value

    return parse


def add_objective_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The flags of the training objectives (one group), all off by default; bad values (a negative
    weight, a zero temperature) stop at parse time with argparse's usage error."""
    d = ObjectiveSettings()
    g = parser.add_argument_group("training objectives (off by default; combinable)")
    g.add_argument("--rdrop_alpha", type=_number(float, 0), default=d.rdrop_alpha,
                   help="R-Drop (Liang et al. 2021): weight of the symmetric KL between two dropout passes")
    g.add_argument("--contrastive_weight", type=_number(float, 0), default=d.contrastive_weight,
                   help="SimCSE (Gao et al. 2021): weight of the in-batch InfoNCE on sentence representations")
    g.add_argument("--contrastive_temperature", type=_number(float, 0, low_open=True),
                   default=d.contrastive_temperature, help="InfoNCE temperature tau")
    g.add_argument("--contrastive_supervised", action="store_true",
                   help="paraphrase pairs: the two questions of a positive pair are the positives "
                        "(default: two dropout views of the same text)")
    g.add_argument("--smart_weight", type=_number(float, 0), default=d.smart_weight,
                   help="SMART (Jiang et al. 2020): weight lambda_s of the adversarial smoothness term")
    g.add_argument("--smart_epsilon", type=_number(float, 0), default=d.smart_epsilon,
                   help="radius of the inf-norm ball the embedding perturbation stays in")
    g.add_argument("--smart_steps", type=_number(int, 0), default=d.smart_steps,
                   help="projected gradient-ascent steps that find the perturbation")
    g.add_argument("--smart_step_size", type=_number(float, 0), default=d.smart_step_size,
                   help="ascent step eta (along the inf-norm-normalised gradient)")
    g.add_argument("--smart_proximal_weight", type=_number(float, 0), default=d.smart_proximal_weight,
                   help="weight mu of SMART's Bregman proximal term against the momentum teacher (paper: 1)")
    g.add_argument("--smart_momentum", type=_number(float, 0, high=1.0), default=d.smart_momentum,
                   help="beta of the momentum teacher, theta~ <- beta theta~ + (1 - beta) theta")
    g.add_argument("--pooling", choices=POOLINGS, default=d.pooling,
                   help="sentence representation: the last real token's state or the mean over real tokens")
    return parser


def cross_entropy_loss(logits: torch.Tensor, batch: Any) -> torch.Tensor:
    """The default task loss: cross-entropy of ``batch["labels"]``."""
    return F.cross_entropy(logits.float(), batch["labels"])


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
    up to date. ``last_terms`` holds the detached unweighted terms of the last call, for logs."""

    def __init__(self, settings: ObjectiveSettings, logits_fn: LogitsFn, task_loss: TaskLoss | None = None) -> None:
        self.settings = settings
        self.logits_fn = logits_fn
        self.task_loss = task_loss or cross_entropy_loss
        self.teacher: MomentumTeacher | None = None
        self.last_terms: dict[str, torch.Tensor] = {}

    @property
    def callbacks(self) -> list[Callback]:
        return [self] if self.settings.smart_proximal_weight > 0 else []

    def on_train_begin(self, trainer: Any) -> None:
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
                terms["contrastive"] = pair_views_loss(find_body(model), batch, s.pooling, s.contrastive_temperature)
            else:
                reps = [pool(h, m, s.pooling) for h, m in states]  # type: ignore[misc]
                terms["contrastive"] = unsupervised_contrastive_loss(reps[0], reps[1], s.contrastive_temperature)
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


def build_objective(
    settings: ObjectiveSettings | argparse.Namespace, logits_fn: LogitsFn, task_loss: TaskLoss | None = None
) -> Objective:
    """The Trainer's ``loss_fn`` from parsed flags (or settings), a task's ``logits_fn(model, batch)``
    and optionally its ``task_loss(logits, batch)`` (default: cross-entropy of ``batch["labels"]``)."""
    if isinstance(settings, argparse.Namespace):
        settings = ObjectiveSettings.from_args(settings)
    return Objective(settings, logits_fn, task_loss)
