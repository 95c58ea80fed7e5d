"""The one training loop every task uses.

A task supplies what is particular to it -- a model, ``loss_fn(model, batch) ->
scalar tensor``, a train DataLoader, and ``eval_fn(model) -> {metric: value}`` on
its dev set -- and the engine does the rest: device placement, bf16 autocast on
CUDA, gradient accumulation and clipping, our AdamW (``optimizer.AdamW``), a learning-rate
schedule, evaluation each epoch, early stopping, best/top-k checkpoints, exact
resume, a JSONL metrics log and a PNG of the curves.

Typical use (the tasks go through ``tasks.common.fit_task``, which does exactly this)::

    cfg = TrainConfig(epochs=10, lr=1e-5, metric="accuracy", output_dir="runs/sst/full-model")
    trainer = Trainer(model, loss_fn, train_loader, eval_fn, cfg)
    best = trainer.fit()           # best dev metrics, e.g. {"accuracy": 0.51, "macro_f1": 0.47, "epoch": 3}
    trainer.load_best()            # model now holds the best epoch's weights
    trainer.best_checkpoint        # Path of that checkpoint file

Files in ``output_dir``: ``last.pt`` (full state for ``resume``), ``best.pt`` (top-1)
or ``best-epochN.pt`` (top-k), ``metrics.jsonl``, ``curves.png``. Every checkpoint holds
``model`` (weights; only trainable ones if ``trainable_only``), ``epoch``, ``train_config``,
``model_config`` (the GPT2Config found in the model, if any) and ``extra`` (e.g. CLI args).

Exact resume: ``last.pt`` holds the model (or only its trainable parameters),
optimizer, schedule, python/numpy/torch/cuda RNG states, epoch, step and the RNG
state at the start of the current epoch. With ``save_every_steps`` a run can stop
mid-epoch: on resume the epoch's shuffle is replayed from that saved state and the
batches already seen are skipped, so the final weights equal an uninterrupted run.

Under ``torchrun`` the same loop trains N processes as one process of N times the batch. It
calls its strategy (``engine.strategy``: one process, DDP or FSDP2) at a few fixed points:
wrap the model, hold back the gradient all-reduce until a group's last micro-batch, sum and
average over the ranks, evaluate on rank 0. Each rank trains on a slice of every global batch,
its micro-batches weighted by their counts over all ranks; files are written by rank 0.

The parts the loop is built from live beside it: ``engine.train_config`` (``TrainConfig``,
``Callback``, learning-rate schedules), ``engine.rng`` (seeding, RNG state), ``engine.strategy``
(what one process or several do at the loop's fixed points), ``engine.checkpoints`` (checkpoint
files, and what a run writes and resumes from: ``last.pt``, the top-k best), ``engine.resume``
(what a resume must match), ``engine.device`` (batch placement, autocast), ``engine.tracking``
(the metrics log, the plot, trackers), ``engine.predict`` (the eval-mode loop),
``engine.optimizers`` (the optimizer ``--optimizer`` names).
"""

from __future__ import annotations

import contextlib
import itertools
import math
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from engine.checkpoints import CheckpointMixin, load_checkpoint, model_config_of, rank_top_k
from engine.data import count_examples
from engine.device import autocast_context, move_to_device
from engine.launch import strategy_for
from engine.optimizers import build_optimizer
from engine.predict import predict
from engine.resume import fit_guard, run_settings
from engine.rng import get_rng_state, seed_everything, set_rng_state
from engine.tracking import callbacks_for, plot_curves
from engine.train_config import Callback, CountFn, EvalFn, LossFn, TrainConfig, lr_lambda


class LossSum:
    """Micro-batch losses summed on the device, so that a step costs no host sync (they are read
    when a line is logged or a checkpoint saved), with their number, examples and start time."""

    def __init__(self, device: torch.device, total: float = 0.0, n: int = 0) -> None:
        self.sum, self.n = torch.tensor(total, device=device), n
        self.examples, self.start = 0, time.perf_counter()

    def add(self, loss: torch.Tensor, examples: int = 0) -> None:
        self.sum += loss
        self.n += 1
        self.examples += examples


class Trainer(CheckpointMixin):
    """Fit a model with a task-supplied loss and dev evaluation.

    Args:
        model: any nn.Module; moved to ``config.device``.
        loss_fn: ``loss_fn(model, batch) -> scalar tensor``, batch already on the device.
        train_loader: yields batches (dicts/tuples of tensors). Shuffling should use the
            global torch RNG (the DataLoader default) or a generator on its sampler; both resume exactly.
        eval_fn: ``eval_fn(model) -> {name: value}`` on dev, called each epoch in eval mode under
            no_grad and autocast; must contain ``config.metric``. None: no evaluation, last epoch is "best".
        train_eval_fn: the same on (a sample of) the training set: the epoch's ``train`` metrics, beside ``dev``.
        config: TrainConfig.
        optimizer: optional; default ``config.optimizer`` (``engine.optimizers``; ``AdamW`` run by its
            multi-tensor variant ``engine.fast_adamw.FastAdamW``, the same numbers) over trainable
            parameters, no weight decay on biases and LayerNorm weights (1-D tensors).
        callbacks: Callback instances.
        extra: JSON-like dict saved in checkpoints (e.g. the CLI args) for provenance.
        count_fn: ``count_fn(batch)`` -> the number of items ``loss_fn`` averages over (default: the
            examples; ``modules.losses.count_lm_targets`` for causal-LM losses). With ``grad_accum`` > 1 each
            micro-batch's mean loss is weighted by its count over the group's total, as
            ``transformers`` does with ``num_items_in_batch``, so an accumulated step has the gradient
            of one batch holding the whole group (uneven token counts, a short last group).

    After ``fit()``: ``best_metrics``, ``best_checkpoint`` (Path or None), ``history`` (one dict per
    epoch), ``global_step``, ``epoch`` (epochs completed), ``output_dir``.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        train_loader: DataLoader | Iterable,
        eval_fn: EvalFn | None = None,
        config: TrainConfig | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        callbacks: Sequence[Callback] = (),
        extra: Mapping[str, Any] | None = None,
        count_fn: CountFn | None = None, train_eval_fn: EvalFn | None = None,
    ) -> None:
        self.config = config or TrainConfig()
        self.count_fn = count_fn or count_examples
        self.device = torch.device(self.config.device)
        self.model = model.to(self.device)
        # One process, or under torchrun DDP/FSDP: chosen once. ``self.wrapped`` is the model under DDP
        # or FSDP (None for one process); ``self.model`` stays the task's own module: eval_fn,
        # checkpoints and callers see it, the loss runs through the wrapper.
        self.strategy = strategy_for(self.device, self.config.fsdp)
        self.wrapped = self.strategy.wrap(self.model)
        self.loss_fn = loss_fn
        self.train_loader = train_loader
        self.eval_fn, self.train_eval_fn = eval_fn, train_eval_fn
        self.callbacks = [*callbacks, *callbacks_for(self.config)]  # --report_to's tracker, attached ones
        self.extra = dict(extra or {})
        self.output_dir = Path(self.config.output_dir)
        self.optimizer = optimizer or self._default_optimizer()
        n_batches = len(train_loader)  # type: ignore[arg-type]
        self.steps_per_epoch = math.ceil(n_batches / self.config.grad_accum)
        self.total_steps = self.steps_per_epoch * self.config.epochs
        warmup = int(self.config.warmup_ratio * self.total_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(self.config.scheduler, warmup, self.total_steps)
        )
        self.global_step = 0
        self.epoch = 0  # epochs completed
        self.step_in_epoch = 0  # optimizer steps done in the current (unfinished) epoch
        self.epoch_rng: dict[str, Any] | None = None  # RNG state when the current epoch's iterator was made
        self.history: list[dict[str, Any]] = []
        self.best_metrics: dict[str, Any] = {}
        self.best_score: float | None = None  # metric, negated when mode == "min"
        self.top_k: list[tuple[float, int, str]] = []  # (score, epoch, path)
        self.bad_epochs = 0
        self._partial_loss: tuple[float, int] = (0.0, 0)  # (sum, count) of this epoch's losses at the last save
        self.stop = False
        self.interrupted = False

    # ------------------------------------------------------------ public API

    @property
    def best_checkpoint(self) -> Path | None:
        """Path of the best checkpoint written so far (None if none was saved)."""
        if not self.top_k:
            return None
        return Path(rank_top_k(self.top_k)[0][2])

    def load_best(self) -> None:
        """Put the best checkpoint's weights back into ``self.model``."""
        if self.best_checkpoint is None:
            raise RuntimeError("no best checkpoint was saved (save_top_k=0 or fit() not run)")
        self.load_weights(self.best_checkpoint)

    def load_weights(self, path: str | Path) -> dict[str, Any]:
        """Load the model weights of any checkpoint this Trainer wrote; returns the checkpoint."""
        ckpt = load_checkpoint(path, map_location=self.device)
        self._load_model(ckpt, path)
        return ckpt

    def fit(self) -> dict[str, Any]:
        """Train for ``config.epochs`` (or until early stopping / ``max_steps``); returns the best dev
        metrics with the epoch they came from (or the last epoch's metrics if there is no eval_fn).
        The run folder is locked meanwhile and checked first (``engine.resume.fit_guard``):
        one that holds another run is refused, and so is a resume with nothing to resume or with
        changed settings."""
        current = run_settings(self._config_dict(), model_config_of(self.model), self.extra)
        with self._reporting_interrupts(), fit_guard(self.output_dir, self.config, current):
            return self._fit()

    def _fit(self) -> dict[str, Any]:
        cfg = self.config
        self.output_dir.mkdir(parents=True, exist_ok=True)
        last = self.output_dir / "last.pt"
        if cfg.resume and last.exists():
            self._resume(last)
            print(f"resumed from {last}: epoch {self.epoch}, step {self.global_step}")
        else:
            seed_everything(cfg.seed)
        for cb in self.callbacks:
            cb.on_train_begin(self)
        self.model.train()
        while self.epoch < cfg.epochs and not self.stop:
            self.running_epoch = self.epoch + 1  # what a Ctrl-C reports, through the epoch's evaluation too
            train_loss = self._train_epoch()
            if self.step_in_epoch < self.steps_per_epoch:  # stopped mid-epoch (max_steps): last.pt is saved
                break
            self._end_epoch(train_loss)
            if self.interrupted:
                break
        for cb in self.callbacks:
            cb.on_train_end(self, self.best_metrics)
        return dict(self.best_metrics)

    def autocast(self) -> contextlib.AbstractContextManager:
        return autocast_context(self.device, self.config.bf16)

    # ------------------------------------------------------------ the loop

    def _default_optimizer(self) -> torch.optim.Optimizer:
        params = [p for p in self.model.parameters() if p.requires_grad]
        if not params:
            raise ValueError("the model has no trainable parameters")
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]
        groups = [{"params": decay, "weight_decay": self.config.weight_decay},
                  {"params": no_decay, "weight_decay": 0.0}]
        return build_optimizer(self.config.optimizer, [g for g in groups if g["params"]], lr=self.config.lr,
                               betas=self.config.betas, eps=self.config.eps)

    def _train_epoch(self) -> float | None:
        """One epoch (or what is left of it after a resume): accumulation groups of micro-batches,
        one optimizer step each; returns the epoch's mean training loss over all ranks."""
        bar = self._progress_bar()
        epoch_loss = LossSum(self.device, *(self._partial_loss if self.step_in_epoch else (0.0, 0)))
        window = LossSum(self.device)  # the micro-batches since the last logged step
        self.optimizer.zero_grad(set_to_none=True)
        for group in self._groups():
            weights = self._weights(group)
            for j, (batch, weight) in enumerate(zip(group, weights)):
                loss = self._backward(batch, weight, sync=j == len(group) - 1)  # one all-reduce per group
                epoch_loss.add(loss)
                window.add(loss, count_examples(batch))
            self._optimizer_step()
            logged = None
            if self._log_due():
                logged, window = self._log_step(window, bar), LossSum(self.device)
            if bar is not None:
                bar.update(1)
            for cb in self.callbacks:
                cb.on_step_end(self, self.global_step, logged)
            stop_here = self._hit_max_steps()
            if stop_here or self._save_due():
                self._partial_loss = (self.strategy.mean(epoch_loss.sum).item(), epoch_loss.n)
                self._save_last()
            if stop_here:
                break
        if bar is not None:
            bar.close()
        return (self.strategy.mean(epoch_loss.sum) / epoch_loss.n).item() if epoch_loss.n else None

    def _progress_bar(self) -> Any:
        """A tqdm bar over the epoch's optimizer steps (rank 0, ``progress``), else None."""
        if not (self.config.progress and self.strategy.is_main):
            return None
        from tqdm.auto import tqdm

        return tqdm(total=self.steps_per_epoch, initial=self.step_in_epoch,
                    desc=f"epoch {self.epoch + 1}/{self.config.epochs}", dynamic_ncols=True)

    def _groups(self) -> Iterator[list[Any]]:
        """This epoch's accumulation groups: ``grad_accum`` batches each, the last one shorter."""
        n_batches = len(self.train_loader)  # type: ignore[arg-type]
        batches = self._batches()
        for i, first in batches:  # i: the first batch of a group
            yield [first, *(b for _, b in itertools.islice(batches, min(self.config.grad_accum, n_batches - i) - 1))]

    def _weights(self, group: list[Any]) -> list[float]:
        """Each micro-batch's loss weight: its count (what its loss averages over) over the
        group's count on every rank together, so an accumulated step has the gradient of one
        batch holding the whole group; times the number of ranks, since DDP and FSDP average
        gradients over them. A group that counts nothing weighs its micro-batches equally."""
        counts = [float(self.count_fn(b)) for b in group]  # on the host, before the batches move
        total = self._group_total(counts)
        ranks = self.strategy.world_size
        return [count * ranks / total if total > 0 else 1.0 / len(group) for count in counts]

    def _group_total(self, counts: list[float]) -> float:
        """What an accumulation group's losses average over: its count on every rank together."""
        return float(self.strategy.sum(torch.tensor(sum(counts), dtype=torch.float64)))

    def _backward(self, batch: Any, weight: float, sync: bool) -> torch.Tensor:
        """Forward and backward of one micro-batch (the gradients reduced over ranks if ``sync``);
        its loss, detached, in float32."""
        batch = move_to_device(batch, self.device)
        with self.strategy.sync_gradients(sync):
            with self.autocast():
                loss = self._loss(batch)
            (loss * weight).backward()
        return loss.detach().float()

    def _loss(self, batch: Any) -> torch.Tensor:
        if self.wrapped is None:
            return self.loss_fn(self.model, batch)
        return self.wrapped(self.loss_fn, batch)  # through DDP's/FSDP's forward, whatever loss_fn calls

    def _log_due(self) -> bool:
        return self.global_step % self.config.log_every == 0 or self.step_in_epoch == self.steps_per_epoch

    def _log_step(self, window: LossSum, bar: Any) -> float:
        """A step record of the window's mean loss and throughput (all ranks); the loss."""
        loss = self.strategy.mean(window.sum / window.n).item()
        rate = window.examples * self.strategy.world_size / max(1e-9, time.perf_counter() - window.start)
        self._log({"type": "step", "epoch": self.epoch + 1, "step": self.global_step, "loss": loss,
                   "lr": self.scheduler.get_last_lr()[0], "examples_per_s": rate})
        if bar is not None:
            bar.set_postfix(loss=f"{loss:.4f}", ex_s=f"{rate:.1f}")
        return loss

    def _save_due(self) -> bool:
        return bool(self.config.save_every_steps) and self.global_step % self.config.save_every_steps == 0

    def _hit_max_steps(self) -> bool:
        """``max_steps`` reached: the run stops (``interrupted``) at the end of this epoch, or here
        when the step falls inside one (True: last.pt is saved first, to resume from)."""
        if not (self.config.max_steps and self.global_step >= self.config.max_steps):
            return False
        self.interrupted = True
        return self.step_in_epoch < self.steps_per_epoch

    def _evaluate(self, fn: EvalFn | None) -> dict[str, float]:
        """``fn`` (``eval_fn``: the whole dev set; ``train_eval_fn``) once, with the task's own module
        (under torchrun by rank 0, its metrics handed to every rank: ``strategy.evaluate``)."""
        if fn is None:
            return {}

        def run() -> dict[str, float]:
            with torch.no_grad(), self.autocast():
                self.model.eval()
                try:
                    return {k: float(v) for k, v in fn(self.model).items()}
                finally:
                    self.model.train()

        return self.strategy.evaluate(run)

    def ready_for_inference(self) -> None:
        """After ``fit`` (and ``load_best``): the model holds its full weights on every rank (FSDP
        gathers them), so the task can predict with it as with any model."""
        self.strategy.unshard()

    def _optimizer_step(self) -> None:
        if self.config.max_grad_norm > 0:
            params = [p for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
            torch.nn.utils.clip_grad_norm_(params, self.config.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.global_step += 1
        self.step_in_epoch += 1

    def _end_epoch(self, train_loss: float | None) -> None:
        cfg = self.config
        self.epoch += 1
        self.step_in_epoch = 0
        metrics, trained = self._evaluate(self.eval_fn), {}
        if self.train_eval_fn is not None:  # its loader's seed draw undone: the run trains the same without it
            rng, trained = get_rng_state(), self._evaluate(self.train_eval_fn)
            set_rng_state(rng)
        if self.eval_fn is not None and cfg.metric not in metrics:
            raise KeyError(f"eval_fn returned {sorted(metrics)}, not the metric to select on {cfg.metric!r}")
        record = {"epoch": self.epoch, "step": self.global_step, "train_loss": train_loss, "dev": metrics,
                  **({"train": trained} if trained else {})}
        self.history.append(record)
        self._log({"type": "epoch", **record})
        score = metrics.get(cfg.metric, float(self.epoch))  # no eval: later epochs count as better
        if cfg.mode == "min" and cfg.metric in metrics:
            score = -score
        improved = self.best_score is None or score > self.best_score
        if improved:
            self.best_score = score
            self.best_metrics = {**metrics, "epoch": self.epoch}
            self.bad_epochs = 0
        else:
            self.bad_epochs += 1
        self._keep_top_k(score)
        shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())
        print(f"epoch {self.epoch}: train loss {train_loss if train_loss is None else round(train_loss, 4)}"
              f"{'; dev ' + shown if shown else ''}{' (best)' if improved else ''}"
              + (f"; train {cfg.metric} {trained[cfg.metric]:.4f}" if cfg.metric in trained else ""))
        if cfg.patience and self.bad_epochs >= cfg.patience:
            print(f"early stopping: no improvement in {cfg.metric} for {cfg.patience} epochs")
            self.stop = True
        for cb in self.callbacks:
            cb.on_epoch_end(self, self.epoch, metrics)
        self._save_last()
        if cfg.plot and self.strategy.is_main:
            plot_curves(self.history, cfg.metric, self.output_dir / "curves.png")


__all__ = ["Callback", "CountFn", "EvalFn", "LossFn", "TrainConfig", "Trainer", "count_examples", "predict"]
