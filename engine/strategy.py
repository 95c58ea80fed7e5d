"""How many processes train, as one object the Trainer calls at a few fixed points (as Lightning
Fabric's strategies are): wrap the model, switch the gradient all-reduce off for the first
micro-batches of an accumulation group, sum and average numbers over the ranks, gather a
loss's rows from every rank, evaluate on rank 0, gather what a checkpoint holds and put it back.

``SingleProcess`` is the plain run: every hook is the identity, so the loop reads as the one
process it is. Under torchrun ``engine.launch.strategy_for`` returns ``engine.distributed``'s DDP
or FSDP strategy, subclasses that override these hooks; the loop does not change.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn

from engine.checkpoints import load_checkpoint_weights, trainable_state_dict

T = TypeVar("T")


class SingleProcess:
    """One process: nothing is wrapped, synchronised, reduced or gathered."""

    sharded = False  # the parameters are shards (FSDP): a checkpoint gathers them, a collective call
    world_size = 1
    rank = 0
    is_main = True  # this process writes the run's files and prints

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def wrap(self, model: nn.Module) -> nn.Module | None:
        """The module the loss runs through when it is not ``model`` itself (None: ``model``)."""
        return None

    def sync_gradients(self, sync: bool) -> contextlib.AbstractContextManager:
        """The backward passes inside reduce gradients over the ranks (``sync``) or not yet."""
        return contextlib.nullcontext()

    def sum(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` summed over the ranks."""
        return x

    def mean(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` averaged over the ranks."""
        return x

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        """Every rank's rows of ``x`` (B_r, ...), concatenated in rank order on ``x``'s device; this
        rank's rows are ``x`` itself, so gradients reach them (the others' carry none). For a loss
        over the whole global batch, such as SimCSE's in-batch negatives."""
        return x

    def on_main(self, fn: Callable[[], T]) -> T:
        """``fn()`` run by rank 0; its result (or its error) on every rank."""
        return fn()

    def evaluate(self, fn: Callable[[], T]) -> T:
        """``fn()`` (the dev evaluation) run by rank 0 with the whole model at hand."""
        return fn()

    def unshard(self) -> None:
        """After training: the whole model on every rank, for predictions."""

    def gather_objects(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order."""
        return [obj]

    def model_state(self, model: nn.Module, trainable_only: bool) -> dict[str, torch.Tensor]:
        """The weights a checkpoint holds: all, or only those that train."""
        return trainable_state_dict(model) if trainable_only else model.state_dict()

    def optimizer_state(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        return optimizer.state_dict()

    def load_model_state(self, model: nn.Module, ckpt: Mapping[str, Any], path: str | Path) -> None:
        """A Trainer checkpoint's weights (full or trainable-only) into ``model``."""
        load_checkpoint_weights(model, ckpt, path)

    def load_optimizer_state(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                             state: dict[str, Any]) -> None:
        optimizer.load_state_dict(state)


__all__ = ["SingleProcess"]
