"""What a training run is told and what it can be hooked with: ``TrainConfig`` (saved in every
checkpoint, compared on resume), the ``Callback`` hooks, and the types of the task functions the
Trainer calls (``loss_fn``, ``eval_fn``, ``count_fn``). Kept apart from the loop itself
(``engine.trainer``, which re-exports them) so the loop reads in one sitting.

The learning-rate schedules ``TrainConfig.scheduler`` names (``SCHEDULES``, also ``--scheduler``'s
choices) are here too: linear warm-up, then constant, linear or cosine decay, one function of the
optimizer step (``lr_lambda``) that the Trainer hands to ``torch.optim.lr_scheduler.LambdaLR``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from engine.optimizers import check_optimizer

LossFn = Callable[[nn.Module, Any], torch.Tensor]
EvalFn = Callable[[nn.Module], Mapping[str, float]]
CountFn = Callable[[Any], "int | float | torch.Tensor"]


@dataclass
class TrainConfig:
    """Everything the loop needs to know; saved in every checkpoint."""

    epochs: int = 10
    lr: float = 1e-3
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-6
    grad_accum: int = 1  # micro-batches per optimizer step
    max_grad_norm: float = 1.0  # <= 0 disables clipping
    scheduler: str = "constant"  # constant | linear | cosine (after warm-up)
    warmup_ratio: float = 0.0  # fraction of all optimizer steps spent warming up linearly from 0
    patience: int = 0  # stop after this many epochs without dev improvement; 0 = never
    metric: str = "accuracy"  # dev metric that picks the best checkpoint
    mode: str = "max"  # "max" or "min" for ``metric``
    save_top_k: int = 1  # best checkpoints kept; 0 keeps none
    save_every_steps: int = 0  # also write last.pt every N optimizer steps (mid-epoch resume)
    save_trainable_only: bool = False  # checkpoints hold only requires_grad parameters (LoRA, frozen body)
    output_dir: str = "runs/default"
    seed: int = 11711  # re-seeded at the start of a fresh fit so data order does not depend on model building
    device: str = "cpu"
    bf16: bool = True  # bf16 autocast, used only on CUDA
    log_every: int = 20  # optimizer steps between loss syncs (.item()) and log lines
    progress: bool = True  # tqdm bars
    plot: bool = True  # redraw curves.png after each epoch
    resume: bool = False  # continue from output_dir/last.pt (an error if there is none: engine.run_dir)
    overwrite: bool = False  # an output_dir that holds a run is replaced (else refused unless resume)
    resume_allow_changes: bool = False  # resume even if settings that change the result differ
    max_steps: int = 0  # stop (as if interrupted) after this many optimizer steps; 0 = no limit
    report_to: str = "none"  # none | tensorboard | wandb: a tracker mirroring metrics.jsonl (engine.tracking)
    fsdp: bool = False  # under torchrun: shard with FSDP2 instead of replicating with DDP
    final_weights: str = "best"  # best | last: the epoch whose weights a task keeps after fit (tasks.common)
    optimizer: str = "adamw"  # engine.optimizers.OPTIMIZERS: what the Trainer builds when given none

    def __post_init__(self) -> None:
        check_optimizer(self.optimizer, self.fsdp)
        if self.scheduler not in SCHEDULES:
            raise ValueError(f"scheduler must be one of {SCHEDULES}, got {self.scheduler!r}")
        if self.final_weights not in FINAL_WEIGHTS:
            raise ValueError(f"final_weights must be one of {FINAL_WEIGHTS}, got {self.final_weights!r}")
        if self.mode not in ("max", "min"):
            raise ValueError(f"mode must be 'max' or 'min', got {self.mode!r}")
        if self.grad_accum < 1:
            raise ValueError(f"grad_accum must be >= 1, got {self.grad_accum}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        self.betas = tuple(self.betas)


class Callback:
    """Hooks the Trainer calls (``trainer`` is the ``engine.trainer.Trainer``); override what you
    need. Setting ``trainer.stop = True`` ends training after the current epoch (checkpoints and
    logs are still written)."""

    def on_train_begin(self, trainer: Any) -> None: ...

    def on_step_end(self, trainer: Any, step: int, loss: float | None) -> None:
        """After each optimizer step; ``loss`` is set only at logging steps (avoids a sync per step)."""

    def on_epoch_end(self, trainer: Any, epoch: int, metrics: dict[str, Any]) -> None: ...

    def on_train_end(self, trainer: Any, best: dict[str, Any]) -> None: ...


SCHEDULES = ("constant", "linear", "cosine")
FINAL_WEIGHTS = ("best", "last")


def lr_lambda(schedule: str, warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """Multiplier of the base learning rate at optimizer step ``s`` (0-based)."""

    def f(s: int) -> float:
        if warmup_steps and s < warmup_steps:
            return (s + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (s - warmup_steps) / max(1, total_steps - warmup_steps))
        if schedule == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return f


__all__ = ["FINAL_WEIGHTS", "Callback", "CountFn", "EvalFn", "LossFn", "SCHEDULES", "TrainConfig", "lr_lambda"]
