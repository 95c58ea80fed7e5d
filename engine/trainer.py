"""The one training loop every task uses.

A task supplies what is particular to it -- a model, ``loss_fn(model, batch) ->
scalar tensor``, a train DataLoader, and ``eval_fn(model) -> {metric: value}`` on
its dev set -- and the engine does the rest: device placement, bf16 autocast on
CUDA, gradient accumulation and clipping, our ``optimizer.AdamW``, a learning-rate
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

Under ``torchrun`` (``engine.distributed``) the same loop trains N processes as one process
of N times the batch: the model under DDP (or FSDP2 with ``fsdp``), each rank a slice of every
global batch, accumulated micro-batches weighted by their counts over all ranks, one gradient
all-reduce per optimizer step, the dev set evaluated once by rank 0, and files written by rank 0.

The parts the loop is built from live beside it: ``engine.train_config`` (``TrainConfig``,
``Callback``), ``engine.rng`` (seeding, RNG state),
``engine.schedule`` (learning-rate schedules), ``engine.checkpoints`` (checkpoint files,
weights saved, top-k kept), ``engine.trainer_state`` (what a run writes and resumes from:
``last.pt``, best checkpoints, the metrics log), ``engine.device`` (batch placement,
autocast), ``engine.run_log`` (logs, plot), ``engine.predict`` (the eval-mode loop).
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

from engine import distributed
from engine.checkpoints import load_checkpoint, model_config_of, rank_top_k
from engine.data import count_examples, count_lm_targets
from engine.device import autocast_context, move_to_device
from engine.predict import predict
from engine.rng import get_rng_state, sampler_rng_state, seed_everything, set_rng_state, set_sampler_rng_state
from engine.run_dir import fit_guard, run_settings
from engine.run_log import plot_curves
from engine.schedule import lr_lambda
from engine.tracking import callbacks_for
from engine.train_config import Callback, CountFn, EvalFn, LossFn, TrainConfig
from engine.trainer_state import CheckpointMixin
from optimizer import AdamW

# ------------------------------------------------------------------ trainer


class Trainer(CheckpointMixin):
    """Fit a model with a task-supplied loss and dev evaluation.

    Args:
        model: any nn.Module; moved to ``config.device``.
        loss_fn: ``loss_fn(model, batch) -> scalar tensor``, batch already on the device.
        train_loader: yields batches (dicts/tuples of tensors). Shuffling should use the
            global torch RNG (the DataLoader default) or a generator on its sampler; both resume exactly.
        eval_fn: ``eval_fn(model) -> {name: value}`` on dev, called each epoch in eval mode under
            no_grad and autocast; must contain ``config.metric``. None: no evaluation, last epoch is "best".
        config: TrainConfig.
        optimizer: optional; default ``AdamW`` over trainable parameters, no weight decay on
            biases and LayerNorm weights (1-D tensors).
        callbacks: Callback instances.
        extra: JSON-like dict saved in checkpoints (e.g. the CLI args) for provenance.
        count_fn: ``count_fn(batch)`` -> the number of items ``loss_fn`` averages over (default: the
            examples; ``count_lm_targets`` for causal-LM losses). With ``grad_accum`` > 1 each
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
        count_fn: CountFn | None = None,
    ) -> None:
        self.config = config or TrainConfig()
        self.count_fn = count_fn or count_examples
        self.device = torch.device(self.config.device)
        self.model = model.to(self.device)
        # Under torchrun: the model under DDP or FSDP (None for one process). ``self.model`` stays the
        # task's own module: eval_fn, checkpoints and callers see it, the loss runs through the wrapper.
        self.wrapped = distributed.wrap(self.model, self.device, self.config.fsdp)
        self.loss_fn = loss_fn
        self.train_loader = train_loader
        self.eval_fn = eval_fn
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
        The run folder is locked meanwhile and checked first (``engine.run_dir.fit_guard``):
        one that holds another run is refused, and so is a resume with nothing to resume or with
        changed settings."""
        current = run_settings(self._config_dict(), model_config_of(self.model), self.extra)
        with fit_guard(self.output_dir, self.config, current):
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
        return AdamW([g for g in groups if g["params"]], lr=self.config.lr, betas=self.config.betas,
                     eps=self.config.eps)

    def _batches(self) -> Iterator[tuple[int, Any]]:
        """This epoch's batches; after a mid-epoch resume the seen ones are replayed and skipped."""
        cfg = self.config
        # A save on an epoch's last step leaves step_in_epoch * grad_accum past the last batch when
        # the last group is short; skipping more batches than the epoch has raised StopIteration.
        skip = min(self.step_in_epoch * cfg.grad_accum, len(self.train_loader))  # type: ignore[arg-type]
        if skip:
            resume_rng = get_rng_state()
            set_rng_state(self.epoch_rng)  # the shuffle of the interrupted epoch
            set_sampler_rng_state(self.train_loader, self.epoch_rng)
        else:
            self.epoch_rng = get_rng_state()
            self.epoch_rng["sampler"] = sampler_rng_state(self.train_loader)
        it = iter(self.train_loader)
        if skip:
            for _ in range(skip):  # the sampler draws its seed at the first next(), so replay first
                next(it)
            set_rng_state(resume_rng)
        yield from enumerate(it, start=skip)

    def _train_epoch(self) -> float | None:
        cfg = self.config
        n_batches = len(self.train_loader)  # type: ignore[arg-type]
        bar = None
        if cfg.progress and distributed.is_main():
            from tqdm.auto import tqdm

            bar = tqdm(total=self.steps_per_epoch, initial=self.step_in_epoch,
                       desc=f"epoch {self.epoch + 1}/{cfg.epochs}", dynamic_ncols=True)
        # Summed on the device: no sync per step. A resumed epoch starts from the saved partial sums.
        loss_sum = torch.tensor(self._partial_loss[0] if self.step_in_epoch else 0.0, device=self.device)
        n_loss = self._partial_loss[1] if self.step_in_epoch else 0
        window_loss = torch.zeros((), device=self.device)
        window_n, window_examples, t0 = 0, 0, time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        batches = self._batches()
        for i, first in batches:  # i: the first batch of an accumulation group
            group = [first, *(b for _, b in itertools.islice(batches, min(cfg.grad_accum, n_batches - i) - 1))]
            counts = [float(self.count_fn(b)) for b in group]  # on the host, before the batches move
            total = self._group_total(counts)
            ranks = distributed.world_size()  # DDP/FSDP average gradients over ranks: undone by the weight
            for j, (batch, count) in enumerate(zip(group, counts)):
                batch = move_to_device(batch, self.device)
                with distributed.sync_gradients(self.wrapped, j == len(group) - 1):  # one all-reduce per group
                    with self.autocast():
                        loss = self._loss(batch)
                    (loss * (count * ranks / total if total > 0 else 1.0 / len(group))).backward()
                loss_sum += loss.detach().float()
                window_loss += loss.detach().float()
                n_loss += 1
                window_n += 1
                window_examples += count_examples(batch)
            self._optimizer_step()
            logged = None
            if self.global_step % cfg.log_every == 0 or self.step_in_epoch == self.steps_per_epoch:
                logged = distributed.mean_over_ranks(window_loss / window_n).item()
                rate = window_examples * distributed.world_size() / max(1e-9, time.perf_counter() - t0)
                self._log({"type": "step", "epoch": self.epoch + 1, "step": self.global_step, "loss": logged,
                           "lr": self.scheduler.get_last_lr()[0], "examples_per_s": rate})
                if bar is not None:
                    bar.set_postfix(loss=f"{logged:.4f}", ex_s=f"{rate:.1f}")
                window_loss.zero_()
                window_n, window_examples, t0 = 0, 0, time.perf_counter()
            if bar is not None:
                bar.update(1)
            for cb in self.callbacks:
                cb.on_step_end(self, self.global_step, logged)
            if cfg.save_every_steps and self.global_step % cfg.save_every_steps == 0:
                self._partial_loss = (distributed.mean_over_ranks(loss_sum).item(), n_loss)
                self._save_last()
            if cfg.max_steps and self.global_step >= cfg.max_steps:
                self.interrupted = True
                if self.step_in_epoch < self.steps_per_epoch:
                    self._partial_loss = (distributed.mean_over_ranks(loss_sum).item(), n_loss)
                    self._save_last()
                    break
        if bar is not None:
            bar.close()
        return (distributed.mean_over_ranks(loss_sum) / n_loss).item() if n_loss else None

    def _loss(self, batch: Any) -> torch.Tensor:
        if self.wrapped is None:
            return self.loss_fn(self.model, batch)
        return self.wrapped(self.loss_fn, batch)  # through DDP's/FSDP's forward, whatever loss_fn calls

    def _group_total(self, counts: list[float]) -> float:
        """What an accumulation group's losses average over: its count on every rank together, so
        N ranks weigh their micro-batches as one process of N times the batch does."""
        if self.wrapped is None:
            return sum(counts)
        return float(distributed.sum_over_ranks(torch.tensor(sum(counts), dtype=torch.float64)))

    def _evaluate(self) -> dict[str, float]:
        """``eval_fn`` on rank 0 only, over the whole dev set, with the task's own module (DDP
        replicates it; FSDP's full weights are gathered for it first); the other ranks wait for
        its metrics, so every rank makes the same best/early-stopping decisions."""
        if self.eval_fn is None:
            return {}

        def run() -> dict[str, float]:
            with torch.no_grad(), self.autocast():
                self.model.eval()
                try:
                    return {k: float(v) for k, v in self.eval_fn(self.model).items()}
                finally:
                    self.model.train()

        return distributed.on_main_unsharded(self.wrapped, run)

    def ready_for_inference(self) -> None:
        """After ``fit`` (and ``load_best``): an FSDP model holds its full weights on every rank,
        so the task can predict with it as with any model. Nothing to do otherwise."""
        distributed.unshard(self.wrapped)

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
        metrics: dict[str, Any] = self._evaluate()
        if self.eval_fn is not None:
            if cfg.metric not in metrics:
                raise KeyError(f"eval_fn returned {sorted(metrics)}, not the metric to select on {cfg.metric!r}")
        record = {"epoch": self.epoch, "step": self.global_step, "train_loss": train_loss, "dev": metrics}
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
              f"{'; dev ' + shown if shown else ''}{' (best)' if improved else ''}")
        if cfg.patience and self.bad_epochs >= cfg.patience:
            print(f"early stopping: no improvement in {cfg.metric} for {cfg.patience} epochs")
            self.stop = True
        for cb in self.callbacks:
            cb.on_epoch_end(self, self.epoch, metrics)
        self._save_last()
        if cfg.plot and distributed.is_main():
            plot_curves(self.history, cfg.metric, self.output_dir / "curves.png")


__all__ = ["Callback", "CountFn", "EvalFn", "LossFn", "TrainConfig", "Trainer", "count_examples", "count_lm_targets",
           "predict"]
