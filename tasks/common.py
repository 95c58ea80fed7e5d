"""The skeleton every task run shares, so a task is its data, its head, its loss and its metric.

A task's ``run(args)`` is::

    device = start(args)                                   # seed, device
    model, tokenizer, trainable_only = build_task_model(args, MyHead)   # body + head + fine-tune mode
    ... read the data, make features, a collate and an eval_fn (the metric) ...
    cfg = train_config_from_args(args, device, metric="accuracy", output_dir=out_dir,
                                 save_trainable_only=trainable_only)
    best, _ = fit_task(model, loss_fn, train_features, collate, eval_fn, cfg, **loader_settings(args))
    ... predict (``engine.predict.predict_in_order``) and write the prediction files ...

``prepare_model`` applies a ``FineTuneConfig`` to a task model and says what trains;
``fit_task`` trains on the task's features with the shared engine and leaves the best epoch's
weights in the model (``fit_and_load_best``: the one place that decides to reload the best
checkpoint, skipped after an interrupted run, whose last weights are what the user stopped on).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from cli.common import add_common_args, build_from_args, fine_tune_config, pick_device, seed_everything
from engine import distributed
from engine.data import make_loader
from engine.efficiency import EfficiencyRecorder
from engine.trainer import Callback, CountFn, EvalFn, LossFn, TrainConfig, Trainer
from methods.fine_tune import FineTuneConfig, count_parameters, set_fine_tune_mode
from methods.objectives import add_objective_args


def start(args: argparse.Namespace) -> torch.device:
    """Seed everything from ``--seed`` and pick the device from ``--use_gpu``/``--device``; under
    torchrun, join the process group and take this rank's device (every rank has the same seed:
    the ranks build the same model, and the data order is rank 0's)."""
    seed_everything(args.seed)
    return distributed.setup(pick_device(args.use_gpu, args.device))


def prepare_model(model: nn.Module, config: FineTuneConfig) -> bool:
    """Apply a fine-tune mode (``cli.common.fine_tune_config(args)``) to a task model (its
    ``head`` names what a head-only mode trains) and print what trains; True when checkpoints
    hold only trainable parameters."""
    trainable_only = set_fine_tune_mode(model, config, model.head)
    n_train, n_total = count_parameters(model)
    print(f"{config.mode}: {n_train:,} of {n_total:,} parameters train")
    return trainable_only


def build_task_model(
    args: argparse.Namespace, head: Callable[[Any], nn.Module], **config_overrides: Any
) -> tuple[nn.Module, Any, bool]:
    """(task model, tokenizer, checkpoints hold only trainable parameters): the GPT-2 body of
    ``--model_size`` (``config_overrides`` change its config), ``head(body)``, and the fine-tune
    mode of the flags applied."""
    gpt, tokenizer = build_from_args(args, **config_overrides)
    model = head(gpt)
    return model, tokenizer, prepare_model(model, fine_tune_config(args))


def fit_and_load_best(trainer: Trainer) -> dict[str, Any]:
    """``trainer.fit()``, then the best checkpoint's weights back into the model, unless none
    was saved or the run was interrupted. Returns the best dev metrics with their epoch."""
    best = trainer.fit()
    if trainer.best_checkpoint is not None and not trainer.interrupted:
        trainer.load_best()
        print(f"best epoch {best.get('epoch')} from {trainer.best_checkpoint}")
    trainer.ready_for_inference()
    return best


def fit_task(
    model: nn.Module,
    loss_fn: LossFn,
    train_features: Sequence[dict[str, Any]],
    collate: Callable[[list[dict[str, Any]]], dict[str, Any]],
    eval_fn: EvalFn | None,
    config: TrainConfig,
    *,
    batch_size: int,
    num_workers: int = 0,
    group_by_length: bool = False,
    extra: Mapping[str, Any] | None = None,
    count_fn: CountFn | None = None,
    callbacks: Sequence[Callback] = (),
) -> tuple[dict[str, Any], Trainer]:
    """Train ``model`` on shuffled batches of ``train_features`` with the shared Trainer and
    leave the best epoch's weights in it (``count_fn``: what a loss averages over, for
    gradient accumulation; default examples; ``callbacks``: e.g. a training objective's).
    Every run also records its efficiency table (``engine.efficiency``: printed at the end,
    ``efficiency.json`` in the run folder). Returns (best dev metrics, trainer)."""
    loader = make_loader(train_features, collate, batch_size, shuffle=True, num_workers=num_workers,
                         group_by_length=group_by_length)
    ranks = distributed.world_size()
    print(f"global batch {ranks * batch_size * config.grad_accum} = {ranks} process{'es' if ranks > 1 else ''} "
          f"x batch {batch_size} x {config.grad_accum} accumulated"
          + (f" ({'FSDP' if config.fsdp else 'DDP'})" if ranks > 1 else "")
          + (" (--fsdp has no effect in one process: launch with torchrun)" if config.fsdp and ranks == 1 else ""))
    trainer = Trainer(model, loss_fn, loader, eval_fn, config, extra=extra, count_fn=count_fn,
                      callbacks=[*callbacks, EfficiencyRecorder()])
    return fit_and_load_best(trainer), trainer


def add_classification_args(parser: argparse.ArgumentParser, **common_defaults: Any) -> argparse.ArgumentParser:
    """The flags every classification task shares: the course's and the engine's
    (``add_common_args`` with the task's defaults) and the training objectives'
    (``methods.objectives.add_objective_args``: R-Drop, SimCSE, SMART, ``--pooling``)."""
    return add_objective_args(add_common_args(parser, **common_defaults))


def loader_settings(args: argparse.Namespace) -> dict[str, Any]:
    """``fit_task``'s loader keywords from the shared flags (``--batch_size``, ``--num_workers``,
    ``--group_by_length``)."""
    return {"batch_size": args.batch_size, "num_workers": args.num_workers, "group_by_length": args.group_by_length}


__all__ = ["add_classification_args", "build_task_model", "fit_and_load_best", "loader_settings", "fit_task",
           "prepare_model", "start"]
