"""The skeleton every task run shares, so a task is its data, its head, its loss and its metric.

A task's ``run(settings)`` (its settings extend ``tasks.settings.TaskSettings``) is::

    out_dir = open_task_run(settings, default_output_dir("mytask"), outputs=...)   # the run folder
    device = start(settings)                                            # seed, device
    model, tokenizer, trainable_only = build_task_model(settings, MyHead)   # body + head + fine-tune mode
    ... read the data, make features, a collate and an eval_fn (the metric) ...
    cfg = train_config(settings, device, out_dir, metric="accuracy", save_trainable_only=trainable_only)
    loss = training_loss(settings.objective, logits_fn)                 # plain unless an objective is asked for
    best, _ = fit_task(model, loss, train_features, collate, eval_fn, cfg, **settings.data.loader_kwargs(),
                       callbacks=loss.callbacks, extra={"args": dict(settings.flags)})
    ... predict (``engine.predict.predict_in_order``) and write the prediction files ...

``prepare_model`` applies a ``FineTuneConfig`` to a task model and says what trains;
``fit_task`` trains on the task's features with the shared engine and leaves the best epoch's
weights in the model (``fit_and_load_best``: the one place that decides to reload the best
checkpoint, skipped after an interrupted run, whose last weights are what the user stopped on).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from engine.data import make_loader, sample
from engine.device import best_device, maybe_compile
from engine.efficiency import EfficiencyRecorder, count_parameters
from engine.launch import launch
from engine.ranks import launched, world_size
from engine.rng import seed_everything
from engine.run_dir import open_run_on_main
from engine.trainer import Callback, CountFn, EvalFn, LossFn, TrainConfig, Trainer
from errors import InputError
from methods.fine_tune import FineTuneConfig, set_fine_tune_mode
from methods.objectives import LogitsFn, ObjectiveSettings, TaskLoss, cross_entropy_loss
from models.gpt2 import GPT2Model, build_model
from models.loading import load_tokenizer
from tasks.metrics import classification_metrics
from tasks.settings import ModelSettings, TaskSettings

if TYPE_CHECKING:  # the objectives load only when one is asked for (training_loss)
    from methods.objectives.combined import Objective


def pick_device(use_gpu: bool = False, device: str = "auto") -> torch.device:
    """``--use_gpu`` demands CUDA (the starter's flag); otherwise ``--device``, where ``auto``
    takes CUDA, then Apple's MPS, then the CPU (the sentiment task says what full fine-tuning costs there:
    ``engine.device.cpu_hint``)."""
    check_device(use_gpu, device)
    if use_gpu:
        return torch.device("cuda")
    if device == "auto":
        return best_device()
    return torch.device(device)


def check_device(use_gpu: bool = False, device: str = "auto") -> None:
    """Refuse a device this machine lacks before a run folder is claimed (``open_task_run``):
    one ``error:`` line (``InputError``), exit status 2."""
    if use_gpu and not torch.cuda.is_available():
        raise InputError("--use_gpu was given but CUDA is not available; drop the flag to run on the CPU")
    if device == "auto" or use_gpu:
        return
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise InputError(f"--device {device!r} is not a device; give auto, cpu, cuda, cuda:1 or mps") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"--device {device} was given but CUDA is not available")


def check_context(context: int, *, max_length: int = 0, max_new_tokens: int = 0) -> None:
    """Refuse, right after the model is built, lengths its ``context`` (position embeddings) cannot
    hold: a longer ``--max_length`` would fail on the first long input mid-training, and a
    ``--max_new_tokens`` that leaves no position for the prompt would decode (and allocate a KV
    cache for) steps the model has no positions for, then fail."""
    if max_length > context:
        raise InputError(f"--max_length {max_length} is longer than the model's context of {context} positions; "
                         f"use at most {context} (0: the context)")
    if max_new_tokens >= context:
        raise InputError(f"--max_new_tokens {max_new_tokens} leaves no room for the prompt in the model's context of "
                         f"{context} positions; use at most {context - 1}")


def default_output_dir(task: str, *parts: str) -> str:
    """``runs/<task>/<part>/...``: run folders stay out of the repository root (runs/ is gitignored).
    It is the parent of a task's default run folders: ``open_task_run`` makes a new timestamped
    one in it for each run, so reruns never collide."""
    return str(Path("runs", task, *parts))


def open_task_run(settings: TaskSettings, default_parent: str | Path, **kw: Any) -> Path | None:
    """``engine.run_dir.open_run`` for a task, before it builds anything, first joining torchrun's
    process group when there is one (``engine.launch.launch``): rank 0 claims the run folder and
    the other ranks get the same one. ``kw``: ``open_run``'s (``outputs``, ``subdir``, ``trains``;
    ``model``, the saved model a run that does not train predicts with, is ``settings.run.load``
    unless given)."""
    check_device(settings.run.use_gpu, settings.run.device)  # a missing GPU leaves no empty run folder
    if launched():  # one process: nothing happens before open_run, as always
        launch(pick_device(settings.run.use_gpu, settings.run.device))
    kw.setdefault("model", settings.run.load)
    return open_run_on_main(default_parent, output_dir=settings.run.output_dir, resume=settings.train.resume,
                            overwrite=settings.train.overwrite, epochs=settings.train.epochs, **kw)


def start(settings: TaskSettings) -> torch.device:
    """Seed everything from the run's seed and pick the device (``--use_gpu``/``--device``); under
    torchrun, join the process group and take this rank's device (every rank has the same seed:
    the ranks build the same model, and the data order is rank 0's)."""
    seed_everything(settings.seed)
    return launch(pick_device(settings.run.use_gpu, settings.run.device))


def build_body(settings: ModelSettings, **config_overrides: Any) -> tuple[GPT2Model, Any]:
    """(GPT2Model, tokenizer) of ``model_size`` (a size, a Hugging Face folder or a model file a
    run saved), with random weights if asked, gradient checkpointing and ``torch.compile`` applied
    if asked. ``config_overrides`` (e.g. ``hidden_dropout_prob=...``) change the body's config; the
    course classifier keeps GPT-2's own dropout in the body and uses ``hidden_dropout_prob`` in its head."""
    if Path(settings.model_size).is_file():  # a model an earlier run saved (pretrain.py's model.pt)
        # A function-level import: rebuilding a saved model brings the methods it may hold (sparse
        # attention, a prefix), which a run from a named size or a Hugging Face folder never loads.
        from methods.restore import load_model

        model = load_model(settings.model_size, random_init=settings.random_init, **config_overrides)
    else:  # cli.common.run_main reports its errors
        model = build_model(settings.model_size, settings.random_init, **config_overrides)
    if settings.gradient_checkpointing:
        # A function-level import: the block swapping that recomputes activations loads only when asked for.
        from methods.gradient_checkpointing import enable_gradient_checkpointing

        enable_gradient_checkpointing(model)
    maybe_compile(model, settings.compile)
    return model, load_tokenizer(settings.tokenizer)


def prepare_model(model: nn.Module, config: FineTuneConfig) -> bool:
    """Apply a fine-tune mode (``TaskSettings.fine_tune``) to a task model (its ``head`` names
    what a head-only mode trains) and print what trains; True when checkpoints hold only
    trainable parameters."""
    trainable_only = set_fine_tune_mode(model, config, model.head)
    n_train, n_total = count_parameters(model)
    print(f"{config.mode}: {n_train:,} of {n_total:,} parameters train")
    return trainable_only


def build_task_model(
    settings: TaskSettings, head: Callable[[Any], nn.Module], **config_overrides: Any
) -> tuple[nn.Module, Any, bool]:
    """(task model, tokenizer, checkpoints hold only trainable parameters): the GPT-2 body of
    ``settings.model`` (``config_overrides`` change its config), ``head(body)``, and the fine-tune
    mode applied."""
    gpt, tokenizer = build_body(settings.model, **config_overrides)
    check_context(gpt.config.max_position_embeddings, max_length=settings.data.max_length)
    model = head(gpt)
    return model, tokenizer, prepare_model(model, settings.fine_tune)


def train_config(settings: TaskSettings, device: torch.device, output_dir: str | Path, **fields: Any) -> TrainConfig:
    """The engine's settings of this run: the flags' (``settings.train``) on ``device``, in the run
    folder ``output_dir``; ``fields`` (metric, save_trainable_only...) take precedence."""
    return replace(settings.train, **{"device": str(device), "output_dir": str(output_dir), **fields})


class PlainLoss:
    """``loss_fn(model, batch)`` for the Trainer: the task loss of one forward pass, what a task
    trains on when no objective is asked for. Needs no Trainer callbacks."""

    callbacks: tuple[Callback, ...] = ()

    def __init__(self, logits_fn: LogitsFn, task_loss: TaskLoss = cross_entropy_loss) -> None:
        self.logits_fn = logits_fn
        self.task_loss = task_loss

    def __call__(self, model: nn.Module, batch: Any) -> torch.Tensor:
        return self.task_loss(self.logits_fn(model, batch), batch)


def training_loss(settings: ObjectiveSettings, logits_fn: LogitsFn,
                  task_loss: TaskLoss = cross_entropy_loss) -> PlainLoss | Objective:
    """The Trainer's ``loss_fn`` (with ``.callbacks`` to pass along) from a task's ``logits_fn``
    and ``task_loss``: the plain loss (``PlainLoss``) unless the settings ask for an objective,
    then ``methods.objectives.combined.Objective`` adding its terms (the same numbers when every
    term is off)."""
    if not settings.enabled:
        return PlainLoss(logits_fn, task_loss)
    # The objectives (R-Drop, SimCSE, SMART) load only when one is asked for: a plain run never imports them.
    from methods.objectives.combined import build_objective

    return build_objective(settings, logits_fn, task_loss)


TRAIN_EVAL_MAX = 1000  # training examples a classification run re-scores each epoch, at most


def train_metrics_fn(train_features: Sequence[dict[str, Any]], n_dev: int, seed: int,
                     predict: Callable[[nn.Module, list[dict[str, Any]]], list[int]]) -> EvalFn:
    """``fit_task``'s ``train_eval_fn`` for a classifier: its metrics on a seeded sample of the training
    features (``labels``), scored in eval mode like dev, not the running accuracy of the training
    passes (taken under dropout by a model that moves during the epoch). The sample is as large as
    the dev set, at most ``TRAIN_EVAL_MAX``, so the two accuracies have a like noise and the pass
    costs at most a dev evaluation. ``predict(model, features)``: the task's labels in order."""
    rows = [{**f, "index": i} for i, f in enumerate(sample(train_features, min(n_dev, TRAIN_EVAL_MAX), seed))]
    labels = [f["labels"] for f in rows]
    return lambda model: classification_metrics(labels, predict(model, rows))


def fit_and_load_best(trainer: Trainer) -> dict[str, Any]:
    """``trainer.fit()``, then the best checkpoint's weights back into the model, unless none
    was saved, the run was interrupted, or ``final_weights`` is ``last`` (the starter's sonnets
    come from the last epoch). Returns the dev metrics of the weights kept, with their epoch."""
    best = trainer.fit()
    if trainer.config.final_weights == "last":
        if trainer.history:
            best = {**trainer.history[-1]["dev"], "epoch": trainer.history[-1]["epoch"]}
            print(f"keeping the last epoch's weights (epoch {best['epoch']})")
    elif trainer.best_checkpoint is not None and not trainer.interrupted:
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
    train_eval_fn: EvalFn | None = None,
    loader: Any = None,
) -> tuple[dict[str, Any], Trainer]:
    """Train ``model`` on shuffled batches of ``train_features`` with the shared Trainer and
    leave the best epoch's weights in it (``count_fn``: what a loss averages over, for
    gradient accumulation; default examples; ``callbacks``: e.g. a training objective's;
    ``train_eval_fn``: metrics on the training set each epoch, e.g. ``train_metrics_fn``'s;
    ``loader``: batches to train on instead, e.g. ``engine.multitask.MultiTaskLoader``'s).
    Every run also records its efficiency table (``engine.efficiency``: printed at the end,
    ``efficiency.json`` in the run folder). Returns (best dev metrics, trainer)."""
    if loader is None:
        loader = make_loader(train_features, collate, batch_size, shuffle=True, num_workers=num_workers,
                             group_by_length=group_by_length)
    ranks = world_size()
    print(f"global batch {ranks * batch_size * config.grad_accum} = {ranks} process{'es' if ranks > 1 else ''} "
          f"x batch {batch_size} x {config.grad_accum} accumulated"
          + (f" ({'FSDP' if config.fsdp else 'DDP'})" if ranks > 1 else "")
          + (" (--fsdp has no effect in one process: launch with torchrun)" if config.fsdp and ranks == 1 else ""))
    trainer = Trainer(model, loss_fn, loader, eval_fn, config, extra=extra, count_fn=count_fn,
                      callbacks=[*callbacks, EfficiencyRecorder()], train_eval_fn=train_eval_fn)
    return fit_and_load_best(trainer), trainer


__all__ = ["TRAIN_EVAL_MAX", "PlainLoss", "build_body", "build_task_model", "check_context", "check_device",
           "default_output_dir", "fit_and_load_best", "fit_task", "open_task_run", "pick_device", "prepare_model",
           "start", "train_config", "train_metrics_fn", "training_loss"]
